from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.generation import forward_tokens
from kvbench.engine.hub import cache_name, default_cache_dir
from kvbench.engine.kernels.window_attention import window_attention
from kvbench.methods.adakv import adaptive_keep_mask
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores
from kvbench.methods.scoring import mask_to_indices, round_preserving_sum
from kvbench.methods.wrapped import ScorerWrapper

PROFILE_VERSION = 1

# The calibration haystack and needles: written for kvbench (offline, no data set), neutral filler sentences and a
# two-fact needle whose answer needs both facts (retrieval + one reasoning hop, as HeadKV's R2 needles).
FILLER = (
    "The river bends twice before it reaches the old mill.",
    "Most of the town's streets were paved during the last century.",
    "A light rain fell through the afternoon and stopped at dusk.",
    "The library keeps its oldest maps in a cool room upstairs.",
    "Farmers in the valley grow barley, apples and a little wheat.",
    "The market opens early on weekdays and closes at noon.",
    "Several bridges cross the canal near the railway station.",
    "In winter the lake freezes along its northern shore.",
    "The museum added a new wing for its collection of clocks.",
    "Travellers often stop at the inn before crossing the hills.",
    "The school choir practises every Thursday evening.",
    "Wind turbines stand in a long row on the ridge above the village.",
)
NAMES = ("Alice", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kiran", "Lena")
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple", "grey", "brown")


def calibration_example(
    tokenizer: Any, length: int, depth: float, rng: random.Random
) -> tuple[list[int], int, int, int]:
    """One teacher-forced needle example: (token ids = [bos] + haystack with the needle at `depth` + question +
    answer without its last token, needle start, needle end, answer length). Pieces are tokenised separately so
    the needle's token span is exact."""
    name, colour, number = rng.choice(NAMES), rng.choice(COLOURS), rng.randrange(1000, 10000)
    needle = f" {name} picked up the {colour} box. The {colour} box holds the number {number}."
    question = f"\nQuestion: Which number is in the box that {name} picked up?\nAnswer:"

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    needle_ids, question_ids, answer_ids = encode(needle), encode(question), encode(f" {number}")
    room = max(0, length - len(needle_ids) - len(question_ids) - len(answer_ids))
    filler: list[int] = []
    sentences = list(FILLER)
    while len(filler) < room:
        rng.shuffle(sentences)
        for sentence in sentences:
            filler += encode(" " + sentence)
    filler = filler[:room]
    cut = round(depth * len(filler))
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    start = len(prefix) + cut
    ids = prefix + filler[:cut] + needle_ids + filler[cut:] + question_ids + answer_ids[:-1]
    return ids, start, start + len(needle_ids), len(answer_ids)


def needle_topk_scores(
    probs: torch.Tensor, key_positions: torch.Tensor, start: int, end: int, top: int
) -> torch.Tensor:
    """HeadKV's retrieval-reasoning score of one example per query head `[H]`: for every answer step (row of
    `probs [H, steps, K]`), the attention of the head's `top` most attended keys that lie in the needle
    [start, end) (by original position, `key_positions [H, K]`), summed over the steps and divided by the needle
    length."""
    values, slots = probs.topk(min(top, probs.shape[-1]), dim=-1)
    positions = key_positions[:, None, :].expand(-1, probs.shape[1], -1).gather(-1, slots)
    inside = (positions >= start) & (positions < end)
    return (values * inside).sum(dim=(1, 2)) / (end - start)


class NeedleAttention:
    """Observer of one teacher-forced calibration forward: per layer (the model's numbering), the query heads'
    `needle_topk_scores` over the last `steps` rows (the queries that predict the answer tokens)."""

    def __init__(self, start: int, end: int, steps: int) -> None:
        self.start, self.end, self.steps = start, end, steps
        self.scores: dict[int, torch.Tensor] = {}

    def on_attention(self, layer_idx, query, layer: KVLayer, query_positions, scaling) -> None:
        rows = query[0][:, -self.steps :]
        probs = window_attention(
            rows, layer.keys[0], query_positions[-self.steps :].to(layer.device), layer.positions, scaling
        )
        group = probs.shape[0] // layer.num_heads
        key_positions = layer.positions.repeat_interleave(group, dim=0)
        self.scores[layer_idx] = needle_topk_scores(probs, key_positions, self.start, self.end, self.end - self.start)


def profile_heads(lm: Any, tokens: int, samples: int, seed: int) -> dict[str, list[float]]:
    """Mean retrieval-reasoning score per query head `{model layer: [H]}` over `samples` needle examples of about
    `tokens` tokens, the needle at evenly spread depths."""
    rng = random.Random(seed)
    totals: dict[int, torch.Tensor] = {}
    for sample in range(samples):
        ids, start, end, steps = calibration_example(lm.tokenizer, tokens, (sample + 0.5) / samples, rng)
        cache = KVCache(lm.layer_specs)
        observer = NeedleAttention(start, end, steps)
        cache.observers.append(observer)
        forward_tokens(lm, cache, ids)
        for layer_idx, scores in observer.scores.items():
            totals[layer_idx] = totals.get(layer_idx, 0) + scores.float().cpu() / samples
    return {str(layer_idx): scores.tolist() for layer_idx, scores in sorted(totals.items())}


def capped_allocation(desired: list[float], caps: list[int], total: int) -> list[int]:
    """Integers summing to min(total, sum(caps)), each <= its cap, proportional to `desired` (which sums to
    `total`): a capped entry's surplus is shared by the others in proportion to their desired values, then the
    sum-preserving rounding (largest remainder)."""
    total = min(total, sum(caps))
    fixed: dict[int, float] = {}
    while True:
        free = [i for i in range(len(desired)) if i not in fixed]
        room = total - sum(fixed.values())
        weight = sum(desired[i] for i in free)
        values = {i: (desired[i] * room / weight if weight > 0 else room / len(free)) for i in free}
        over = [i for i in free if values[i] > caps[i]]
        if not over:
            break
        fixed.update({i: float(caps[i]) for i in over})
    result = round_preserving_sum([fixed.get(i, values.get(i, 0.0)) for i in range(len(desired))], total)
    # Float error can lift a rounded entry one above its cap: move it to the entry with the most room.
    for i, cap in enumerate(caps):
        while result[i] > cap:
            result[i] -= 1
            result[max(range(len(caps)), key=lambda j: caps[j] - result[j])] += 1
    return result


def head_capacities(importance: torch.Tensor, selectable: list[int], caps: list[int], beta: float) -> list[list[int]]:
    """HeadKV's per-head budgets `[L][Hkv]` from head importance `[L, Hkv]`: each head of layer l gets the basic
    share S_l - S_l / beta, and a pool of sum_l Hkv * S_l / beta is split in proportion to the normalised
    importance; heads are capped at `caps[l]` scored slots, the total stays sum_l Hkv * S_l (exact)."""
    num_layers, num_heads = importance.shape
    scores = importance.float().clamp(min=0).flatten()
    weights = scores / scores.sum() if float(scores.sum()) > 0 else torch.full_like(scores, 1 / scores.numel())
    pool = sum(num_heads * s / beta for s in selectable)
    desired = [selectable[i // num_heads] * (1 - 1 / beta) + pool * float(w) for i, w in enumerate(weights.tolist())]
    flat = capped_allocation(desired, [caps[i // num_heads] for i in range(len(desired))], num_heads * sum(selectable))
    return [flat[layer * num_heads : (layer + 1) * num_heads] for layer in range(num_layers)]


@register_method("headkv")
@dataclass
class HeadKV(ScorerWrapper):
    """HeadKV-R2 (Fu, Cai, Asi, Xiong, Dong and Xiao, 2024, "Not All Heads Matter: A Head-Level KV Cache
    Compression Method with Integrated Retrieval and Reasoning", arXiv 2410.19258; KVCache-Factory's `headkv`), as
    a wrapper over any scoring method (`method.base`, default snapkv as the paper and KVCache-Factory).

    Head importance (calibrated once per model, cached as JSON under `<cache_dir>/headkv/`, keyed by the model's
    identity and the calibration settings): `calibration_samples` needle-in-a-haystack examples of about
    `calibration_tokens` tokens, built offline from kvbench's own text (module constants: neutral filler
    sentences, shuffled with `calibration_seed`, and a two-fact needle "<name> picked up the <colour> box. The
    <colour> box holds the number <n>." with the question "Which number is in the box that <name> picked up?",
    placed at evenly spread depths); the answer " <n>" is teacher-forced. For every answer step, a query head
    scores the attention of its k most attended keys that lie in the needle (k = the needle's length), divided
    by k; summed over the steps and averaged over the examples (the paper's retrieval-reasoning score). A KV
    head's importance is the mean over its GQA group (KVCache-Factory averages the group's capacities, the same
    thing before rounding). The paper's needles are BABILong reasoning facts, kept only when the model answers
    correctly (F1 > 50); here the answer is teacher-forced, so every example counts and small models calibrate
    too.

    Allocation (per compression): with S_l = the base's layer budget minus its protected window, every KV head of
    layer l gets the basic share S_l - S_l / beta, and a global pool of sum_l Hkv * S_l / beta is split across
    ALL heads of all layers in proportion to the normalised importance (KVCache-Factory's `head_capacity`, there
    with integer floor division B // beta; here exact, then a sum-preserving rounding). A head never gets more
    than its layer's scorable slots; the surplus goes to the others, so the cache holds exactly budget x L x Hkv
    entries. Each head keeps its own top-scored slots by the base plus the protected window; heads keep
    different counts (ragged, padded; rows report physical and logical bytes). Layer budgets vary too.

    On hybrid / sliding-window models the method is handed the compressible layers only (a `LayerSubset`): the
    profile covers the model's layers and the view's layers take their own rows.

    Hyperparameters: base=snapkv (KVCache-Factory runs HeadKV with SnapKV's window 8, kernel 7, max pool:
    `method.base_params={window:8}`), base_params={}, beta=1.01 (the official `head_beta`),
    calibration_tokens=1024, calibration_samples=8, calibration_seed=0.
    """

    compresses_bounded_layers: ClassVar[bool] = False  # its pooled scores need the prompt's slots

    beta: float = 1.01
    calibration_tokens: int = 1024
    calibration_samples: int = 8
    calibration_seed: int = 0

    def validate(self) -> None:
        if not self.beta >= 1.0:
            raise ValueError(f"headkv beta must be >= 1, got {self.beta}")
        if self.calibration_tokens < 64 or self.calibration_samples < 1:
            raise ValueError(
                f"headkv needs calibration_tokens >= 64 and calibration_samples >= 1, got "
                f"{self.calibration_tokens} and {self.calibration_samples}"
            )
        self.refuse_decode_budget()

    def label_extras(self) -> list[str]:
        return [f"beta={self.beta}"] if self.beta != type(self).beta else []

    def profile_path(self, lm: Any, cache_dir: Path | None) -> Path:
        identity = json.dumps(lm.identity, sort_keys=True, default=str)
        settings = f"{PROFILE_VERSION}-{self.calibration_tokens}-{self.calibration_samples}-{self.calibration_seed}"
        digest = hashlib.sha256(f"{identity}|{settings}".encode()).hexdigest()[:16]
        return Path(cache_dir or default_cache_dir(lm)) / "headkv" / f"{cache_name(lm.name)}-{digest}.json"

    def head_profile(self, lm: Any, cache_dir: Path | None) -> dict[str, list[float]]:
        """Per model layer (string keys), the query heads' mean retrieval-reasoning scores (computed once, cached)."""
        path = self.profile_path(lm, cache_dir)
        if path.exists():
            return json.loads(path.read_text())["scores"]
        scores = profile_heads(lm, self.calibration_tokens, self.calibration_samples, self.calibration_seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"scores": scores, "identity": lm.identity}, default=str))
        temporary.replace(path)  # atomic: parallel runs never read a half-written profile
        return scores

    def head_importance(self, cache: KVCache, ctx: CompressionContext) -> torch.Tensor:
        """Importance `[L, Hkv]` of the KV heads of the layers handed to the method (a view's own layers)."""
        profile = self.head_profile(ctx.lm, ctx.cache_dir)
        layers = getattr(cache, "indices", None) or range(len(cache.layers))
        rows = [torch.tensor(profile[str(layer)]).unflatten(0, (ctx.num_kv_heads, -1)).mean(dim=-1) for layer in layers]
        return torch.stack(rows)

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        budgets = self.layer_budgets(ctx, len(cache.layers))
        verdicts: list[LayerScores] = []
        selectable = []
        for layer_idx, (layer, budget) in enumerate(zip(cache.layers, budgets, strict=True)):
            budget = min(budget, layer.get_seq_length())
            verdict = self.layer_scores(layer_idx, layer, budget, ctx)
            verdicts.append(verdict)
            selectable.append(max(0, budget - verdict.protected))
        caps = [verdict.scores.shape[-1] for verdict in verdicts]
        heads = head_capacities(self.head_importance(cache, ctx), selectable, caps, self.beta)
        for layer, verdict, layer_heads in zip(cache.layers, verdicts, heads, strict=True):
            if sum(layer_heads) == verdict.scores.numel():
                continue  # every slot of the layer is kept
            layer.keep(*mask_to_indices(adaptive_keep_mask(verdict.scores, layer_heads, verdict.protected)))
        flat = [b for layer_heads in heads for b in layer_heads]
        ctx.record["headkv_head_budget_min"] = min(flat)
        ctx.record["headkv_head_budget_max"] = max(flat)
