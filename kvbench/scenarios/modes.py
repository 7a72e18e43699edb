"""Scenarios that compare ways of building one prompt's cache ("modes"): one row per job and mode.

Segment reuse (`joint` / `reuse` / `reuse_norotate`) and edited contexts (`recompute` / `pie` / `no_rerotate`)
both end in the same prompt tokens; they differ in how the cache before the last tokens (the question, or the
cursor line) was obtained. Each mode's builder returns that cache (or None: prefill everything) and the tokens
still to prefill; those are prefilled on top of it once per sample with every job's window recorder and prefill
observers attached (`runner.shared_prefill`), so the job's method then compresses the assembled cache as after an
ordinary prefill (compress=prompt) and `runner.run_job` decodes and scores it. The methods' observation window and
prefill statistics then cover only those last tokens (the pieces were encoded without them). Every row gets

* `mode`, `part` (= mode) and `subtask` `<scenario>/<mode>` (summaries report the modes separately);
* `build_s` (building the cache before the tail: encoding, re-rotation, splicing) inside `prefill_s` and
  `ttft_s`, `prefill_tokens` (tokens forwarded through the model for this prompt, build included) and
  `prefill_tokens_saved` (prompt tokens NOT forwarded);
* `reference_mode`, `exact_match_ref` (1.0 when the greedy output equals the reference mode's output of the same
  job), `token_match_ref` and `first_divergence_ref` (`kvbench.harness.fidelity`'s definitions) against it;
* the mode's own fields from its builder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kvbench.engine.cache import KVCache
from kvbench.engine.generation import Prefill
from kvbench.engine.measure import Stopwatch
from kvbench.engine.models import LoadedModel
from kvbench.harness import fidelity
from kvbench.harness.options import RunOptions
from kvbench.harness.prompt import Prompt
from kvbench.harness.runner import Job, error_fields, run_job, shared_prefill
from kvbench.harness.sample import Sample

MARK = "\u0000KVBENCH-CONTEXT\u0000"  # stands for the context while the chat template is rendered


@dataclass
class Built:
    """What a mode's builder returns: the cache before `prefill_ids` (None: a fresh one) and row fields."""

    cache: KVCache | None
    prefill_ids: list[int]
    fields: dict[str, Any] = field(default_factory=dict)
    forwarded: int = 0  # tokens the builder itself forwarded through the model


def render_around_context(tokenizer: Any, sample: Sample) -> tuple[list[int], list[int]]:
    """Token ids before and after the sample's context: the chat template's opening (system turn, user turn
    start) and the question with the template's closing and the answer prefix. Contexts are tokenised by the
    scenarios piece by piece; every mode uses the same ids, so modes differ only in how the cache was built."""
    templated = bool(sample.use_chat_template and getattr(tokenizer, "chat_template", None))
    user = MARK + sample.separator + sample.question
    if templated:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        text += sample.answer_prefix
    else:
        text = user + sample.answer_prefix
    start = text.index(MARK)
    head = tokenizer(text[:start], add_special_tokens=not templated)["input_ids"]
    tail = tokenizer(text[start + len(MARK) :], add_special_tokens=False)["input_ids"]
    return head, tail


def check_compress_setting(settings: RunOptions, jobs: list[Job], scenario: str) -> None:
    """Reused/patched caches are compressed after the question (compress=prompt); compress=context would need the
    context's own last queries, which a cache assembled from pieces never computed."""
    if settings.compress != "prompt" and any(job.method.compresses for job in jobs):
        raise ValueError(
            f"task={scenario} compresses the assembled cache after the question: compress='{settings.compress}' is "
            "not supported with a compressing method. Valid compress modes here: prompt."
        )


def run_modes(
    lm: LoadedModel,
    sample: Sample,
    jobs: list[Job],
    settings: RunOptions,
    scenario: str,
    prompt_ids: list[int],
    builders: dict[str, Callable[[], Built]],
    reference_mode: str,
) -> Iterator[tuple[Job, dict]]:
    """Build every mode's cache once, then yield (job, row) for every job and mode (the reference mode first)."""
    modes = sorted(builders, key=lambda mode: mode != reference_mode)
    prompt = Prompt(list(prompt_ids), len(prompt_ids), 0)
    split = len(prompt_ids)
    stopwatch = Stopwatch(lm.device)
    methods = [job.method for job in jobs]
    prepared: dict[str, tuple[Prefill, dict, dict] | BaseException] = {}
    for mode in modes:
        try:
            check_compress_setting(settings, jobs, scenario)
            with stopwatch.phase("build") as phase:
                built = builders[mode]()
            pre, observers = shared_prefill(lm, built.prefill_ids, methods, stopwatch, built.cache)
            tail_prefill_s = pre.seconds
            pre.seconds += phase.seconds  # time to first token counts building the cache
            forwarded = built.forwarded + len(built.prefill_ids)
            fields = {
                "mode": mode,
                "build_s": phase.seconds,
                "tail_prefill_s": tail_prefill_s,
                "prefill_tokens": forwarded,
                "prefill_tokens_saved": split - forwarded,
                **built.fields,
            }
            prepared[mode] = (pre, observers, fields)
        except Exception as err:
            if settings.fail_fast:
                raise
            prepared[mode] = err
    for job in jobs:
        reference: list[int] | None = None
        for index, mode in enumerate(modes):
            entry = prepared[mode]
            part = {"part": mode, "subtask": f"{scenario}/{mode}", "mode": mode, "reference_mode": reference_mode}
            if index == len(modes) - 1:
                part["job_complete"] = True
            if isinstance(entry, BaseException):
                yield job, {**error_fields(entry), **part}
                continue
            pre, observers, fields = entry
            try:
                row = run_job(
                    lm,
                    sample,
                    prompt,
                    split,
                    pre,
                    job,
                    settings,
                    stopwatch,
                    observers.get(id(job.method)),
                )
            except Exception as err:
                if settings.fail_fast:
                    raise
                yield job, {**error_fields(err), **part}
                continue
            tokens = row["output_ids"]
            if mode == reference_mode:
                reference = tokens
            row.update(reference_fields(reference, tokens))
            yield job, {"prompt_tokens": split, "compressed_tokens": split, **row, **fields, **part}


def error_rows(
    jobs: list[Job], modes: list[str], scenario: str, err: BaseException, fail_fast: bool
) -> Iterator[tuple[Job, dict]]:
    """An error row for every job and mode when a sample cannot be set up (or raise with fail_fast)."""
    if fail_fast:
        raise err
    for job in jobs:
        for index, mode in enumerate(modes):
            last = {"job_complete": True} if index == len(modes) - 1 else {}
            yield job, {**error_fields(err), "part": mode, "subtask": f"{scenario}/{mode}", "mode": mode, **last}


def reference_fields(reference: list[int] | None, tokens: list[int]) -> dict[str, Any]:
    """Agreement of a mode's greedy output with the reference mode's (null without a reference row)."""
    if reference is None:
        return {"exact_match_ref": None, "token_match_ref": None, "first_divergence_ref": None}
    return {
        "exact_match_ref": float(reference == tokens),
        "token_match_ref": fidelity.token_match(reference, tokens),
        "first_divergence_ref": fidelity.first_divergence(reference, tokens),
    }
