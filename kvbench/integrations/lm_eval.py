"""lm-evaluation-harness adapter: any lm-eval task on a model whose KV cache a kvbench method compresses.

    python -m kvbench.lm_eval --model kvbench --model_args model=smollm2,method=snapkv,budget=128 \
        --tasks <task> --include_path <dir with task YAMLs>

or from Python: `import kvbench.integrations.lm_eval` (registers "kvbench"), then
`lm_eval.simple_evaluate(model="kvbench", model_args="method=snapkv,budget=128", tasks=[...])`, or pass a
`KVBenchLM(...)` instance as `model`. Spec: ../shared/specs/lm-eval-adapter.md.

Requests, all greedy and batch 1 (kvbench caches hold one sequence):
- `generate_until`: the context is tokenised as lm-eval's HF wrapper does, prefilled once, compressed by the
  method at the budget, greedily decoded at original positions until a stop string (`until`, plus EOS) or
  `max_gen_toks`, and cut at the first stop string: the same `kvbench.harness.runner.run_sample` path as every
  kvbench task, so the side row is a complete kvbench row.
- `loglikelihood`: requests are grouped by context; each context is prefilled ONCE without its last token
  (`ctx[:-1]`), and every continuation gets its own compressed copy of that cache, then
  `[ctx[-1]] + cont[:-1]` is forwarded on the COMPRESSED cache at the original positions and the continuation's
  log-probabilities are summed (prefilling all of ctx would score the first continuation token on the full
  cache). `is_greedy`: every continuation token is the argmax.
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows (`get_rolling_token_windows`, one context token
  per window), each scored as a loglikelihood request. A window's tokens are forwarded together, so prefill-time
  eviction has nothing to compress there; methods that evict before every forward (streamingllm, h2o, tova,
  `decode_budget`) bound the cache between windows only. This is "perplexity of the method's cache between
  windows", not token-by-token streaming.

Model args: see `KVBenchLM.__init__`; `method.<param>=value` sets a method hyperparameter. Unknown args fail
in one line listing the valid ones. `rows_path=<dir>` writes kvbench measurement rows (kept entries, KV bytes,
TTFT, TPOT, ...) as `<dir>/samples.jsonl` + `manifest.json`, one row per request in kvbench's row schema;
lm-eval's own output carries the task metrics.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string

from kvbench import api
from kvbench.engine.cache import KVCache
from kvbench.engine.generation import forward_tokens
from kvbench.engine.measure import Stopwatch
from kvbench.engine.models import LoadedModel
from kvbench.harness.budget import parse_budget
from kvbench.harness.options import COMPRESS_MODES
from kvbench.harness.prompt import Prompt
from kvbench.harness.results import ResultsStore, manifest, stable_hash
from kvbench.harness.runner import cache_state, compress_copy, run_sample, shared_prefill, split_point
from kvbench.harness.sample import Sample

log = logging.getLogger("kvbench")
METHOD_PREFIX = "method."
# Passed by lm-eval itself (additional_config / CLI); accepted and handled or ignored.
HARNESS_ARGS = ("batch_size", "max_batch_size")


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
        if compress not in COMPRESS_MODES:  # before loading the model
            raise AdapterArgError(f"unknown compress '{compress}'. Valid compress modes: {', '.join(COMPRESS_MODES)}.")
        batch_size = extra.get("batch_size")
        if batch_size not in (None, 1, "1"):
            log.warning("kvbench: batch_size=%s ignored; requests run one by one (batch-1 caches)", batch_size)
        overrides = {"dtype": dtype} | ({"device": device} if device else {})
        self.lm: LoadedModel = api.load_model(model, **overrides)
        self.method = api.build_method(method, **method_params)
        self.budget = parse_budget(None if budget in ("none", "None", "null") else budget)
        self.compress = compress
        self.protect_tail = int(protect_tail)
        self.max_length = int(max_length or self.lm.max_context)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.allow_sampling = bool(allow_sampling)
        self.tokenizer = self.lm.tokenizer
        self.options = api.RunOptions(
            budgets=(self.budget,), compress=compress, seed=self.seed, fail_fast=True, kernels=kernels,
            run_name="lm_eval", task_name="lm_eval",
        ).resolved(self.lm.device)  # fmt: skip
        self.store = ResultsStore(Path(rows_path)) if rows_path else None
        if self.store is not None:
            extra_manifest = {"lm_eval": {"method": self.method.label(), "budget": self.budget, "compress": compress}}
            self.store.write_text("manifest.json", json.dumps(manifest(self.lm, self.seed, extra_manifest), indent=2))
        self._request_meta: list[tuple[str | None, int | None]] = []

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

    def _job(self, sample: Sample) -> Any:
        return api.plan(self.lm, sample, [self.method], self.options)[0]

    def _sample(self, sample_id: str, context: str, max_new_tokens: int, meta: dict[str, Any]) -> Sample:
        return Sample(sample_id, context, "", "", [], "none", max_new_tokens, use_chat_template=False, meta=meta)

    def _split(self, ids: list[int]) -> int:
        """compress=prompt: all of the context is compressed; compress=context: all but `protect_tail` tokens
        (lm-eval gives one string, so the question boundary is a token count)."""
        prompt = Prompt(ids, max(1, len(ids) - self.protect_tail), 0)
        return split_point(prompt, self.compress)

    def _write(self, row: dict[str, Any]) -> None:
        if self.store is not None:
            self.store.append(row)

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
            ids = ids[truncated:]  # left truncation, as lm-eval's HF wrapper does
            sample_id = f"{request.task_name}/{request.doc_id}/{request.idx}"
            meta = {"stop": until, "request": "generate_until", "lm_eval_task": request.task_name}
            sample = self._sample(sample_id, context, max_new, meta)
            prompt = Prompt(ids, max(1, len(ids) - self.protect_tail), truncated)
            job = self._job(sample)
            _, row = next(run_sample(self.lm, sample, [job], self.options, prompt=prompt))
            identity = api.row_identity(job, sample, self.lm, self.options)
            self._write({**identity, "subtask": request.task_name, **row})
            results.append(row["prediction"])
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), row["prediction"])
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
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context_ids, continuation_ids) in enumerate(requests):
            whole = (list(context_ids) + list(continuation_ids))[-(self.max_length + 1) :]  # HF wrapper's truncation
            groups.setdefault(tuple(whole[: len(whole) - len(continuation_ids)]), []).append(index)
        for context_ids, indices in groups.items():
            for index, scored in zip(indices, self._score_group(list(context_ids), requests, indices), strict=True):
                results[index] = scored
        return results  # type: ignore[return-value]

    def _score_group(self, context_ids: list[int], requests: list[Any], indices: list[int]) -> Iterable[tuple]:
        """One prefill of `context_ids[:-1]`; per continuation a compressed copy scores `[ctx[-1]] + cont[:-1]`."""
        stopwatch = Stopwatch(self.lm.device)
        prefix, last = context_ids[:-1], context_ids[-1]
        split = self._split(prefix) if prefix else 0
        (context, _), _, _ = requests[indices[0]]
        task_name, doc_id = self._request_meta[indices[0]] if self._request_meta else (None, None)
        sample = self._sample(
            f"{task_name}/{doc_id}/{stable_hash(context_ids, 8)}", context or "", 1, {"request": "loglikelihood"}
        )
        job = self._job(sample)
        pre = observers = None
        if split:
            pre, observers = shared_prefill(self.lm, prefix[:split], [self.method], stopwatch)
        for index in indices:
            continuation = list(requests[index][2])
            if pre is not None:
                stats = observers.get(id(self.method))
                job_cache = compress_copy(self.lm, pre, job, prefix[:split], self.options, stopwatch, stats)
                cache, before_forward, compressed = job_cache.cache, job_cache.before_forward, job_cache.compressed
            else:
                cache, before_forward, compressed = KVCache(self.lm.config.num_hidden_layers), (lambda n: None), False
            layer_heads = self.lm.config.num_hidden_layers * self._kv_heads()
            # As the runner's rows: `*_compressed` right after compression, the plain fields at the end of the row.
            if pre is not None:
                compressed_state = cache_state(cache, split, layer_heads, "_compressed", logical=False)
            else:  # empty prefix: nothing cached before scoring
                compressed_state = {
                    "kept_entries_compressed": 0,
                    "kept_per_layer_compressed": [0.0] * self.lm.config.num_hidden_layers,
                    "kept_fraction_compressed": 0.0,
                    "kv_bytes_compressed": 0,
                }
            feed = prefix[split:] + [last] + continuation[:-1]  # protected tail (compress=context), then scoring
            before_forward(len(feed))
            with stopwatch.phase("score") as phase:
                logits = forward_tokens(self.lm, cache, feed, logits_to_keep=len(feed))[-len(continuation) :]
            end_state = cache_state(cache, max(1, split), layer_heads, logical=False)
            logprobs = F.log_softmax(logits.float(), dim=-1)
            target = torch.tensor(continuation, device=logprobs.device)
            logprob = float(logprobs.gather(1, target[:, None]).sum())
            greedy = bool((logprobs.argmax(dim=-1) == target).all())
            yield logprob, greedy
            (ctx_text, cont_text), _, _ = requests[index]
            if ctx_text is not None:
                self.cache_hook.add_partial("loglikelihood", (ctx_text, cont_text), (logprob, greedy))
            self._write(
                {
                    **api.row_identity(job, sample, self.lm, self.options),
                    "subtask": task_name or "lm_eval",
                    "status": "ok",
                    "compressed": compressed,
                    "prompt_tokens": len(context_ids),
                    "compressed_tokens": split,
                    "continuation_tokens": len(continuation),
                    **compressed_state,
                    **end_state,
                    "kv_bytes_full": pre.cache.kv_bytes() if pre is not None else 0,
                    "prefill_s": pre.seconds if pre is not None else 0.0,
                    "score_s": phase.seconds,
                    "logprob": logprob,
                    "is_greedy": greedy,
                    "score": None,
                }
            )

    def _kv_heads(self) -> int:
        return self.lm.config.num_key_value_heads


def valid_args() -> list[str]:
    """The adapter's model args (for the one-line error)."""
    params = inspect.signature(KVBenchLM.__init__).parameters
    return sorted([name for name in params if name not in ("self", "extra")] + list(HARNESS_ARGS))
