"""`experiment=serving`: what a compression method buys at a memory budget.

After a run's ordinary rows (accuracy, bytes, output lengths with EOS honoured, prefill + compression time), the
serving phase measures, for every job (method x budget, plus the full cache) and every context length of the task:

- the bytes one sequence's cache holds: right after compression (mean over the distinct samples) and at the end of
  `decode_tokens` decode steps (the largest over them: what a sequence occupies while it is served), and the KV
  peak of the prefill (the uncompressed prompt cache, or a compression's scratch copy if larger);
- capacity at each memory budget `memory_gib`: `floor((memory - weights - activation reserve) / bytes per
  sequence)` (`capacity`); on CUDA the capacity batch is really allocated and decoded, and the row says whether the
  device's peak stayed inside the budget (`capacity_validated`);
- batched decode throughput (tokens/s) and TPOT at each batch size of `batch_sizes` and at each capacity: B
  sequences prefilled and compressed by the job exactly as a row does (`runner.prepare_job`), then decoded
  together for `decode_tokens` steps with EOS ignored (`engine.batched`). The B caches come from
  `samples_per_context` distinct samples of that context, cycled when B is larger (`distinct_samples`);
- the KV share of decode memory traffic at B: `B * kv / (weights + B * kv)`, kv being the mean bytes a sequence
  holds over its decode: when it is small, shrinking the cache cannot speed decoding up.

The serving phase prefills its distinct samples itself (once per context, shared by the jobs) although the row loop
prefilled them before: holding those caches through the row loop would put them inside every row's memory peaks.

Rows carry `row_type: "serving"` and a key of their own, so a rerun resumes after the last stored one and the
run's summary (rows with a sample fingerprint) never mixes them with accuracy rows. `kvbench.report.serving`
turns them and the ordinary rows (output-length shift) into the serving table and figures.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kvbench.engine.architecture import compressible_layers
from kvbench.engine.batched import batched_greedy_decode
from kvbench.engine.measure import Stopwatch
from kvbench.engine.models import LoadedModel
from kvbench.harness.batched import check_batch, sequence_of
from kvbench.harness.options import RunOptions
from kvbench.harness.prompt import build_prompt
from kvbench.harness.results import stable_hash
from kvbench.harness.runner import Job, PreparedJob, prepare_job, shared_prefill, split_point
from kvbench.harness.sample import Sample
from kvbench.registry import check_field

GIB = 2**30
ROW_TYPE = "serving"


@dataclass(frozen=True)
class ServingSettings:
    """The `serving:` config node (conf/experiment/serving.yaml documents every field)."""

    memory_gib: tuple[float, ...]  # memory budgets the capacity is computed for
    activation_reserve_gib: float  # kept free for activations, beside the weights
    batch_sizes: tuple[int, ...]  # fixed batch sizes timed (besides each capacity)
    at_capacity: bool  # also time the batch at each memory budget's capacity
    max_batch: int  # largest batch timed: a capacity above it is reported, not timed
    decode_tokens: int  # tokens each sequence generates in a timed batch (EOS ignored)
    samples_per_context: int  # distinct samples per context whose caches fill a batch

    @classmethod
    def parse(cls, node: Any) -> ServingSettings:
        """Validated settings from the config node, one-line errors naming the key."""
        node = dict(node or {})
        known = {field.name for field in cls.__dataclass_fields__.values()}
        unknown = sorted(set(node) - known)
        if unknown:
            raise ValueError(f"serving.{unknown[0]} is not a serving setting; valid: {', '.join(sorted(known))}")
        memory = node.get("memory_gib", 1.0)
        # a list (a Hydra ListConfig too) or one number
        memory = [memory] if isinstance(memory, str) or not hasattr(memory, "__iter__") else list(memory)
        if not memory:
            raise ValueError("serving.memory_gib must name at least one memory budget (GiB)")
        for value in memory:
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"serving.memory_gib must hold numbers > 0 (GiB), got {value!r}")
        reserve = node.get("activation_reserve_gib", 0.25)
        if isinstance(reserve, bool) or not isinstance(reserve, int | float) or reserve < 0:
            raise ValueError(f"serving.activation_reserve_gib must be a number >= 0 (GiB), got {reserve!r}")
        sizes = list(node.get("batch_sizes", [1]))
        for size in sizes:
            check_field("serving.batch_sizes", size, int, minimum=1)
        at_capacity = node.get("at_capacity", True)
        if not isinstance(at_capacity, bool):
            raise ValueError(f"serving.at_capacity must be true or false, got {at_capacity!r}")
        max_batch = check_field("serving.max_batch", node.get("max_batch", 64), int, minimum=1)
        if sizes and max(sizes) > max_batch:
            raise ValueError(f"serving.batch_sizes holds {max(sizes)}, above serving.max_batch={max_batch}")
        decode_tokens = check_field("serving.decode_tokens", node.get("decode_tokens", 16), int, minimum=2)
        distinct = check_field("serving.samples_per_context", node.get("samples_per_context", 4), int, minimum=1)
        if distinct > max_batch:  # the first timed batch holds every distinct sample once
            raise ValueError(f"serving.samples_per_context={distinct} is above serving.max_batch={max_batch}")
        return cls(
            tuple(float(m) for m in memory), float(reserve), tuple(sorted(set(sizes))), at_capacity, max_batch,
            decode_tokens, distinct,
        )  # fmt: skip


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each tensor once (tied embeddings are one tensor)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def capacity(memory_bytes: int, weights: int, reserve: int, per_sequence: int) -> int:
    """Concurrent sequences that fit: what is left of `memory_bytes` after the weights and the activation reserve,
    divided by the bytes one sequence's cache occupies (rounded down)."""
    if per_sequence <= 0:
        raise ValueError(f"a sequence must occupy some bytes, got {per_sequence}")
    return max(0, (memory_bytes - weights - reserve) // per_sequence)


def check_serving_batches(
    methods: list[Any],
    options: RunOptions,
    settings: ServingSettings,
    lm: LoadedModel | None = None,
    scenario: str | None = None,
) -> None:
    """The serving phase decodes in batches: what `batch_size > 1` refuses (`harness.batched.check_batch`), it
    refuses too, in one line, before any model work (`lm`: the architecture check once the model is loaded)."""
    largest = max([*settings.batch_sizes, settings.samples_per_context, 2])
    try:
        check_batch(methods, dataclasses.replace(options, batch_size=largest), lm, scenario)
    except ValueError as err:
        raise ValueError(f"experiment=serving decodes in batches: {err}") from None


def check_memory(settings: ServingSettings, weights: int) -> None:
    """Refuse, in one line, a memory budget that cannot hold the weights and the activation reserve."""
    reserve = settings.activation_reserve_gib * GIB
    for memory in settings.memory_gib:
        if memory * GIB <= weights + reserve:
            raise ValueError(
                f"serving.memory_gib={memory:g} cannot hold the weights ({weights / GIB:.3f} GiB) and the activation "
                f"reserve ({settings.activation_reserve_gib:g} GiB): raise it or lower serving.activation_reserve_gib"
            )


def check_batches_fit(batches: list[int], fits: int, what: str) -> None:
    """Refuse, in one line, a batch size above the capacity `fits` (on CUDA, where it would be real memory)."""
    above = [batch for batch in batches if batch > fits]
    if above:
        raise ValueError(
            f"batch size {max(above)} is above the capacity of {what}: {fits} sequences; lower serving.batch_sizes "
            "or serving.samples_per_context"
        )


def kv_share(batch: int, kv_bytes: float, weights: int) -> float:
    """The KV share of one decode step's memory traffic: every weight is read once per step, every sequence's cache
    once."""
    return batch * kv_bytes / (weights + batch * kv_bytes)


def samples_by_context(samples: list[Sample], per_context: int) -> dict[int, list[Sample]]:
    """The first `per_context` samples of each context length (`meta["length"]`), in task order."""
    groups: dict[int, list[Sample]] = {}
    for sample in samples:
        length = int(sample.meta.get("length", 0))
        if len(groups.setdefault(length, [])) < per_context:
            groups[length].append(sample)
    return groups


@dataclass
class Prefilled:
    """One distinct sample's shared prefill, from which every job prepares as many caches as a batch needs."""

    sample: Sample
    prompt: Any
    split: int
    pre: Any
    observers: dict[int, Any]
    stopwatch: Stopwatch

    def prepare(self, lm: LoadedModel, job: Job, options: RunOptions) -> PreparedJob:
        """A fresh compressed cache of this sample for `job`, exactly as a row prepares it."""
        stats = self.observers.get(id(job.method))
        return prepare_job(lm, self.sample, self.prompt, self.split, self.pre, job, options, self.stopwatch, stats)


def prefill_samples(lm: LoadedModel, samples: list[Sample], jobs: list[Job], options: RunOptions) -> list[Prefilled]:
    """Prefill each sample once for every job (as `run_sample` does)."""
    out = []
    layers = compressible_layers(lm.layer_specs, options.layers)
    for sample in samples:
        stopwatch = Stopwatch(lm.device)
        prompt = build_prompt(lm.tokenizer, sample, lm.max_context - sample.max_new_tokens)
        split = split_point(prompt, options.compress)
        pre, observers = shared_prefill(
            lm, prompt.input_ids[:split], [job.method for job in jobs], stopwatch, layers=layers
        )
        out.append(Prefilled(sample, prompt, split, pre, observers, stopwatch))
    return out


@dataclass
class Timed:
    """One timed batch: B sequences decoded together for `decode_tokens` steps."""

    batch: int
    step_seconds: list[float]  # each decode forward's wall time: throughput and TPOT use their median
    padding: float
    attention: str
    start_bytes: list[int]  # each sequence's cache after compression
    end_by_type: dict[str, int]  # the largest sequence's end-of-decode bytes per layer type (full, sliding, state)
    end_bytes: list[int]  # the most each sequence's cache held while decoding (its end state, or a step's peak)
    peak_device_bytes: int | None  # the decode's peak device memory (CUDA: allocated; CPU: RSS)
    compress_seconds: float  # per sequence: its job's setup + compression

    @property
    def steps(self) -> int:
        return len(self.step_seconds)

    @property
    def tpot_s(self) -> float:
        """The median step: a shared machine's stalls and a batch's first (warm-up) step do not move it."""
        return statistics.median(self.step_seconds) if self.step_seconds else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.tpot_s if self.step_seconds else float("nan")


def time_batch(
    lm: LoadedModel, prefilled: list[Prefilled], job: Job, options: RunOptions, batch: int, decode_tokens: int
) -> Timed:
    """Prepare `batch` caches (cycling over the distinct samples), decode them together, measure."""
    prepared = [prefilled[i % len(prefilled)].prepare(lm, job, options) for i in range(batch)]
    start_bytes = [one.job_cache.cache.kv_bytes() for one in prepared]
    sequences = [sequence_of(one, decode_tokens, stop_at_eos=False) for one in prepared]
    compress_seconds = sum(one.job_cache.phase.seconds for one in prepared) / batch
    decoded, layout = batched_greedy_decode(lm, sequences, Stopwatch(lm.device))
    # What each sequence held at the end, or more inside a step (a decode-time evictor holds budget + 1 slots during
    # its forward: `RowMeter`'s peak, observed before every per-row forward).
    end_bytes = [max(one.job_cache.cache.kv_bytes(), one.meter.peak.bytes) for one in prepared]
    largest = max(range(batch), key=lambda i: end_bytes[i])
    end_by_type = prepared[largest].job_cache.cache.kv_bytes_by_type()
    return Timed(
        batch, layout.step_seconds, layout.padding_fraction, layout.attention,
        start_bytes, end_by_type, end_bytes, decoded[0].peak_mem_bytes, compress_seconds,
    )  # fmt: skip


def run_serving(
    lm: LoadedModel,
    samples: list[Sample],
    jobs_for: Callable[[Sample], list[Job]],
    options: RunOptions,
    settings: ServingSettings,
    done: set[str],
) -> Iterator[dict[str, Any]]:
    """Yield the serving rows not in `done` for every context of `samples` and every job `jobs_for` plans."""
    weights = weight_bytes(lm.model)
    check_memory(settings, weights)
    for context, group in sorted(samples_by_context(samples, settings.samples_per_context).items()):
        jobs = jobs_for(group[0])
        prefilled: list[Prefilled] | None = None
        for job in jobs:
            keys = ServingKeys.of(lm.name, job, context, settings)
            if keys.all_in(done):
                continue
            if prefilled is None:  # one prefill per distinct sample, shared by the context's jobs
                prefilled = prefill_samples(lm, group, jobs, options)
            yield from job_rows(lm, job, context, prefilled, options, settings, keys, done, weights)


@dataclass(frozen=True)
class ServingKeys:
    """The keys of one job's serving rows at one context: one per fixed batch size and one per memory budget."""

    fixed: dict[int, str]
    at_memory: dict[float, str]

    @classmethod
    def of(cls, model_name: str, job: Job, context: int, settings: ServingSettings) -> ServingKeys:
        def key(kind: str, batch: int | None, memory: float | None) -> str:
            return stable_hash(
                {
                    "row_type": ROW_TYPE,
                    "model": model_name,
                    "method": job.method.label(),
                    "budget": job.budget,
                    "context": context,
                    "kind": kind,
                    "batch": batch,
                    "memory_gib": memory,
                    "decode_tokens": settings.decode_tokens,
                    "samples_per_context": settings.samples_per_context,
                    "reserve_gib": settings.activation_reserve_gib,
                    "at_capacity": settings.at_capacity,
                    "max_batch": settings.max_batch,
                }  # fmt: skip
            )

        return cls(
            {b: key("batch", b, None) for b in settings.batch_sizes},
            {m: key("capacity", None, m) for m in settings.memory_gib},
        )

    def all_in(self, done: set[str]) -> bool:
        return all(key in done for key in [*self.fixed.values(), *self.at_memory.values()])


def job_rows(
    lm: LoadedModel,
    job: Job,
    context: int,
    prefilled: list[Prefilled],
    options: RunOptions,
    settings: ServingSettings,
    keys: ServingKeys,
    done: set[str],
    weights: int,
) -> Iterator[dict[str, Any]]:
    """One job's serving rows at one context: a row per fixed batch size, a row per memory budget."""
    reserve = int(settings.activation_reserve_gib * GIB)
    base = job_fields(lm, job, context, prefilled, weights, reserve)
    # The first timed batch holds every distinct sample once: their end-of-decode bytes size a sequence.
    calibration = time_batch(lm, prefilled, job, options, len(prefilled), settings.decode_tokens)
    per_sequence = max(calibration.end_bytes)
    mean_kv = (sum(calibration.start_bytes) + sum(calibration.end_bytes)) / (2 * len(prefilled))
    base.update(
        kv_bytes_compressed_per_seq=sum(calibration.start_bytes) / len(prefilled),
        kv_bytes_per_seq=per_sequence,
        kv_bytes_by_type_per_seq=calibration.end_by_type,  # what kv_bytes_per_seq holds, per layer type
        kv_bytes_mean_decode=mean_kv,
        compress_s_per_seq=calibration.compress_seconds,  # a timed batch's rows give their own
    )
    if lm.device.type == "cuda":  # on a GPU a batch is real memory: none above what the largest budget holds
        largest = max(settings.memory_gib)
        check_batches_fit(
            [*settings.batch_sizes, len(prefilled)], capacity(int(largest * GIB), weights, reserve, per_sequence),
            f"{job.method.label()} at budget {job.budget} and {context} tokens in serving.memory_gib={largest:g}",
        )  # fmt: skip
    held_prefills = sum(one.pre.cache.kv_bytes() for one in prefilled)
    timings = {calibration.batch: calibration}

    def timed(batch: int) -> Timed:
        if batch not in timings:
            timings[batch] = time_batch(lm, prefilled, job, options, batch, settings.decode_tokens)
        return timings[batch]

    for batch, key in keys.fixed.items():
        if key not in done:
            yield {**base, **timing_fields(timed(batch), weights, mean_kv), "kind": "batch", "key": key}
    for memory, key in keys.at_memory.items():
        if key in done:
            continue
        cap = capacity(int(memory * GIB), weights, reserve, per_sequence)
        row = {**base, "kind": "capacity", "key": key, "memory_gib": memory, "capacity": cap, "timed": False}
        row["kv_share"] = kv_share(cap, mean_kv, weights)  # a formula of measured bytes: known untimed too
        if cap == 0:
            row.update(batch_size=0, note="not one sequence fits")
        elif not settings.at_capacity:
            row.update(batch_size=cap, note="serving.at_capacity=false")
        elif cap > settings.max_batch:
            row.update(batch_size=cap, note=f"capacity above serving.max_batch={settings.max_batch}: not timed")
        else:
            one = timed(cap)
            row.update(timing_fields(one, weights, mean_kv), timed=True)
            if lm.device.type == "cuda" and one.peak_device_bytes is not None:
                # The capacity batch really decoded: did the device's peak (weights, caches, activations) stay in
                # the budget? The distinct samples' uncompressed prefills, held only to build the batch, are not
                # part of serving it and are subtracted.
                served_peak = one.peak_device_bytes - held_prefills
                row.update(peak_mem_serving_bytes=served_peak, capacity_validated=served_peak <= memory * GIB)
        yield row


def job_fields(
    lm: LoadedModel, job: Job, context: int, prefilled: list[Prefilled], weights: int, reserve: int
) -> dict[str, Any]:
    """What every serving row of one job and context carries."""
    prefill_peaks = [one.pre.cache.kv_bytes() for one in prefilled]
    prompt_tokens = [one.split for one in prefilled]
    return {
        "row_type": ROW_TYPE,
        "model": lm.name,  # as the run's rows name it (the output-length join reads both)
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "method": job.method.name,
        "method_label": job.method.label(),
        "budget": job.budget,
        "context": context,
        "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens),
        "distinct_samples": len(prefilled),
        "sample_ids": [one.sample.sample_id for one in prefilled],
        "weights_bytes": weights,
        "activation_reserve_bytes": reserve,
        "kv_bytes_prefill_peak": max(prefill_peaks),
        "prefill_s_per_seq": sum(one.pre.seconds for one in prefilled) / len(prefilled),
    }


def timing_fields(timed: Timed, weights: int, mean_kv: float) -> dict[str, Any]:
    """A timed batch's measurement fields."""
    return {
        "batch_size": timed.batch,
        "decode_tokens": timed.steps + 1,
        "decode_s": sum(timed.step_seconds),
        "step_s_min": min(timed.step_seconds, default=None),
        "step_s_max": max(timed.step_seconds, default=None),
        "tokens_per_s": timed.tokens_per_s,
        "tpot_s": timed.tpot_s,
        "batch_padding_fraction": timed.padding,
        "batch_attention": timed.attention,
        "kv_share": kv_share(timed.batch, mean_kv, weights),
        "compress_s_per_seq": timed.compress_seconds,
        "peak_mem_decode_bytes": timed.peak_device_bytes,
    }
