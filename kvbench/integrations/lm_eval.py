"""lm-evaluation-harness adapter: any lm-eval task on a model whose KV cache a kvbench method compresses.

    python -m kvbench.lm_eval --model kvbench --model_args model=smollm2,method=snapkv,budget=128 \
        --tasks <task> --include_path <dir with task YAMLs>

or from Python: `import kvbench.integrations.lm_eval` (registers "kvbench"), then
`lm_eval.simple_evaluate(model="kvbench", model_args="method=snapkv,budget=128", tasks=[...])`, or pass a
`KVBenchLM(...)` instance as `model`. lm-eval has no plugin discovery: the model is registered by importing this
module (`python -m kvbench.lm_eval` does before calling lm-eval's command line).

Design. The adapter is a `TemplateLM` (lm-eval tokenises and calls `_loglikelihood_tokens`); every request runs
greedily at batch 1 (a kvbench cache holds one sequence) through one of two public harness functions, with the
adapter's `RunOptions` (`self.options`: compress mode, seed, resolved kernels) passed down whole:

- `generate_until` -> `kvbench.harness.runner.run_sample`, the path of every kvbench task. The context is
  tokenised as lm-eval's HF wrapper does (left-truncated to `max_length - max_gen_toks`), prefilled once,
  compressed by the method at the budget, greedily decoded at the original positions until a stop string
  (`until`, plus EOS) or `max_gen_toks`, and cut at the first stop string.
- `loglikelihood` -> `kvbench.harness.runner.score_continuations`. Requests are grouped by context (truncated to
  the last `max_length + 1` tokens of context + continuation, as the HF wrapper does). A group's context is
  prefilled ONCE without its last token, and every continuation gets its own compressed copy of that cache; then
  `[ctx[-1]] + cont[:-1]` is forwarded on the COMPRESSED cache at the original positions and the continuation's
  log-probabilities are summed (prefilling all of ctx would score the first continuation token on the full
  cache). `is_greedy`: every continuation token is the argmax. A one-token context (lm-eval's
  beginning-of-text token for an empty context) leaves nothing to prefill or compress: that row measures an
  empty cache.
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows (`get_rolling_token_windows`, one context token
  per window), each scored as a loglikelihood request. A window's tokens are forwarded together, so prefill-time
  eviction has nothing to compress there; methods that evict before every forward (streamingllm, h2o, tova,
  `decode_budget`) bound the cache between windows only. This is "perplexity of the method's cache between
  windows", not token-by-token streaming.

What is compressed. lm-eval gives one context string and no question boundary, so the compressed segment is a
token count: `compress=prompt` (default) compresses all the prefilled tokens (the whole context for
`generate_until`, all but the last context token for `loglikelihood`); `compress=context` compresses all but
the last `protect_tail` of them, which are fed after compression as the row's question tail (`*_tail` fields)
and stay uncompressed unless the method evicts again before later forwards.

Rows. `rows_path=<dir>` writes one kvbench row per request (per continuation for loglikelihood, per window for
rolling) to `<dir>/samples.jsonl`, with `<dir>/manifest.json`; lm-eval's own output carries the task metrics.
Rows use kvbench's row schema: the identity fields (`kvbench.api.row_identity`, `meta.request` naming the
request type, `subtask` the lm-eval task) and the runner's measurement fields, built by the same code for both
kinds of rows (`RowMeter.fields`: kept entries and fraction, KV bytes, `*_compressed` right after compression,
`kv_bytes_full`, `kv_bytes_peak`, prefill / compress / tail times, `ttft_s`, ...). Generation rows add decoding
(`prediction`, `output_ids`, `decode_s`, `tpot_s`, ...); scoring rows add `continuation_tokens`, `score_s`,
`logprob` and `is_greedy`.

Resume. A row's `key` hashes the model, method and parameters, budget, compress mode, seed and the request's
tokens (its compressed-segment length included, so `protect_tail` and `max_length` are part of it). When
`rows_path` already holds a successful row of a request's key, the request is answered from that row
(`prediction`, or `logprob` and `is_greedy`) without running the model, and nothing is appended; a context
whose continuations are all answered is not prefilled. So rerunning an interrupted lm-eval command with the same
`rows_path` computes only what is missing. A `rows_path` keeps one setting: a manifest of another model,
method, budget, compress mode, `protect_tail` or seed there is refused in one line.

Model args: see `KVBenchLM.__init__`; `method.<param>=value` sets a method hyperparameter. Unknown args fail
in one line listing the valid ones.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string

from kvbench import api
from kvbench.harness.budget import parse_budget
from kvbench.harness.options import check_compress
from kvbench.harness.prompt import Prompt
from kvbench.harness.results import ResultsStore, manifest, stable_hash
from kvbench.harness.runner import Job, run_sample, score_continuations, split_point
from kvbench.harness.sample import Sample

log = logging.getLogger("kvbench")
METHOD_PREFIX = "method."
# Passed by lm-eval itself (additional_config / CLI); accepted and handled or ignored.
HARNESS_ARGS = ("batch_size", "max_batch_size")
MANIFEST = "manifest.json"


class AdapterArgError(ValueError):
    """A bad model arg; one line."""


@register_model("kvbench")
class KVBenchLM(TemplateLM):
    """lm-eval model "kvbench": a kvbench model whose cache `method` compresses to `budget`."""

    def __init__(
        self,
        model: str = "smollm2",
        method: str = "full",
        budget: int | float | str | None = None,
        compress: str = "prompt",
        protect_tail: int = 0,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        device: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
        rows_path: str | None = None,
        allow_sampling: bool = False,
        kernels: str = "auto",
        **extra: Any,
    ) -> None:
        super().__init__()
        method_params = {k.removeprefix(METHOD_PREFIX): v for k, v in extra.items() if k.startswith(METHOD_PREFIX)}
        unknown = sorted(k for k in extra if not k.startswith(METHOD_PREFIX) and k not in HARNESS_ARGS)
        if unknown:
            raise AdapterArgError(
                f"unknown kvbench model arg '{unknown[0]}'. Valid args: {', '.join(valid_args())}, "
                f"method.<hyperparameter>."
            )
        try:
            check_compress(compress)  # before loading the model
        except ValueError as err:
            raise AdapterArgError(str(err)) from None
        check_device(device)  # before loading the model: torch's own error comes after a minute of loading
        batch_size = extra.get("batch_size")
        if batch_size not in (None, 1, "1"):
            log.warning("kvbench: batch_size=%s ignored; requests run one by one (batch-1 caches)", batch_size)
        overrides = {"dtype": dtype} | ({"device": device} if device else {})
        self.lm: api.LoadedModel = api.load_model(model, **overrides)
        self.method = api.build_method(method, **method_params)
        self.budget = parse_budget(None if budget in ("none", "None", "null") else budget)
        self.protect_tail = int(protect_tail)
        self.max_length = int(max_length or self.lm.max_context)
        self.max_gen_toks = int(max_gen_toks)
        self.allow_sampling = bool(allow_sampling)
        self.tokenizer = self.lm.tokenizer
        self.options = api.RunOptions(
            budgets=(self.budget,), compress=compress, seed=int(seed), fail_fast=True, kernels=kernels,
            run_name="lm_eval", task_name="lm_eval",
        ).resolved(self.lm.device)  # fmt: skip
        self.store = ResultsStore(Path(rows_path)) if rows_path else None
        # Successful rows by key: requests already answered in rows_path (resume) or earlier in this run.
        self.done: dict[str, dict[str, Any]] = {}
        if self.store is not None:
            self._open_rows()
        self._request_meta: list[tuple[str | None, int | None]] = []

    def _open_rows(self) -> None:
        """Check that rows_path holds this setting's rows (or none), write its manifest, read its finished rows."""
        setting = {
            "model": self.lm.name,
            "method": self.method.label(),
            "budget": self.budget,
            "compress": self.options.compress,
            "protect_tail": self.protect_tail,
            "seed": self.options.seed,
        }
        path = self.store.run_dir / MANIFEST
        if path.exists():
            held = json.loads(path.read_text()).get("lm_eval")
            if held != setting:
                raise AdapterArgError(
                    f"rows_path {self.store.run_dir} holds rows of another setting ({held}); "
                    "rerun with the same model args or choose another rows_path."
                )
        else:
            self.store.write_text(
                MANIFEST, json.dumps(manifest(self.lm, self.options.seed, {"lm_eval": setting}), indent=2)
            )
        self.done = {row["key"]: row for row in self.store.latest_rows() if row.get("status") == "ok"}

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None) -> Any:
        """Model args win over lm-eval's own settings (its CLI passes `device` and `batch_size` separately)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> Any:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- tokenisation (as lm-eval's HF wrapper with its defaults) --------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        """Distinct per method/budget, so lm-eval's chat-templated request caches never mix them."""
        return f"{self.lm.name}|{self.method.label()}|budget={self.budget}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and bos and string.startswith(bos):
            special = {"add_special_tokens": False}
        return self.tokenizer.encode(string, **special)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # -- requests ------------------------------------------------------------------------------------------

    def _job(self, sample: Sample) -> Job:
        return api.plan(self.lm, sample, [self.method], self.options)[0]

    def _sample(self, sample_id: str, context: str, max_new_tokens: int, meta: dict[str, Any]) -> Sample:
        return Sample(sample_id, context, "", "", [], "none", max_new_tokens, use_chat_template=False, meta=meta)

    def _prompt(self, ids: list[int], truncated: int = 0) -> Prompt:
        """The prefilled tokens as a kvbench prompt: compress=context stops the compressed segment `protect_tail`
        tokens before their end (lm-eval gives one string, so the question boundary is a token count)."""
        return Prompt(ids, max(1, len(ids) - self.protect_tail), truncated)

    def _write(self, job: Job, sample: Sample, task_name: str | None, row: dict[str, Any]) -> None:
        if self.store is None:
            return
        row = {**api.row_identity(job, sample, self.lm, self.options), "subtask": task_name or "lm_eval", **row}
        self.store.append(row)
        if row["status"] == "ok":
            self.done[job.key] = row

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode(self.eot_token_id)
        results = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if (kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0) and not self.allow_sampling:
                raise AdapterArgError(
                    f"task {request.task_name} asks for sampling (do_sample/temperature > 0); kvbench decodes greedily"
                    " (model arg allow_sampling=true runs it greedily anyway)"
                )
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            max_new = int(kwargs["max_gen_toks"])
            ids = self.tok_encode(context)
            truncated = max(0, len(ids) - (self.max_length - max_new))
            prompt = self._prompt(ids[truncated:], truncated)  # left truncation, as lm-eval's HF wrapper does
            # The row key covers what the request's outcome depends on beyond the context text: tokens and stops.
            tokens_hash = stable_hash([prompt.input_ids, split_point(prompt, self.options.compress), until], 12)
            sample_id = f"{request.task_name}/{request.doc_id}/{request.idx}/{tokens_hash}"
            meta = {"stop": until, "request": "generate_until", "lm_eval_task": request.task_name}
            sample = self._sample(sample_id, context, max_new, meta)
            job = self._job(sample)
            if job.key in self.done:
                prediction = self.done[job.key]["prediction"]
            else:
                _, row = next(run_sample(self.lm, sample, [job], self.options, prompt=prompt))
                self._write(job, sample, request.task_name, row)
                prediction = row["prediction"]
            results.append(prediction)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), prediction)
        return results

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._request_meta = [(r.task_name, r.doc_id) for r in requests]
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._request_meta = []

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in requests:
            (string,) = request.args
            windows = [
                ((None, None), *make_disjoint_window(w))
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            self._request_meta = [(request.task_name, request.doc_id)] * len(windows)
            try:
                scored = self._loglikelihood_tokens(windows)
            finally:
                self._request_meta = []
            total = sum(logprob for logprob, _ in scored)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return results

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for index, (_, context_ids, continuation_ids) in enumerate(requests):
            whole = list(context_ids) + list(continuation_ids)
            kept = whole[-(self.max_length + 1) :]  # the HF wrapper's truncation
            context = tuple(kept[: len(kept) - len(continuation_ids)])
            groups.setdefault((context, len(whole) - len(kept)), []).append(index)
        for (context, truncated), indices in groups.items():
            for index, scored in self._score_group(list(context), truncated, requests, indices):
                results[index] = scored
                (ctx_text, cont_text), _, _ = requests[index]
                if ctx_text is not None:
                    self.cache_hook.add_partial("loglikelihood", (ctx_text, cont_text), scored)
        return results  # type: ignore[return-value]

    def _score_group(
        self, context_ids: list[int], truncated: int, requests: list[Any], indices: list[int]
    ) -> Iterator[tuple[int, tuple[float, bool]]]:
        """(index, (logprob, is_greedy)) of every request of one context: answered from rows_path when done there,
        the others scored by one `score_continuations` call (one prefill of the context)."""
        if not context_ids:
            raise AdapterArgError(f"a continuation longer than max_length={self.max_length} leaves no context")
        prefix = context_ids[:-1]
        split = split_point(self._prompt(prefix), self.options.compress) if prefix else 0
        task_name, doc_id = self._request_meta[indices[0]] if self._request_meta else (None, None)
        todo: list[tuple[int, Sample, Job]] = []
        for index in indices:
            (context_text, _), _, continuation = requests[index]
            tokens_hash = stable_hash([context_ids, list(continuation), split], 12)
            meta = {"request": "loglikelihood", "lm_eval_task": task_name}
            sample = self._sample(f"{task_name}/{doc_id}/{tokens_hash}", context_text or "", 0, meta)
            job = self._job(sample)
            if job.key in self.done:
                yield index, (self.done[job.key]["logprob"], self.done[job.key]["is_greedy"])
            else:
                todo.append((index, sample, job))
        if not todo:
            return
        continuations = [list(requests[index][2]) for index, _, _ in todo]
        # Every job of the group has the same method and budget: the first stands for all in the scoring.
        scored = score_continuations(self.lm, context_ids, continuations, todo[0][2], self.options, split, truncated)
        for (index, sample, job), result in zip(todo, scored, strict=True):
            self._write(job, sample, task_name, result.row)
            yield index, (result.logprob, result.is_greedy)


def check_device(device: str | None) -> None:
    """A CUDA device on a machine without CUDA fails in one line (None and `auto` resolve to what is there)."""
    if device and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise AdapterArgError(
            f"device {device} needs CUDA, which this machine (or this torch build) does not have; "
            "use device=auto (the default: CUDA when available, else CPU) or device=cpu"
        )


def valid_args() -> list[str]:
    """The adapter's model args (for the one-line error)."""
    params = inspect.signature(KVBenchLM.__init__).parameters
    return sorted([name for name in params if name not in ("self", "extra")] + list(HARNESS_ARGS))
