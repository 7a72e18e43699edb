"""Distilled slots: a plain `KVLayer` whose kept values were replaced by corrected ones, optionally with a per-slot
logit bias (policy: `kvbench.methods.kv_distill`). No layer subclass: attention reads the values and
`extras["logit_bias"]` as for any plain layer, a base that evicts while decoding gathers them with the slots, and
the bias is counted in `kv_bytes` (`KVLayer.attention_state_nbytes`)."""

from __future__ import annotations

import torch

from kvbench.engine.cache import KVLayer

LOGIT_BIAS = "logit_bias"  # the `extras` entry attention adds to every later query's logit of a slot


def write_distilled(layer: KVLayer, values: torch.Tensor, bias: torch.Tensor | None = None) -> int:
    """Replace `layer`'s kept values by `values [Hkv, n, d]` (stored in the layer's dtype) and, when given, set the
    per-slot logit bias `[Hkv, n]` (stored in fp32). Returns the bias bytes added (0 without a bias)."""
    layer.values = values.to(layer.values.dtype)[None]
    layer.reserve(layer.pending)  # the adopted tensor holds no room for the announced appends
    if bias is None:
        return 0
    layer.extras[LOGIT_BIAS] = bias.float()
    return layer.extras[LOGIT_BIAS].numel() * layer.extras[LOGIT_BIAS].element_size()
