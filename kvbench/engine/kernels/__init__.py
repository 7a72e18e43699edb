"""Fused kernels shared by the methods, each a Triton kernel with a torch reference of the same function.

* `window_scores`: observation-window attention scores per KV head (SnapKV, PyramidKV, AdaKV, H2O's prefill)
  without materialising the `[H, w, T]` probabilities.
* `decode_attention`: one query token against a compressed cache with ragged heads (split-K), optionally
  returning the per-key probabilities that decode-time methods (H2O, TOVA) accumulate.

`kernels=auto|triton|torch` picks the implementation: auto is Triton on CUDA when Triton imports, torch
otherwise. Triton also runs on CPU tensors under `TRITON_INTERPRET=1` (slow; the tests use it).
"""

from __future__ import annotations

from kvbench.engine.kernels.decode_attention import decode_attention, decode_attention_torch
from kvbench.engine.kernels.dispatch import KERNEL_MODES, resolve_kernels, triton_available, triton_interpreted
from kvbench.engine.kernels.window_scores import window_scores, window_scores_torch

__all__ = [
    "KERNEL_MODES",
    "decode_attention",
    "decode_attention_torch",
    "resolve_kernels",
    "triton_available",
    "triton_interpreted",
    "window_scores",
    "window_scores_torch",
]
