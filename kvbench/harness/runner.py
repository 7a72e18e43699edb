"""One sample through every (method, budget) job: prefill once, then copy -> compress -> decode -> score
(`run_sample`); and continuations scored after a shared context on compressed copies of its cache
(`score_continuations`, the lm-eval adapter's loglikelihood). Both kinds of rows get their measurement fields
from one builder, `RowMeter.fields`."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kvbench.engine.architecture import compressible_layers, describe
from kvbench.engine.cache import PAD_POSITION, IndexMappedObserver, KVCache, layer_subset
from kvbench.engine.generation import Prefill, forward_tokens, greedy_decode, prefill
from kvbench.engine.measure import Stopwatch
from kvbench.engine.models import LoadedModel
from kvbench.harness import fidelity
from kvbench.harness.budget import entries_for
from kvbench.harness.chunked import ChunkedPrefill, chunked_prefill, prefill_fields
from kvbench.harness.metrics import score
from kvbench.harness.options import RunOptions, check_compress
from kvbench.harness.prompt import Prompt, build_prompt
from kvbench.harness.sample import Sample
from kvbench.methods.base import CompressionContext, Method
from kvbench.methods.full import Full

log = logging.getLogger("kvbench")


@dataclass
class Job:
    """One (method, nominal budget) setting; `key` identifies its row for this sample."""

    method: Method
    budget: int | float | None
    key: str


def split_point(prompt: Prompt, compress: str) -> int:
    """compress=prompt: the whole prompt is prefilled and compressed (query-aware, the SnapKV setting);
    compress=context: only the tokens up to the end of the context are (query-agnostic; kvpress's setting only for
    methods that do not evict again while the question and the answer are fed, see `decode_evict`)."""
    check_compress(compress)
    return len(prompt) if compress == "prompt" else prompt.context_end


@dataclass
class JobCache:
    """One job's cache after compression, with what later forwards need."""

    cache: Any
    ctx: CompressionContext | None  # None: nothing was cached to compress (`score_continuations`, split=0)
    method: Method
    entries: int | None  # the budget in KV entries per KV head per layer for this prompt (None: keep all)
    applies: bool  # the method acts on this cache (it compresses and a budget is set, or it takes no budget)
    compressed: bool  # entries < prompt length: eviction ran
    phase: Any  # the stopwatch phase of setup + compression
    # What the method works on: the cache itself, or the layers it may compress (`engine.cache.layer_subset`).
    view: Any = None

    def before_forward(self, num_new: int) -> None:
        """Call before every forward after compression (decode-time methods evict here)."""
        if self.applies:
            self.method.before_forward(self.view if self.view is not None else self.cache, self.ctx, num_new)


def compress_copy(
    lm: LoadedModel,
    pre: Prefill,
    job: Job,
    input_ids: list[int],
    options: RunOptions,
    stopwatch: Stopwatch,
    prefill_stats: Any = None,
    copy: bool = True,
    reserve: int = 0,
    context_end: int | None = None,
) -> JobCache:
    """A copy of the prefilled cache of `input_ids` (the compressed segment), set up and compressed by the
    job's method at the job's budget. `copy=False`: the prefill's own cache (a chunked prefill is per job).
    `reserve`: tokens the caller will append afterwards (tail + decode), reserved once (`KVCache.reserve`).
    `context_end`: where the context ends in `input_ids`, when known (`CompressionContext.context_end`)."""
    cache = pre.cache.copy() if copy else pre.cache
    cache.decode_kernels = options.kernels  # this job's decode steps: the Triton kernel or the torch path
    cache.reserve(reserve)
    split = len(input_ids)
    entries = entries_for(job.budget, split)
    layers = compressible_layers(lm.layer_specs, options.layers)
    # A method that takes no budget (a quantiser alone) applies to every prompt with budget null; a policy that
    # leaves no layer to compress (layers=global on a model whose every layer is sliding) leaves the cache as is.
    applies = job.method.compresses and bool(layers) and (entries is not None or not job.method.takes_budget)
    compressed = applies and entries is not None and entries < split
    view = layer_subset(cache, layers) if job.method.compresses else cache
    ctx = CompressionContext.for_prompt(
        lm,
        entries if entries is not None else split,
        split,
        pre,
        layers=layers,
        seed=options.seed,
        input_ids=input_ids,
        prefill_stats=prefill_stats,
        cache_dir=options.cache_dir,
        kernels=options.kernels,
        context_end=context_end,
    )
    with stopwatch.phase("compress") as phase:
        if applies:
            job.method.setup(view, ctx)
        if compressed and copy:
            job.method.compress(view, ctx)
        if applies:
            job.method.after_compress(view, ctx)
    return JobCache(cache, ctx, job.method, entries, applies, compressed, phase, view)


def stop_on_strings(tokenizer: Any, strings: list[str]) -> Any:
    """A `greedy_decode` stop test: True once the decoded tokens contain one of `strings`."""
    longest = max(len(s) for s in strings)

    def stop(tokens: list[int]) -> bool:
        # Only the recent tokens can complete a new stop string; decoding a few more than its length is enough.
        text = tokenizer.decode(tokens[-(longest + 8) :], skip_special_tokens=True)
        return any(s in text for s in strings)

    return stop


def stop_rule(lm: LoadedModel, sample: Sample) -> tuple[bool, Any, list[str]]:
    """How greedy decoding of `sample` ends: (stop at EOS, stop test or None, stop strings)."""
    stop_at_eos = not sample.meta.get("ignore_eos", False)
    stop_strings = sample.meta.get("stop") or []  # lm-eval's `until`: greedy decoding ends at a stop string
    return stop_at_eos, (stop_on_strings(lm.tokenizer, stop_strings) if stop_strings else None), stop_strings


def cut_at_stop(text: str, strings: list[str]) -> str:
    """The text before the first stop string (lm-eval's `until` convention)."""
    for s in strings:
        text = text.split(s, 1)[0]
    return text


@dataclass
class PreparedJob:
    """A job's cache compressed and past its question tail, ready to decode (`prepare_job`), and what its row needs."""

    job_cache: JobCache
    meter: RowMeter
    pre: Prefill
    logits: torch.Tensor  # the logits the first generated token comes from
    tail_seconds: float
    kl_full: float | None
    reference: fidelity.Reference | None


def prepare_job(
    lm: LoadedModel,
    sample: Sample,
    prompt: Prompt,
    split: int,
    pre: Prefill,
    job: Job,
    options: RunOptions,
    stopwatch: Stopwatch,
    prefill_stats: Any = None,
    reference: fidelity.Reference | None = None,
) -> PreparedJob:
    """Compress a copy of `pre` (or a chunked prefill's own cache) by the job, feed the question tail and take the
    fidelity KL: everything a row does before decoding."""
    chunked = isinstance(pre, ChunkedPrefill)  # compressed between chunks already; this job's own cache
    tail = prompt.input_ids[split:]
    # The tail and every decode forward append to the cache: room for them is made once (by the compression's
    # compaction, or by the first append of an uncompressed copy), so a decode step writes one slot.
    job_cache = compress_copy(
        lm,
        pre,
        job,
        prompt.input_ids[:split],
        options,
        stopwatch,
        prefill_stats,
        copy=not chunked,
        reserve=len(tail) + max(sample.max_new_tokens - 1, 0),
        context_end=min(prompt.context_end, split),
    )
    cache, meter = job_cache.cache, RowMeter(lm, job_cache, split)
    with stopwatch.phase("tail") as tail_phase:
        if tail:
            meter.before_forward(len(tail))
            logits = forward_tokens(lm, cache, tail)
        else:
            logits = pre.last_logits
    if tail:
        meter.after_tail()
    kl_full = fidelity.kl_to_reference(lm, cache, logits, reference)  # on a copy, before decoding (not timed)
    return PreparedJob(job_cache, meter, pre, logits, tail_phase.seconds, kl_full, reference)


def finish_job(
    lm: LoadedModel, sample: Sample, prepared: PreparedJob, decoded: Any, stopwatch: Stopwatch
) -> dict[str, Any]:
    """The row of a prepared job once `decoded` (a `generation.Decoded` or a batched decode's share) is known."""
    prediction = cut_at_stop(lm.tokenizer.decode(decoded.tokens, skip_special_tokens=True), stop_rule(lm, sample)[2])
    return {
        **prepared.meter.fields(prepared.pre, prepared.tail_seconds, stopwatch),
        "max_layer_len_decode": decoded.max_layer_len,
        "decode_s": decoded.seconds,
        "tpot_s": decoded.seconds / decoded.steps if decoded.steps else None,
        "output_tokens": len(decoded.tokens),
        "output_ids": decoded.tokens,
        "prediction": prediction,
        "score": score(sample.metric, prediction, sample.answers),
        "peak_mem_decode_bytes": decoded.peak_mem_bytes,
        **fidelity.row_fields(prepared.reference, decoded.tokens, prepared.kl_full),
    }


def run_job(
    lm: LoadedModel,
    sample: Sample,
    prompt: Prompt,
    split: int,
    pre: Prefill,
    job: Job,
    options: RunOptions,
    stopwatch: Stopwatch,
    prefill_stats: Any = None,
    reference: fidelity.Reference | None = None,
) -> dict[str, Any]:
    """One job's row for a prefilled prompt: compress a copy of `pre` (or a chunked prefill's own cache), feed the
    question tail, decode greedily, score, and measure entries, bytes, times and fidelity."""
    prepared = prepare_job(lm, sample, prompt, split, pre, job, options, stopwatch, prefill_stats, reference)
    stop_at_eos, stop, _ = stop_rule(lm, sample)
    decoded = greedy_decode(
        lm,
        prepared.job_cache.cache,
        prepared.logits,
        sample.max_new_tokens,
        prepared.meter.before_forward,
        stopwatch,
        stop_at_eos,
        stop,
    )
    return finish_job(lm, sample, prepared, decoded, stopwatch)


class RowMeter:
    """Measures one job's cache from its compression to the end of its row: the state right after compression,
    the most bytes held (`PeakBytes`), and, in `fields`, the measurement fields every row of a compressed prompt
    carries. Generation rows (`run_job`) and scoring rows (`score_continuations`) both build them here, so the
    two kinds of rows name and compute their entries, bytes and times alike."""

    def __init__(self, lm: LoadedModel, job_cache: JobCache, split: int) -> None:
        self.lm = lm
        self.job_cache = job_cache
        self.split = split
        # What the uncompressed cache of the compressed segment holds (sliding layers: their window): kept fractions
        # and bits per element are relative to it.
        self.uncompressed_entries = lm.full_kv_entries(split)
        self.compressed_state = cache_state(job_cache.cache, split, self.uncompressed_entries, "_compressed")
        # A new token's bytes come from the model's shape (a quantised layer would have to materialise to tell).
        self.peak = PeakBytes(job_cache.cache, lm.kv_bytes_per_token)
        # A method whose compression held more KV than the cache (kvcompose's extra pass over a scratch copy) records
        # it as `transient_kv_bytes`: the peak counts it.
        record = job_cache.ctx.record if job_cache.ctx is not None else {}
        self.peak.bytes = max(self.peak.bytes, int(record.get("transient_kv_bytes", 0)))
        self.tail_state: dict[str, Any] = {}  # no question tail fed: no `*_tail` fields

    def before_forward(self, num_new: int) -> None:
        """Call before every forward after compression: the job's method may evict, the peak is tracked."""
        self.peak.observe()  # after the previous forward's evictions (some methods evict inside the forward)
        self.job_cache.before_forward(num_new)
        self.peak.observe(num_new)  # this forward appends num_new slots per head before any eviction inside it

    def after_tail(self) -> None:
        """Call right after feeding a question tail (compress=context): the row gets its `*_tail` fields."""
        self.tail_state = cache_state(
            self.job_cache.cache, self.split, self.uncompressed_entries, "_tail", logical=False
        )

    def fields(self, pre: Prefill, tail_seconds: float, stopwatch: Stopwatch) -> dict[str, Any]:
        """The row's measurement fields, at the end of the row (after everything it fed to the cache)."""
        job_cache, split = self.job_cache, self.split
        cache = job_cache.cache
        self.peak.observe()
        chunked = isinstance(pre, ChunkedPrefill)
        compress_s = job_cache.phase.seconds + (pre.compress_seconds if chunked else 0.0)  # chunked: between chunks
        # Bits held per element of the uncompressed prompt cache (2 L Hkv T d elements; sliding layers: their
        # window) right after compression: eviction and quantisation compare at equal bytes (16 for a full
        # fp16/bf16 cache, 32 for fp32).
        elements = self.lm.full_kv_bytes(split) / self.lm.element_size
        bits = 8 * self.compressed_state["kv_bytes_compressed"] / elements if split else None
        specs = self.lm.layer_specs
        return {
            "status": "ok",
            "compressed": job_cache.compressed,
            "budget_entries": job_cache.entries,
            # What the cache holds at the END of the row (after the question tail and decoding or scoring, during
            # which decode-time methods keep evicting); `kept_fraction` is the share of the compressed segment's
            # entries still held. `*_compressed`: right after the prefill compression; `*_tail`: after the
            # question tail (compress=context); `kv_bytes_peak`: the most held at any point after compression (and
            # during it, for methods that record `transient_kv_bytes`).
            **cache_state(cache, split, self.uncompressed_entries),
            **self.compressed_state,
            **self.tail_state,
            "kv_bytes_peak": self.peak.bytes,
            "bits_per_element": bits,
            # Per layer type (full / sliding / chunked / state) at the end of the row, and which layers the method
            # was handed (`layers=global|all`): on models with sliding or state layers the whole-cache ratio is
            # kv_bytes / kv_bytes_full, not the budget's share of the compressed layers.
            "kv_bytes_by_type": cache.kv_bytes_by_type(),
            "compressed_layers": describe(
                [specs[i] for i in job_cache.view.indices] if hasattr(job_cache.view, "indices") else specs
            ),
            "kv_bytes_full": pre.kv_bytes_full if chunked else pre.cache.kv_bytes(),
            "kv_bytes_reserved": cache.reserved_kv_bytes(),  # held + capacity reserved for appends, at the end
            "prefill_s": pre.seconds,
            "compress_s": compress_s,
            "tail_s": tail_seconds,
            "ttft_s": pre.seconds + compress_s + tail_seconds,
            "peak_mem_prefill_bytes": pre.peak_mem_bytes,
            "peak_mem_kind": stopwatch.memory_kind,
            "method_record": (job_cache.ctx.record or None) if job_cache.ctx is not None else None,
            **prefill_fields(pre, split),
        }


def prompt_fields(prompt_tokens: int | None, split: int | None, truncated_tokens: int | None) -> dict[str, Any]:
    """The row fields that say how long the prompt was and how much of it was compressed or truncated."""
    return {"prompt_tokens": prompt_tokens, "compressed_tokens": split, "truncated_tokens": truncated_tokens}


def shared_prefill(
    lm: LoadedModel,
    token_ids: list[int],
    methods: list[Method],
    stopwatch: Stopwatch,
    cache: KVCache | None = None,
    layers: list[int] | None = None,
) -> tuple[Prefill, dict[int, Any]]:
    """Prefill `token_ids` once for every method: the window queries the methods need are recorded and each
    method object's prefill observer watches (a budget sweep shares it, e.g. H2O's attention sums). Returns
    the prefill and the observers by `id(method)` (handed to `compress_copy` as `prefill_stats`). `cache`: a
    cache already holding the prompt's start (`generation.prefill`); the observers then see only `token_ids`."""
    window = max((method.window_queries_needed() for method in methods), default=0)
    observers: dict[int, Any] = {}
    for method in methods:
        if id(method) not in observers:
            observers[id(method)] = method.prefill_observer()
    attached = [obs for obs in observers.values() if obs is not None]
    for observer in attached:  # observers that need the model (e.g. its RoPE) get it before the prefill
        if hasattr(observer, "bind_model"):
            observer.bind_model(lm)
    if layers is not None and layers != list(range(len(lm.layer_specs))):
        # Methods number the layers they compress 0..n-1 (`engine.cache.LayerSubset`): so do their observers.
        attached = [IndexMappedObserver(attached, {real: i for i, real in enumerate(layers)})]
    return prefill(lm, token_ids, min(window, len(token_ids)), stopwatch, attached, cache), observers


def cache_state(cache: KVCache, split: int, uncompressed_entries: int, suffix: str = "", logical: bool = True) -> dict:
    """Entries and bytes `cache` holds now, as row fields named with `suffix`. `kept_fraction` counts only the
    slots of the compressed segment (original position < split), so appended tokens never inflate it, relative to
    `uncompressed_entries`, the entries the uncompressed cache of the segment holds (`LoadedModel.full_kv_entries`)."""
    layers = [layer for layer in cache.layers if layer.spec.attends]
    if not any(layer.is_initialized for layer in layers):  # nothing cached yet (an empty scoring context)
        kept, in_context = [[0] for _ in layers], 0
    else:
        kept = cache.kept_per_layer()
        in_context = sum(int(((layer.positions < split) & (layer.positions != PAD_POSITION)).sum()) for layer in layers)
    state = {
        "kept_entries": sum(sum(h) for h in kept),
        "kept_per_layer": [sum(h) / len(h) for h in kept],
        "kept_fraction": in_context / uncompressed_entries if split and uncompressed_entries else 0.0,
        "kv_bytes": cache.kv_bytes(),
    }
    if logical:
        state["kv_bytes_logical"] = cache.logical_kv_bytes()
    return {f"{name}{suffix}": value for name, value in state.items()}


class PeakBytes:
    """The largest `cache.kv_bytes()` seen, counting the slots a forward is about to append (it holds them
    before any eviction inside it). Sizes only: no tensor is read, so no per-step synchronisation."""

    def __init__(self, cache: KVCache, bytes_per_token: int) -> None:
        self.cache = cache
        self.per_token = bytes_per_token
        self.bytes = cache.kv_bytes()

    def observe(self, appending: int = 0) -> None:
        self.bytes = max(self.bytes, self.cache.kv_bytes() + appending * self.per_token)


def run_sample(
    lm: LoadedModel,
    sample: Sample,
    jobs: list[Job],
    options: RunOptions,
    prompt: Prompt | None = None,
) -> Iterator[tuple[Job, dict[str, Any]]]:
    """Yield (job, row) for every job of a single-prompt sample; a failure becomes an error row (or raises with
    `options.fail_fast`). `options.kernels` must be resolved (`RunOptions.resolved`).

    The prompt is prefilled once; every job works on its own copy of that cache. With `prefill_chunk`, every
    job prefills on its own instead, compressing between chunks (`kvbench.harness.chunked`). `prompt`: already
    tokenised input (the lm-eval adapter's), used instead of building one from the sample. Multi-turn, reuse and
    edit samples are run by their scenario (`kvbench.scenarios`), which builds on the functions of this module.
    """
    options = options.resolved(lm.device)  # as handed when the caller resolved them (the API does, once per run)
    compress, fail_fast, prefill_chunk = options.compress, options.fail_fast, options.prefill_chunk
    stopwatch = Stopwatch(lm.device)
    base = prompt_fields(None, None, None)
    pre: Prefill | None = None
    observers: dict[int, Any] = {}
    try:
        if prompt is None:
            prompt = build_prompt(lm.tokenizer, sample, lm.max_context - sample.max_new_tokens)
        split = split_point(prompt, compress)
        base = prompt_fields(len(prompt), split, prompt.truncated_tokens)
        if prefill_chunk is None:
            layers = compressible_layers(lm.layer_specs, options.layers)
            pre, observers = shared_prefill(
                lm, prompt.input_ids[:split], [job.method for job in jobs], stopwatch, layers=layers
            )
    except Exception as err:
        if fail_fast:
            raise
        for job in jobs:
            yield job, {**base, **error_fields(err)}
        return
    # Fidelity metrics compare every row with the full cache's continuation: the full job runs first and its
    # output becomes the reference; without one in the sweep the reference is decoded once, before the first job.
    reference_job = next((job for job in jobs if not job.method.compresses), None)
    ordered = ([reference_job] if reference_job else []) + [job for job in jobs if job is not reference_job]
    reference: fidelity.Reference | None = None
    reference_tried = False
    for job in ordered:
        try:
            if not reference_tried and reference_job is None:
                reference_tried = True
                reference = reference_or_none(fail_fast, lm, sample, prompt, split, pre, stopwatch, None, prefill_chunk)
            stats = observers.get(id(job.method))
            if prefill_chunk is not None:
                ids, method = prompt.input_ids[:split], job.method
                pre = chunked_prefill(
                    lm,
                    ids,
                    prefill_chunk,
                    method,
                    job.budget,
                    stopwatch,
                    options.seed,
                    options.cache_dir,
                    options.kernels,
                )
                stats = pre.prefill_stats
            row = run_job(lm, sample, prompt, split, pre, job, options, stopwatch, stats, reference)
            if job is reference_job:
                reference_tried = True
                reference = reference_or_none(fail_fast, lm, sample, prompt, split, pre, stopwatch, row["output_ids"])
                if reference is not None:
                    row.update(fidelity.reference_row_fields(reference))
            if prefill_chunk is not None:
                pre = stats = None  # free this job's cache before the next job prefills
        except Exception as err:
            if fail_fast:
                raise
            row = error_fields(err)
        yield job, {**base, **row}


@dataclass
class ScoredContinuation:
    """One continuation scored after its context: the summed log-probability of its tokens, whether each was
    the argmax, and the row's measurements (`prompt_fields` + `RowMeter.fields`, as a generation row's, plus
    `continuation_tokens`, `score_s`, `logprob`, `is_greedy`)."""

    logprob: float
    is_greedy: bool
    row: dict[str, Any]


def empty_prefill(lm: LoadedModel) -> Prefill:
    """The prefill of no tokens: an empty cache, nothing timed."""
    cache = KVCache(lm.layer_specs)
    return Prefill(cache, torch.empty(0), [], None, 1.0, 0.0, None)


def score_continuations(
    lm: LoadedModel,
    context_ids: list[int],
    continuations: list[list[int]],
    job: Job,
    options: RunOptions,
    split: int,
    truncated_tokens: int = 0,
) -> Iterator[ScoredContinuation]:
    """Score every continuation of `context_ids` on its own compressed copy of the context's cache.

    `context_ids[:split]` is prefilled once (`shared_prefill`); per continuation, `compress_copy` compresses a copy
    at the job's budget, `context_ids[split:-1]` (the protected tail, compress=context) is fed as the row's tail,
    then `[context_ids[-1]] + continuation[:-1]` at the original positions, whose logits score the continuation.
    `split` is at most `len(context_ids) - 1`: the last context token is never compressed, so the first continuation
    token, too, is scored on the compressed cache (prefilling all of the context would score it on the full one).
    `split=0` (a one-token context, e.g. a beginning-of-text token): nothing is prefilled or compressed.
    `job` gives the method and the budget (the rows' identity is the caller's); `truncated_tokens`: context tokens
    the caller cut, recorded in the rows. Continuations are scored lazily, one copy at a time; errors raise (no
    error rows)."""
    if not 0 <= split < len(context_ids):
        raise ValueError(f"split must be in [0, {len(context_ids) - 1}] for a context of {len(context_ids)} tokens")
    options = options.resolved(lm.device)  # as handed when the caller resolved them (the API does, once per run)
    stopwatch = Stopwatch(lm.device)
    compressed_ids, tail = context_ids[:split], context_ids[split:-1]
    stats = None
    if split:
        pre, observers = shared_prefill(
            lm, compressed_ids, [job.method], stopwatch, layers=compressible_layers(lm.layer_specs, options.layers)
        )
        stats = observers.get(id(job.method))
    else:
        pre = empty_prefill(lm)
    for continuation in continuations:
        if not continuation:
            raise ValueError("an empty continuation has nothing to score")
        feed = [context_ids[-1], *continuation[:-1]]
        if split:
            reserve = len(tail) + len(feed)
            job_cache = compress_copy(lm, pre, job, compressed_ids, options, stopwatch, stats, reserve=reserve)
        else:
            with stopwatch.phase("compress") as phase:  # nothing cached: nothing for the method to compress
                cache = pre.cache.copy()
            job_cache = JobCache(cache, None, job.method, None, False, False, phase)
        meter = RowMeter(lm, job_cache, split)
        with stopwatch.phase("tail") as tail_phase:
            if tail:
                meter.before_forward(len(tail))
                forward_tokens(lm, job_cache.cache, tail)
        if tail:
            meter.after_tail()
        meter.before_forward(len(feed))
        with stopwatch.phase("score") as score_phase:
            logits = forward_tokens(lm, job_cache.cache, feed, logits_to_keep=len(feed))
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(continuation, device=logprobs.device)
        logprob = float(logprobs.gather(1, target[:, None]).sum())
        greedy = bool((logprobs.argmax(dim=-1) == target).all())
        row = {
            **prompt_fields(len(context_ids), split, truncated_tokens),
            **meter.fields(pre, tail_phase.seconds, stopwatch),
            "continuation_tokens": len(continuation),
            "score_s": score_phase.seconds,
            "logprob": logprob,
            "is_greedy": greedy,
            "score": None,
        }
        yield ScoredContinuation(logprob, greedy, row)


def build_reference(
    lm: LoadedModel,
    sample: Sample,
    prompt: Prompt,
    split: int,
    pre: Prefill | None,
    stopwatch: Stopwatch,
    tokens: list[int] | None = None,
    prefill_chunk: int | None = None,
) -> fidelity.Reference:
    """This sample's full-cache reference (`kvbench.harness.fidelity`). With `tokens`, the full job's output, from that
    job's prefill `pre` (chunked: its own cache, which it no longer needs). Without, decoded once: from a copy of
    the shared prefill, or in chunked mode from a chunked prefill of its own (a full cache, as the full job's)."""
    tail = prompt.input_ids[split:]
    if tokens is not None:
        cache = pre.cache if isinstance(pre, ChunkedPrefill) else pre.cache.copy()
        return fidelity.build_reference(lm, cache, split, tail, pre.last_logits, tokens, "full_row")
    if prefill_chunk is not None:
        pre = chunked_prefill(lm, prompt.input_ids[:split], prefill_chunk, Full(), None, stopwatch)
        cache = pre.cache
    else:
        cache = pre.cache.copy()
    stop_at_eos, stop, _ = stop_rule(lm, sample)
    max_new = sample.max_new_tokens
    return fidelity.decode_reference(lm, cache, split, tail, pre.last_logits, max_new, stop_at_eos, stop, stopwatch)


def reference_or_none(fail_fast: bool, *args: Any) -> fidelity.Reference | None:
    """`build_reference(*args)`; one that cannot be built leaves the rows' fidelity fields null instead of failing
    them (or raises with fail_fast)."""
    try:
        return build_reference(*args)
    except Exception as err:
        if fail_fast:
            raise
        log.warning("full-cache reference for the fidelity metrics failed (%s: %s)", type(err).__name__, err)
        return None


def error_fields(err: BaseException) -> dict[str, Any]:
    return {
        "status": "error",
        "error": f"{type(err).__name__}: {err}",
        "traceback": "".join(traceback.format_exception(err))[-4000:],
        "score": None,
    }
