"""One sample through every (method, budget) job: prefill once, then copy -> compress -> decode -> score."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kvbench.engine.cache import PAD_POSITION, KVCache
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
    ctx: CompressionContext
    method: Method
    entries: int | None  # the budget in KV entries per KV head per layer for this prompt (None: keep all)
    applies: bool  # the method acts on this cache (it compresses and a budget is set, or it takes no budget)
    compressed: bool  # entries < prompt length: eviction ran
    phase: Any  # the stopwatch phase of setup + compression

    def before_forward(self, num_new: int) -> None:
        """Call before every forward after compression (decode-time methods evict here)."""
        if self.applies:
            self.method.before_forward(self.cache, self.ctx, num_new)


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
) -> JobCache:
    """A copy of the prefilled cache of `input_ids` (the compressed segment), set up and compressed by the
    job's method at the job's budget. `copy=False`: the prefill's own cache (a chunked prefill is per job).
    `reserve`: tokens the caller will append afterwards (tail + decode), reserved once (`KVCache.reserve`)."""
    cache = pre.cache.copy() if copy else pre.cache
    cache.decode_kernels = options.kernels  # this job's decode steps: the Triton kernel or the torch path
    cache.reserve(reserve)
    split = len(input_ids)
    entries = entries_for(job.budget, split)
    # A method that takes no budget (a quantiser alone) applies to every prompt with budget null.
    applies = job.method.compresses and (entries is not None or not job.method.takes_budget)
    compressed = applies and entries is not None and entries < split
    ctx = CompressionContext.for_prompt(
        lm,
        entries if entries is not None else split,
        split,
        pre,
        seed=options.seed,
        input_ids=input_ids,
        prefill_stats=prefill_stats,
        cache_dir=options.cache_dir,
        kernels=options.kernels,
    )
    with stopwatch.phase("compress") as phase:
        if applies:
            job.method.setup(cache, ctx)
        if compressed and copy:
            job.method.compress(cache, ctx)
        if applies:
            job.method.after_compress(cache, ctx)
    return JobCache(cache, ctx, job.method, entries, applies, compressed, phase)


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
    )
    cache, ctx, compressed, entries = job_cache.cache, job_cache.ctx, job_cache.compressed, job_cache.entries
    compress_phase = job_cache.phase
    config = lm.config
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    compressed_state = cache_state(cache, split, layers * heads, "_compressed")
    # One new token adds a K and a V vector of the model's dtype per KV head per layer (from the config: a
    # quantised layer would have to materialise its tensors to tell).
    peak = PeakBytes(cache, layers * heads * 2 * head_dim * torch.empty((), dtype=lm.dtype).element_size())

    def before_forward(num_new: int) -> None:
        peak.observe()  # after the previous forward's evictions (some methods evict inside the forward)
        job_cache.before_forward(num_new)
        peak.observe(num_new)  # this forward appends num_new slots per head before any eviction inside it

    with stopwatch.phase("tail") as tail_phase:
        if tail:
            before_forward(len(tail))
            logits = forward_tokens(lm, cache, tail)
        else:
            logits = pre.last_logits
    tail_state = cache_state(cache, split, layers * heads, "_tail", logical=False) if tail else {}
    kl_full = fidelity.kl_to_reference(lm, cache, logits, reference)  # on a copy, before decoding (not timed)
    stop_at_eos, stop, stop_strings = stop_rule(lm, sample)
    decoded = greedy_decode(lm, cache, logits, sample.max_new_tokens, before_forward, stopwatch, stop_at_eos, stop)
    peak.observe()
    prediction = cut_at_stop(lm.tokenizer.decode(decoded.tokens, skip_special_tokens=True), stop_strings)
    compress_s = compress_phase.seconds + (pre.compress_seconds if chunked else 0.0)  # chunked: between chunks too
    return {
        "status": "ok",
        "compressed": compressed,
        "budget_entries": entries,
        # What the cache holds at the END of the row (after the question tail and decoding, during which
        # decode-time methods keep evicting); `kept_fraction` is the share of the compressed segment's entries
        # still held. `*_compressed`: right after the prefill compression; `*_tail`: after the question tail
        # (compress=context); `kv_bytes_peak`: the most held at any point after compression.
        **cache_state(cache, split, layers * heads),
        **compressed_state,
        **tail_state,
        "kv_bytes_peak": peak.bytes,
        # Bits held per element of the uncompressed prompt cache (2 L Hkv T d elements) right after compression:
        # eviction and quantisation compare at equal bytes (16 for a full fp16/bf16 cache, 32 for fp32).
        "bits_per_element": 8 * compressed_state["kv_bytes_compressed"] / (2 * layers * heads * split * head_dim),
        "kv_bytes_full": pre.kv_bytes_full if chunked else pre.cache.kv_bytes(),
        "kv_bytes_reserved": cache.reserved_kv_bytes(),  # held + capacity reserved for appends, at the end
        "max_layer_len_decode": decoded.max_layer_len,
        "prefill_s": pre.seconds,
        "compress_s": compress_s,
        "tail_s": tail_phase.seconds,
        "ttft_s": pre.seconds + compress_s + tail_phase.seconds,
        "decode_s": decoded.seconds,
        "tpot_s": decoded.seconds / decoded.steps if decoded.steps else None,
        "output_tokens": len(decoded.tokens),
        "output_ids": decoded.tokens,
        "prediction": prediction,
        "score": score(sample.metric, prediction, sample.answers),
        "peak_mem_prefill_bytes": pre.peak_mem_bytes,
        "peak_mem_decode_bytes": decoded.peak_mem_bytes,
        "peak_mem_kind": stopwatch.memory_kind,
        "method_record": ctx.record or None,
        **prefill_fields(pre, split),
        **fidelity.row_fields(reference, decoded.tokens, kl_full),
    }


def shared_prefill(
    lm: LoadedModel, token_ids: list[int], methods: list[Method], stopwatch: Stopwatch, cache: KVCache | None = None
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
    return prefill(lm, token_ids, min(window, len(token_ids)), stopwatch, attached, cache), observers


def cache_state(cache: KVCache, split: int, layer_heads: int, suffix: str = "", logical: bool = True) -> dict:
    """Entries and bytes `cache` holds now, as row fields named with `suffix`. `kept_fraction` counts only the
    slots of the compressed segment (original position < split), so appended tokens never inflate it."""
    kept = cache.kept_per_layer()
    in_context = sum(
        int(((layer.positions < split) & (layer.positions != PAD_POSITION)).sum()) for layer in cache.layers
    )
    state = {
        "kept_entries": sum(sum(h) for h in kept),
        "kept_per_layer": [sum(h) / len(h) for h in kept],
        "kept_fraction": in_context / (split * layer_heads),
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
    if options.kernels not in ("torch", "triton"):  # a caller that did not resolve them (the API does, once)
        options = options.resolved(lm.device)
    compress, fail_fast, prefill_chunk = options.compress, options.fail_fast, options.prefill_chunk
    stopwatch = Stopwatch(lm.device)
    base = {"prompt_tokens": None, "compressed_tokens": None, "truncated_tokens": None}
    pre: Prefill | None = None
    observers: dict[int, Any] = {}
    try:
        if prompt is None:
            prompt = build_prompt(lm.tokenizer, sample, lm.max_context - sample.max_new_tokens)
        split = split_point(prompt, compress)
        base = {
            "prompt_tokens": len(prompt),
            "compressed_tokens": split,
            "truncated_tokens": prompt.truncated_tokens,
        }
        if prefill_chunk is None:
            pre, observers = shared_prefill(lm, prompt.input_ids[:split], [job.method for job in jobs], stopwatch)
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
