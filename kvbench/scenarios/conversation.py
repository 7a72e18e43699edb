"""The conversation scenario: one KV cache per dialogue and job, grown turn by turn, one row per turn.

For every (method, budget) job the cache starts as a copy of the dialogue's first user turn, prefilled once for all
jobs (a budget sweep shares that prefill), set up and compressed by `kvbench.harness.runner.compress_copy` exactly
as the single-prompt runner does, so turn 1 is the single-prompt setting. Every later turn appends, in one forward,
the last token of the previous answer, the template's end-of-turn tokens and the new user message (chat-templated,
up to the assistant turn start and the turn's answer prefix); the answer is decoded greedily with the method's
decode-time rule (`before_forward` before every forward, so streamingllm / h2o / scorers with `decode_budget` keep
their cap while answering and kv_direct keeps its checkpoints) and appended.

Budget: an int, the KV entries per KV head per layer (window included) the cache is brought back to whenever a
compression point finds it larger: a fixed memory cap for the whole conversation, as in streaming chat. Between
compression points the cache grows by what is appended (the next user message, the answer unless the method
evicts while decoding); rows report the bytes at the end of the turn and the peak. Float budgets (fractions) are
refused: the conversation has no fixed prompt to take a fraction of.

Compression points (`policy`):
* `over_budget` (default): right after each user message is prefilled. The method then scores with that
  message's queries (the SnapKV/PyramidKV prompt setting: the question is in the observation window) and the
  cache is within budget before the answer is decoded, so the cap holds during decoding too. Turn 1 is thus
  identical to the single-prompt runner with compress=prompt.
* `after_turn`: once per turn, after the answer (the compaction a chat server does between requests; query-
  agnostic for the next question). The next message and its answer are held on top of the budget.

`compress_older_than=k`: the entries of the last k turns (the current one included) are never touched; the
method runs on a cache holding only the older turns' slots (their K/V, positions and per-slot state; the window
queries are the latest ones) with the job's budget, so the cache holds at most budget + the last k turns. The
older part is scored at the policy's point and the kept slots are applied at the end of the turn (the answer is
decoded with the older turns still whole): on CUDA the scoring runs on a side stream in a helper thread while the
answer is decoded (rows: `compress_overlapped`), on CPU synchronously before decoding (`compress_overlapped`
false). Methods that evict while decoding would touch the last k turns and are refused in one line. The copy of
the older slots being scored is transient and not counted in `kv_bytes_peak` (the cache's own bytes).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from kvbench.engine.cache import PAD_POSITION, KVCache
from kvbench.engine.generation import Prefill, QueryRecorder, forward_tokens, greedy_decode
from kvbench.engine.measure import Stopwatch
from kvbench.engine.models import LoadedModel
from kvbench.harness.metrics import score
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, JobCache, PeakBytes, compress_copy, error_fields, shared_prefill
from kvbench.harness.sample import Sample
from kvbench.methods.base import CompressionContext, Method
from kvbench.scenarios import register_scenario
from kvbench.scenarios.dialogue import POLICIES, SCENARIO, Pieces, Turn, dialogue_pieces, overflow_turn

__all__ = ["POLICIES", "SCENARIO", "run_conversation"]


def check_dialogue_fits(sample_id: str, pieces: Pieces, turns: list[Turn], max_context: int) -> None:
    """Refuse a dialogue whose turns may run past the model's context, naming the first turn that does."""
    overflow = overflow_turn(pieces, turns, max_context)
    if overflow is not None:
        raise ValueError(
            f"{sample_id} overflows the model's context of {max_context} tokens at turn {overflow[0]} "
            f"(up to {overflow[1]} tokens by its end); use fewer or shorter turns"
        )


def check_job(job: Job, older: int | None) -> None:
    """One-line refusals of settings the conversation cannot honour (before any model work)."""
    if isinstance(job.budget, float):
        raise ValueError(
            f"task=conversation takes int budgets (KV entries per KV head per layer held across the conversation) "
            f"or null, got {job.budget}"
        )
    if job.method.needs_fresh_prefill and job.budget is not None:
        raise ValueError(
            f"{job.method.name} compresses only a freshly prefilled full prompt cache; task=conversation re-compresses "
            "a growing cache every turn. Use a method that scores the cache it is given (snapkv, h2o, tova, ...)"
        )
    if older is None or not job.method.compresses:
        return
    method = job.method
    if method.name == "kv_direct":
        raise ValueError("compress_older_than does not apply to kv_direct: it keeps the newest `budget` tokens as K/V")
    if getattr(method, "decode_evict", False):
        raise ValueError(
            f"compress_older_than={older} keeps the last {older} turns intact, but {method.name} evicts while "
            "decoding; set method.decode_evict=false"
        )
    if getattr(method, "decode_budget", None) is not None:
        raise ValueError(
            f"compress_older_than={older} keeps the last {older} turns intact, but {method.name} evicts while "
            "decoding; set method.decode_budget=null"
        )


def window_recorder(method: Method, pre: Prefill) -> QueryRecorder | None:
    """The latest `window` queries of every forward, seeded with the first turn's: what a compression point
    gives the method as its observation window."""
    window = method.window_queries_needed()
    if window <= 0:
        return None
    recorder = QueryRecorder(window)
    recorder.queries = {i: q[:, -window:].clone() for i, q in enumerate(pre.window_queries)}
    recorder.positions = None if pre.window_positions is None else pre.window_positions[-window:].clone()
    recorder.scaling = pre.scaling
    return recorder


def context_now(job_cache: JobCache, recorder: QueryRecorder | None, entries: int, ids: list[int]) -> Any:
    """The compression context at a compression point: the budget, the tokens so far, the latest queries."""
    fields: dict[str, Any] = {"budget": entries, "prompt_len": len(ids), "input_ids": list(ids)}
    if recorder is not None and recorder.queries:
        fields.update(
            window_queries=[recorder.queries[i] for i in range(len(recorder.queries))],
            window_positions=recorder.positions,
            scaling=recorder.scaling,
        )
    return dataclasses.replace(job_cache.ctx, **fields)


def over_budget(cache: KVCache, entries: int) -> bool:
    return max(layer.get_seq_length() for layer in cache.layers) > entries


def keep_where(layer: Any, mask: torch.Tensor) -> None:
    """Keep the slots where `mask` `[Hkv, L]` is True (heads may keep different counts: padding)."""
    if bool(mask.all()):
        return
    counts = mask.sum(dim=-1)
    kept = int(counts.max())
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :kept]  # kept slots first, in order
    valid = torch.arange(kept, device=mask.device)[None] < counts[:, None]
    layer.keep(order, None if bool(valid.all()) else valid)


def older_part(cache: KVCache, boundary: int) -> KVCache:
    """A cache holding only the slots with positions < `boundary` (with their per-slot state)."""
    part = KVCache(0)
    part.seen_tokens = cache.seen_tokens
    for layer in cache.layers:
        sub = layer.copy()
        keep_where(sub, sub.positions < boundary)
        part.layers.append(sub)
    return part


def apply_older(cache: KVCache, part: KVCache, boundary: int) -> None:
    """Keep, in every layer, the older slots `part` kept and every slot from `boundary` on."""
    for layer, sub in zip(cache.layers, part.layers, strict=True):
        positions = layer.positions
        kept_old = (positions[:, :, None] == sub.positions[:, None, :]).any(dim=-1)
        keep_where(layer, ((positions >= boundary) | kept_old) & (positions != PAD_POSITION))


class OlderCompression:
    """Compression of the turns older than the last k: scored on a copy of the older slots (built now, on the
    calling thread), on a CUDA side stream in a helper thread when a GPU is present, applied by `finish`."""

    def __init__(self, method: Method, cache: KVCache, ctx: CompressionContext, boundary: int) -> None:
        self.boundary = boundary
        self.part = older_part(cache, boundary)
        self.side_seconds = 0.0
        self.future: concurrent.futures.Future | None = None
        self.stream = None
        if cache.layers[0].keys.is_cuda:
            device = cache.layers[0].keys.device
            self.stream = torch.cuda.Stream(device=device)
            self.stream.wait_stream(torch.cuda.current_stream(device))
            self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
            self.future = self.executor.submit(self._run, method, ctx)
        else:
            self._run(method, ctx)

    @property
    def overlapped(self) -> bool:
        return self.future is not None

    def _run(self, method: Method, ctx: CompressionContext) -> None:
        start = time.perf_counter()
        with torch.inference_mode():
            if self.stream is not None:
                with torch.cuda.stream(self.stream):
                    method.compress(self.part, ctx)
                self.stream.synchronize()
            else:
                method.compress(self.part, ctx)
        self.side_seconds = time.perf_counter() - start

    def finish(self, cache: KVCache) -> None:
        if self.future is not None:
            self.future.result()
            self.executor.shutdown()
            torch.cuda.current_stream(cache.layers[0].keys.device).wait_stream(self.stream)
        apply_older(cache, self.part, self.boundary)


@dataclasses.dataclass
class TurnState:
    """What a turn's row needs from the running conversation."""

    ids: list[int]  # every token forwarded so far (the cache's positions 0..len-1)
    starts: list[int]  # position of each turn's first user-piece token
    pending: list[int]  # tokens still to append before the next user piece (last answer token, end of turn)


def run_dialogue_job(
    lm: LoadedModel,
    turns: list[Turn],
    pieces: Pieces,
    pre: Prefill,
    prefill_stats: Any,
    job: Job,
    settings: RunOptions,
    policy: str,
    older: int | None,
    on_turn_end: Callable[[int, KVCache, TurnState], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """The rows of one job, one per turn (the last one with job_complete). `on_turn_end(turn index, cache, state)`
    sees the cache at the end of every turn (tests check what it holds)."""
    stopwatch = Stopwatch(lm.device)
    layers, heads = lm.config.num_hidden_layers, lm.config.num_key_value_heads
    per_token = lm.kv_bytes_per_token
    entries: int | None = job.budget  # type: ignore[assignment]  (check_job refused floats)
    # Turn 1 compresses like the single-prompt runner unless compression waits for the end of the turn.
    defer = policy == "after_turn" or older is not None
    first = pieces.user[0]
    source = dataclasses.replace(pre, cache=pre.cache.copy()) if defer else pre
    job_cache = compress_copy(
        lm,
        source,
        job,
        first,
        settings,
        stopwatch,
        prefill_stats,
        copy=not defer,
        reserve=turns[0].max_new_tokens,
    )
    cache = job_cache.cache
    acts = job_cache.applies and entries is not None  # compression points compress
    recorder = window_recorder(job.method, pre)
    if recorder is not None:
        cache.observers.append(recorder)
    state = TurnState(ids=list(first), starts=[0], pending=[])
    for index, turn in enumerate(turns):
        peak = PeakBytes(cache, per_token)

        def before_forward(num_new: int, peak: PeakBytes = peak) -> None:
            peak.observe()
            job_cache.before_forward(num_new)
            peak.observe(num_new)

        compressed, compress_s, overlapped, side_s = False, 0.0, False, None
        if index == 0:
            logits, prefill_s, prefill_peak = pre.last_logits, pre.seconds, pre.peak_mem_bytes
            compressed = job_cache.compressed and not defer
            compress_s = job_cache.phase.seconds
            forwarded = len(first)
        else:
            ids = state.pending + pieces.user[index]
            state.starts.append(cache.seen_tokens + len(state.pending))
            cache.reserve(len(ids) + turn.max_new_tokens - 1)
            with stopwatch.phase("prefill") as phase:
                before_forward(len(ids))
                logits = forward_tokens(lm, cache, ids)
            state.ids += ids
            forwarded = len(ids)
            prefill_s, prefill_peak = phase.seconds, phase.peak_mem_bytes
        peak.observe()
        older_job: OlderCompression | None = None
        if acts and policy == "over_budget" and index > 0:
            with stopwatch.phase("compress") as phase:
                if older is None and over_budget(cache, entries):
                    job.method.compress(cache, context_now(job_cache, recorder, entries, state.ids))
                    compressed = True
                elif older is not None:
                    older_job = start_older(job.method, cache, job_cache, recorder, entries, state, index, older)
            compress_s += phase.seconds
        ttft_s = prefill_s + compress_s
        decoded = greedy_decode(lm, cache, logits, turn.max_new_tokens, before_forward, stopwatch)
        state.ids += decoded.tokens[:-1]  # forwarded while decoding; the last one opens the next turn
        peak.observe()
        with stopwatch.phase("compress") as phase:
            if acts and policy == "after_turn":
                if older is None and over_budget(cache, entries):
                    job.method.compress(cache, context_now(job_cache, recorder, entries, state.ids))
                    compressed = True
                elif older is not None:
                    older_job = start_older(job.method, cache, job_cache, recorder, entries, state, index, older)
            if older_job is not None:
                older_job.finish(cache)
                compressed, overlapped, side_s = True, older_job.overlapped, older_job.side_seconds
        compress_s += phase.seconds
        if on_turn_end is not None:
            on_turn_end(index, cache, state)
        last = decoded.tokens[-1]
        state.pending = [last, *pieces.appended_end(last)]
        prediction = lm.tokenizer.decode(decoded.tokens, skip_special_tokens=True)
        seen = cache.seen_tokens
        kept = cache.kept_entries()
        yield {
            "status": "ok",
            "part": f"turn{turn.index:02d}",
            "turn": turn.index,
            "turn_kind": turn.kind,
            "has_question": turn.has_question,
            # Turns without a question have no score (null, never 0: summaries and figures skip them).
            "score": score("string_match_all", prediction, list(turn.answers)) if turn.has_question else None,
            "turn_answers": list(turn.answers),
            "prediction": prediction,
            "output_ids": decoded.tokens,
            "output_tokens": len(decoded.tokens),
            # Tokens forwarded to open this turn: the previous answer's last token and end of turn, the user piece.
            "prompt_tokens": forwarded,
            "turn_tokens": len(pieces.user[index]),
            # Tokens of the dialogue so far: everything forwarded plus the answer's last token (appended next turn).
            "conversation_tokens": seen + 1,
            "policy": policy,
            "compress_older_than": older,
            "budget_entries": entries,
            "compressed": compressed,
            "compress_overlapped": overlapped,
            "compress_side_s": side_s,
            "kept_entries": kept,
            "kept_fraction": kept / (seen * layers * heads),
            # What the cache holds at the end of the turn, the most it held during the turn, and a full cache of
            # the same tokens.
            "kv_bytes": cache.kv_bytes(),
            "kv_bytes_peak": peak.bytes,
            "kv_bytes_full": seen * per_token,
            "kv_bytes_logical": cache.logical_kv_bytes(),
            "prefill_s": prefill_s,
            "compress_s": compress_s,
            "ttft_s": ttft_s,
            "decode_s": decoded.seconds,
            "tpot_s": decoded.seconds / decoded.steps if decoded.steps else None,
            "peak_mem_bytes": max(m for m in (prefill_peak, decoded.peak_mem_bytes, 0) if m is not None),
            "peak_mem_prefill_bytes": prefill_peak,
            "peak_mem_decode_bytes": decoded.peak_mem_bytes,
            "peak_mem_kind": stopwatch.memory_kind,
            "method_record": dict(job_cache.ctx.record) or None,
        } | ({"job_complete": True} if index == len(turns) - 1 else {})


def start_older(
    method: Method,
    cache: KVCache,
    job_cache: JobCache,
    recorder: QueryRecorder | None,
    entries: int,
    state: TurnState,
    index: int,
    older: int,
) -> OlderCompression | None:
    """Start compressing the turns before the last `older` ones (None: nothing older, or within budget)."""
    first_recent = index - older + 1
    if first_recent <= 0:
        return None
    boundary = state.starts[first_recent]
    if max(int((layer.positions < boundary).sum(dim=-1).max()) for layer in cache.layers) <= entries:
        return None
    return OlderCompression(method, cache, context_now(job_cache, recorder, entries, state.ids), boundary)


@register_scenario(SCENARIO)
def run_conversation(
    lm: LoadedModel, sample: Sample, jobs: list[Job], settings: RunOptions
) -> Iterator[tuple[Job, dict[str, Any]]]:
    """Every job's turns (`kvbench.scenarios` runner protocol); a failing job yields one error row for its turn."""
    turns = [Turn.from_dict(t) for t in sample.meta["turns"]]
    policy, older = sample.meta.get("policy", POLICIES[0]), sample.meta.get("compress_older_than")
    runnable: list[Job] = []
    for job in jobs:  # refusals first, before any model work
        try:
            check_job(job, older)
            runnable.append(job)
        except ValueError as err:
            if settings.fail_fast:
                raise
            yield job, {**error_fields(err), "part": "turn01", "turn": 1, "job_complete": True}
    if not runnable:
        return
    try:
        pieces = dialogue_pieces(lm.tokenizer, turns, sample.use_chat_template)
        check_dialogue_fits(sample.sample_id, pieces, turns, lm.max_context)
        pre, observers = shared_prefill(lm, pieces.user[0], [job.method for job in runnable], Stopwatch(lm.device))
    except Exception as err:
        if settings.fail_fast:
            raise
        for job in runnable:
            yield job, {**error_fields(err), "part": "turn01", "turn": 1, "job_complete": True}
        return
    for job in runnable:
        turn = 1
        try:
            rows = run_dialogue_job(lm, turns, pieces, pre, observers.get(id(job.method)), job, settings, policy, older)
            for row in rows:
                turn = row["turn"] + 1
                yield job, row
        except Exception as err:
            if settings.fail_fast:
                raise
            yield job, {**error_fields(err), "part": f"turn{turn:02d}", "turn": turn, "job_complete": True}
