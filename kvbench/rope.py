"""RoPE helpers shared by every method that moves, removes or re-applies the rotary embedding of cached keys.

kvbench caches post-RoPE keys (HF rotate-half layout: pair (i, i + r/2) of the first r rotary dims rotates by
position * inv_freq[i]). Two operations:

* `rotate_keys(keys, delta, inv_freq)`: move post-RoPE keys by `delta` positions, R(delta) k (StreamingLLM's
  `rerotate`, DAPQ's pseudo-query shift, PIE edits): needs only the model's `inv_freq`;
* `unrotate_keys` / `rope_keys`: remove or apply the model's rotation at absolute positions with the model's own
  rotary module (`rotary_embedding`), so scaled variants (llama3, YaRN attention scaling) are honoured exactly;
  `unrotate` inverts a possibly scaled rotation (RotateKV's pre-RoPE keys, Expected Attention's queries).
"""

from __future__ import annotations

import torch


def rotary_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """The model's rotary embedding module (`forward(x, position_ids) -> (cos, sin)`, HF rotate-half layout)."""
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            return module
    raise ValueError("this method needs a RoPE model (no rotary embedding module with inv_freq found)")


def rope_inv_freq(model: torch.nn.Module) -> torch.Tensor:
    return rotary_embedding(model).inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move post-RoPE keys `[1, Hkv, L, d]` by `delta` positions `[Hkv, L]` (HF rotate-half layout)."""
    angles = delta.to(torch.float32)[..., None] * inv_freq.to(keys.device, torch.float32)
    angles = torch.cat([angles, angles], dim=-1)[None]
    k = keys.float()
    return (k * angles.cos() + rotate_half(k) * angles.sin()).to(keys.dtype)


def rope_cos_sin(rotary: torch.nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (fp32) of the model's RoPE at `positions` (`[n]` -> `[n, r]`; `[Hkv, n]` -> `[Hkv, n, r]`)."""
    batched = positions.dim() == 2
    probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
    cos, sin = rotary(probe, positions if batched else positions[None])
    return (cos.float(), sin.float()) if batched else (cos[0].float(), sin[0].float())


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Invert RoPE on `x [..., n, d]` given the cos/sin `[..., n, r]` it was rotated with (r <= d rotary dims).

    Each rotated pair is (c, -s; s, c) times the rotation, possibly scaled (attention_scaling), so its inverse is
    the transpose divided by c^2 + s^2.
    """
    rotary_dims = cos.shape[-1]
    rotated, passed = x[..., :rotary_dims], x[..., rotary_dims:]
    original = (rotated * cos - rotate_half(rotated) * sin) / (cos * cos + sin * sin)
    return torch.cat([original, passed], dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to `x [..., n, d]` with cos/sin `[..., n, r]` (the model's own formula, rotary dims first)."""
    rotary_dims = cos.shape[-1]
    rotated, passed = x[..., :rotary_dims], x[..., rotary_dims:]
    return torch.cat([rotated * cos + rotate_half(rotated) * sin, passed], dim=-1)


def unrotate_keys(keys: torch.Tensor, positions: torch.Tensor, rotary: torch.nn.Module) -> torch.Tensor:
    """Pre-RoPE keys (fp32) `[Hkv, n, d]` from cached post-RoPE keys `[Hkv, n, d]` at their original `positions`
    `[Hkv, n]`: k_pre = R(-p) k_post, exact up to float rounding."""
    cos, sin = rope_cos_sin(rotary, positions)
    return unrotate(keys.float(), cos, sin)


def rope_keys(keys: torch.Tensor, positions: torch.Tensor, rotary: torch.nn.Module) -> torch.Tensor:
    """Post-RoPE keys (fp32) `[Hkv, n, d]` from pre-RoPE keys at `positions` `[Hkv, n]` (RoPE on read)."""
    cos, sin = rope_cos_sin(rotary, positions)
    return rope(keys.float(), cos, sin)
