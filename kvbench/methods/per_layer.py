from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scoring import round_preserving_sum
from kvbench.methods.wrapped import ScorerWrapper


def weighted_layer_budgets(budget: int, weights: list[float], length: int) -> list[int]:
    """Per-layer budgets proportional to `weights`, averaging exactly `budget` over the layers, none above `length`
    (the prompt): a layer whose share would exceed the prompt keeps it whole and its excess is shared by the others
    in proportion to their weights (water filling), so the total `budget * layers` is kept whenever it fits."""
    total = budget * len(weights)
    capped: dict[int, int] = {}
    while True:
        free = [i for i in range(len(weights)) if i not in capped]
        left = total - sum(capped.values())
        mass = sum(weights[i] for i in free)
        shares = {i: left * weights[i] / mass if mass > 0 else left / max(len(free), 1) for i in free}
        over = [i for i in free if shares[i] > length]
        if not over:
            break
        capped.update({i: length for i in over})
    rounded = round_preserving_sum([shares[i] for i in free], left) if free else []
    out = dict(capped)
    out.update(zip(free, rounded, strict=True))
    return [out[i] for i in range(len(weights))]


@register_method("per_layer")
@dataclass
class PerLayer(ScorerWrapper):
    """A budget per layer over any scorer (NVIDIA kvpress `PerLayerCompressionPress`, which sets one compression
    ratio per layer).

    `layer_weights` gives each layer's share: layer l keeps B * N * w_l / sum(w) slots per KV head (N layers,
    B the budget), rounded so that the layers average exactly B, so rows stay comparable with every other method at
    the same budget; a layer whose share exceeds the prompt keeps it whole and the rest is shared out again.
    kvpress's per-layer ratios r_l are weights w_l = 1 - r_l (its average kept fraction is then the budget).
    `layer_weights=null` keeps the base's own allocation (uniform for snapkv, pyramidal for pyramidkv); otherwise
    the list needs one positive-or-zero entry per layer (checked against the model).

    Hyperparameters: base=snapkv, base_params={}; layer_weights=null.
    """

    layer_weights: list[float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_weights is not None:
            self.layer_weights = [float(w) for w in self.layer_weights]

    def validate(self) -> None:
        weights = self.layer_weights
        if weights is not None and (not weights or any(w < 0 for w in weights) or sum(weights) <= 0):
            raise ValueError(f"per_layer layer_weights must be >= 0 with a positive sum, got {weights}")
        self.refuse_decode_budget()

    def check_model(self, config: Any) -> None:
        super().check_model(config)
        layers = config.num_hidden_layers
        if self.layer_weights is not None and len(self.layer_weights) != layers:
            raise ValueError(f"per_layer layer_weights has {len(self.layer_weights)} entries; the model has {layers}")

    def label_extras(self) -> list[str]:
        return [] if self.layer_weights is None else [f"layer_weights={self.layer_weights}"]

    def layer_budgets(self, ctx: CompressionContext, num_layers: int) -> list[int]:
        if self.layer_weights is None:
            return super().layer_budgets(ctx, num_layers)
        # One weight per model layer (`check_model`); the method is handed the layers the policy compresses.
        weights = [self.layer_weights[ctx.model_layer_index(i)] for i in range(num_layers)]
        return weighted_layer_budgets(ctx.budget, weights, ctx.prompt_len)
