"""RoPE helpers shared by every method that moves, removes or re-applies the rotary embedding of cached keys.

kvbench caches post-RoPE keys (HF rotate-half layout: pair (i, i + r/2) of the first r rotary dims rotates by
position * inv_freq[i]). Two operations:

* `rotate_keys(keys, delta, inv_freq)` / `rerotate(keys, old_positions, new_positions, inv_freq)`: move post-RoPE
  keys by `delta` positions, R(delta) k (StreamingLLM's `rerotate`, DAPQ's pseudo-query shift, PIE edits and
  segment reuse in `kvbench.scenarios`): needs only the model's `inv_freq`. Exact only when RoPE angles are linear
  in position (plain, linear, llama3, YaRN); `check_shiftable_rope` refuses length-dependent variants;
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


# rope_type values whose angles depend on the sequence length (transformers' `dynamic_rope_update`): the rotation
# of a cached key changes with the length, so R(delta) R(p) != R(p + delta) in general.
LENGTH_DEPENDENT_ROPE: tuple[str, ...] = ("dynamic", "longrope")


def rope_type(model: torch.nn.Module) -> str:
    """The model's RoPE variant ("default", "linear", "llama3", "yarn", "dynamic", ...)."""
    return str(getattr(rotary_embedding(model), "rope_type", "default"))


def check_shiftable_rope(model: torch.nn.Module, what: str) -> None:
    """One-line refusal when moving cached keys by R(delta) is not exact: RoPE angles that depend on the length."""
    kind = rope_type(model)
    if kind in LENGTH_DEPENDENT_ROPE:
        raise ValueError(
            f"{what} re-rotates cached keys by R(delta), which needs RoPE angles linear in position; this model's "
            f"rope_type '{kind}' depends on the sequence length. Valid: RoPE types other than "
            f"{', '.join(LENGTH_DEPENDENT_ROPE)} (default, linear, llama3, yarn, ...)."
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move post-RoPE keys `[1, Hkv, L, d]` by `delta` positions `[Hkv, L]` (HF rotate-half layout; with partial
    rotary embeddings only the first 2 len(inv_freq) dims rotate). A scaled RoPE (YaRN's attention_scaling)
    commutes with the rotation, so R(delta) RoPE(p) k == RoPE(p + delta) k for every position-linear variant."""
    angles = delta.to(torch.float32)[..., None] * inv_freq.to(keys.device, torch.float32)
    angles = torch.cat([angles, angles], dim=-1)[None]
    return rope(keys.float(), angles.cos(), angles.sin()).to(keys.dtype)


def rerotate(
    keys: torch.Tensor, old_positions: torch.Tensor, new_positions: torch.Tensor, inv_freq: torch.Tensor
) -> torch.Tensor:
    """Post-RoPE keys `[1, Hkv, L, d]` rotated at `old_positions` re-rotated to `new_positions` (both `[Hkv, L]` or
    `[L]`): R(new - old) k. The one re-rotation helper (StreamingLLM's `rerotate`, PIE, segment reuse)."""
    delta = (new_positions - old_positions).to(keys.device)
    if delta.dim() == 1:
        delta = delta.expand(keys.shape[1], -1)
    return rotate_keys(keys, delta, inv_freq)


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
