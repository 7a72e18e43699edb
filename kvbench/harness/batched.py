"""Batched evaluation (`batch_size=B`): B samples at a time, each prefilled and compressed by every job exactly as
`run_sample` does, then the B caches of one (method, budget) job decode together (`kvbench.engine.batched`).

The rows are those of `batch_size=1` (same greedy tokens, kept entries and bytes: each sequence's decoded slots
land in its own cache), plus `batch_size` (the sequences that decoded together), `batch_attention` ("stacked": the
caches were stacked, padded; "per_row": each row attended over its own cache, for methods that evict while decoding
or store K/V other than as plain tensors) and `batch_padding_fraction` (the share of the stacked cache's slots that
are padding added to stack them; 0 per row). What cannot batch is refused in one line before any model work
(`check_batch`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kvbench.engine.architecture import FULL, compressible_layers, model_type
from kvbench.engine.batched import Sequence, batched_greedy_decode
from kvbench.engine.measure import Stopwatch
from kvbench.engine.models import LoadedModel
from kvbench.harness import fidelity
from kvbench.harness.options import RunOptions
from kvbench.harness.prompt import Prompt, build_prompt
from kvbench.harness.runner import (
    Job,
    PreparedJob,
    error_fields,
    finish_job,
    prepare_job,
    prompt_fields,
    reference_or_none,
    shared_prefill,
    split_point,
    stop_rule,
)
from kvbench.harness.sample import Sample
from kvbench.methods.base import Method


def check_batch(
    methods: list[Method], options: RunOptions, lm: LoadedModel | None = None, scenario: str | None = None
) -> None:
    """Refuse `batch_size > 1` in one line, with the reason, where batched decode would not give the batch-1 rows:
    a chunked prefill, a method that cannot batch (`Method.batch_refusal`), a model whose layers are not all plain
    full attention, a scenario (`scenario`: a multi-turn / reuse / edit task runs its own loop)."""
    batch_size = options.batch_size  # an int >= 1 (`RunOptions`)
    if batch_size == 1:
        return
    if scenario is not None:
        raise ValueError(
            f"batch_size={batch_size} cannot run the {scenario} scenario (it runs its own loop per sample); "
            "set batch_size=1"
        )
    if options.prefill_chunk is not None:
        raise ValueError(
            f"batch_size={batch_size} cannot run with prefill_chunk={options.prefill_chunk} (each job prefills "
            "alone); set batch_size=1 or prefill_chunk=null"
        )
    for method in methods:
        reason = method.batch_refusal()
        if reason is not None:
            raise ValueError(
                f"method {method.name} cannot run with batch_size={batch_size}: {reason}; set batch_size=1"
            )
    if lm is not None:
        odd = [spec for spec in lm.layer_specs if spec.kind != FULL or spec.latent or spec.bounded]
        if odd:
            raise ValueError(
                f"batch_size={batch_size} needs plain full-attention layers, but architecture "
                f"'{model_type(lm.config)}' has {odd[0].kind}{' (MLA latent)' if odd[0].latent else ''} layers; "
                "set batch_size=1"
            )


@dataclass
class SampleState:
    """One sample of a batch: its prompt, prefill, reference and rows (in `run_sample`'s job order)."""

    sample: Sample
    jobs: list[Job]
    stopwatch: Stopwatch
    base: dict[str, Any] = field(default_factory=lambda: prompt_fields(None, None, None))
    prompt: Prompt | None = None
    split: int = 0
    pre: Any = None
    observers: dict[int, Any] = field(default_factory=dict)
    failed: dict[str, Any] | None = None  # the prefill's error row: every job's row
    reference: fidelity.Reference | None = None
    reference_tried: bool = False
    rows: list[tuple[Job, dict[str, Any]]] = field(default_factory=list)


def ordered_jobs(jobs: list[Job]) -> tuple[Job | None, list[Job]]:
    """`run_sample`'s order: the full (reference) job first."""
    reference_job = next((job for job in jobs if not job.method.compresses), None)
    return reference_job, ([reference_job] if reference_job else []) + [job for job in jobs if job is not reference_job]


def run_batch(
    lm: LoadedModel, group: list[tuple[Sample, list[Job]]], options: RunOptions
) -> Iterator[tuple[Sample, Job, dict[str, Any]]]:
    """Yield (sample, job, row) for every job of up to B single-prompt samples, sample by sample in `run_sample`'s
    order. The k-th job of every sample decodes in one batch: the same method and budget when the samples were
    planned alike; a resumed run's samples may have different jobs left, and any batchable caches stack."""
    options = options.resolved(lm.device)
    states = [SampleState(sample, jobs, Stopwatch(lm.device)) for sample, jobs in group]
    for state in states:
        try:
            sample = state.sample
            state.prompt = build_prompt(lm.tokenizer, sample, lm.max_context - sample.max_new_tokens)
            state.split = split_point(state.prompt, options.compress)
            state.base = prompt_fields(len(state.prompt), state.split, state.prompt.truncated_tokens)
            ids = state.prompt.input_ids[: state.split]
            layers = compressible_layers(lm.layer_specs, options.layers)
            methods = [job.method for job in state.jobs]
            state.pre, state.observers = shared_prefill(lm, ids, methods, state.stopwatch, layers=layers)
        except Exception as err:
            if options.fail_fast:
                raise
            state.failed = error_fields(err)
    orders = [ordered_jobs(state.jobs) for state in states]
    for k in range(max((len(order) for _, order in orders), default=0)):
        prepared: list[tuple[SampleState, Job, PreparedJob]] = []
        for state, (reference_job, order) in zip(states, orders, strict=True):
            if k >= len(order):
                continue
            job = order[k]
            if state.failed is not None:
                state.rows.append((job, dict(state.failed)))
                continue
            try:
                if not state.reference_tried and reference_job is None:
                    state.reference_tried = True
                    state.reference = reference_or_none(
                        options.fail_fast, lm, state.sample, state.prompt, state.split, state.pre, state.stopwatch
                    )
                stats = state.observers.get(id(job.method))
                one = prepare_job(
                    lm, state.sample, state.prompt, state.split, state.pre, job, options, state.stopwatch, stats,
                    state.reference,
                )  # fmt: skip
                prepared.append((state, job, one))
            except Exception as err:
                if options.fail_fast:
                    raise
                state.rows.append((job, error_fields(err)))
        if prepared:
            decode_together(lm, prepared, options)
    for state in states:
        for job, row in state.rows:
            yield state.sample, job, {**state.base, **row}


def sequence_of(
    one: PreparedJob, max_new_tokens: int, stop_at_eos: bool = True, stop: Callable[[list[int]], bool] | None = None
) -> Sequence:
    """A prepared job as one sequence of a batched decode: its before-forward hook as `run_job` hands it to
    `greedy_decode`, and whether its cache only grows while decoding (what lets it be stacked)."""
    return Sequence(
        one.job_cache.cache,
        one.logits,
        max_new_tokens,
        stop_at_eos,
        stop,
        before_forward=one.meter.before_forward,
        grows_only=one.job_cache.method.decode_grows_only() or not one.job_cache.applies,
    )


def decode_together(lm: LoadedModel, prepared: list[tuple[SampleState, Job, PreparedJob]], options: RunOptions) -> None:
    """Decode the prepared jobs in one batch and append each sample's row (building its reference from the full
    job's row, as `run_sample` does)."""
    sequences = []
    for state, _, one in prepared:
        stop_at_eos, stop, _ = stop_rule(lm, state.sample)
        sequences.append(sequence_of(one, state.sample.max_new_tokens, stop_at_eos, stop))
    # One stopwatch for the batch's decode phase (its time and peak are the batch's); rows keep their own.
    try:
        decoded, layout = batched_greedy_decode(lm, sequences, Stopwatch(lm.device))
    except Exception as err:
        if options.fail_fast:
            raise
        for state, job, _ in prepared:
            state.rows.append((job, error_fields(err)))
        return
    for (state, job, one), result in zip(prepared, decoded, strict=True):
        try:
            row = finish_job(lm, state.sample, one, result, state.stopwatch)
            row.update(
                batch_size=len(prepared),
                batch_attention=layout.attention,
                batch_padding_fraction=layout.padding_fraction,
            )
            reference_job, _ = ordered_jobs(state.jobs)
            if job is reference_job:
                state.reference_tried = True
                state.reference = reference_or_none(
                    options.fail_fast, lm, state.sample, state.prompt, state.split, state.pre, state.stopwatch,
                    row["output_ids"],
                )  # fmt: skip
                if state.reference is not None:
                    row.update(fidelity.reference_row_fields(state.reference))
        except Exception as err:
            if options.fail_fast:
                raise
            row = error_fields(err)
        state.rows.append((job, row))
