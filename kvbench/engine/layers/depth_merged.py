"""MiniCache's depth-merged cache layers: two adjacent layers share one direction per token and KV head, each keeps
its own norms, and the tokens whose directions differ most are retained whole (the policy and its settings:
`kvbench.methods.minicache`). Tokens appended after the merge are held plain, per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.engine.cache import KVLayer
from kvbench.engine.quant.layer import StoredKVLayer

PARALLEL_EPS = 1e-6  # sin(angle) below this: SLERP's weights are ill-conditioned, linear interpolation is exact enough


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a, b)) / pi over the last dim, in [0, 1] (fp32)."""
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / torch.pi


def slerp_directions(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """The unit vector at fraction `t` of the great-circle arc from a's direction to b's (fp32, last dim):
    sin((1 - t) w) / sin w a^ + sin(t w) / sin w b^, w the angle; linear interpolation (renormalised) where the two
    are (anti)parallel."""
    ua = torch.nn.functional.normalize(a.float(), dim=-1, eps=1e-12)
    ub = torch.nn.functional.normalize(b.float(), dim=-1, eps=1e-12)
    angle = torch.arccos((ua * ub).sum(dim=-1).clamp(-1.0, 1.0))[..., None]
    sin = torch.sin(angle)
    safe = sin.abs() > PARALLEL_EPS
    wa = torch.where(safe, torch.sin((1.0 - t) * angle) / torch.where(safe, sin, 1.0), torch.full_like(sin, 1.0 - t))
    wb = torch.where(safe, torch.sin(t * angle) / torch.where(safe, sin, 1.0), torch.full_like(sin, t))
    return torch.nn.functional.normalize(wa * ua + wb * ub, dim=-1, eps=1e-12)


def retained_tokens(distance: torch.Tensor, gamma: float) -> torch.Tensor:
    """MiniCache's retention rule per head: the tokens whose distance `[Hkv, T]` lies within gamma (d_max - d_min) of
    that head's d_max (strictly: gamma 0 retains nothing, gamma 1 everything above d_min). The most distinct pairs
    are retained and more of them as gamma grows, as the paper's gamma ablation reports (larger gamma: higher
    accuracy, lower compression); a threshold d_min + gamma (d_max - d_min) read as a lower bound would do the
    opposite and retain almost every token at gamma 0.05."""
    low = distance.amin(dim=-1, keepdim=True)
    high = distance.amax(dim=-1, keepdim=True)
    return distance > high - gamma * (high - low)


@dataclass
class MergedPair:
    """One tensor (keys or values) of two adjacent layers over T tokens: the shared `direction [Hkv, T, d]`, each
    layer's `norms [Hkv, T]`, the `retained [Hkv, T]` mask and the retained tokens' original vectors `[R, d]` per
    layer (in mask order). Never modified after construction (copies share it)."""

    direction: torch.Tensor
    norms: tuple[torch.Tensor, torch.Tensor]
    retained: torch.Tensor
    originals: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def merge(cls, first: torch.Tensor, second: torch.Tensor, t: float, gamma: float) -> MergedPair:
        """Merge two layers' `[Hkv, T, d]` tensors (stored in their dtype)."""
        dtype = first.dtype
        retained = retained_tokens(angular_distance(first, second), gamma)
        direction = slerp_directions(first, second, t).to(dtype)
        norms = (first.float().norm(dim=-1).to(dtype), second.float().norm(dim=-1).to(dtype))
        return cls(direction, norms, retained, (first[retained].clone(), second[retained].clone()))

    def read(self, side: int) -> torch.Tensor:
        """Layer `side`'s (0: the shallower) reconstruction `[Hkv, T, d]`: norm x shared direction, retained tokens
        exact."""
        out = self.norms[side][..., None] * self.direction
        out[self.retained] = self.originals[side]
        return out

    def shared_nbytes(self) -> int:
        """The direction and the retention mask (held once for the pair)."""
        return self.direction.numel() * self.direction.element_size() + self.retained.numel()

    def own_nbytes(self, side: int) -> int:
        """One layer's norms and retained vectors."""
        norms, originals = self.norms[side], self.originals[side]
        return norms.numel() * norms.element_size() + originals.numel() * originals.element_size()


class DepthMergedLayer(StoredKVLayer):
    """One layer of a merged pair: its first T slots are read from the `MergedPair`s (keys, values) as `side` (0 or
    1); slots appended later are plain tensors. `nbytes`: the pair's shared part is counted on side 0, each side
    counts its own norms, retained vectors and appended slots. Eviction is not supported."""

    def __init__(self) -> None:
        super().__init__()
        self.merged_keys: MergedPair | None = None
        self.merged_values: MergedPair | None = None
        self.side = 0
        self.tail_keys: torch.Tensor | None = None
        self.tail_values: torch.Tensor | None = None

    @classmethod
    def from_layer(cls, layer: KVLayer, keys: MergedPair, values: MergedPair, side: int) -> DepthMergedLayer:
        """`layer`'s positions, extras and flags; its K/V replaced by the merged pairs (its buffers released)."""
        new = cls()
        skip = ("keys", "values", "_key_buf", "_value_buf", "merged_keys", "merged_values", "side")
        new.__dict__.update({k: v for k, v in vars(layer).items() if k not in skip})
        new._key_buf = new._value_buf = None
        new._shared = True  # the position buffer may be the prefill's: the next append copies it
        new.extras = {name: state.clone() for name, state in layer.extras.items()}
        new.merged_keys, new.merged_values, new.side = keys, values, side
        new.tail_keys = layer.keys[0][:, :0].clone()
        new.tail_values = layer.values[0][:, :0].clone()
        return new

    @property
    def keys(self) -> torch.Tensor | None:
        if self.merged_keys is None:
            return None
        return torch.cat([self.merged_keys.read(self.side), self.tail_keys], dim=1)[None]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise TypeError("a depth-merged (minicache) layer's keys cannot be replaced")

    @property
    def values(self) -> torch.Tensor | None:
        if self.merged_values is None:
            return None
        return torch.cat([self.merged_values.read(self.side), self.tail_values], dim=1)[None]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise TypeError("a depth-merged (minicache) layer's values cannot be replaced")

    def reserve(self, num_tokens: int) -> None:
        self._pending = max(0, num_tokens)  # appends grow the tails; nothing to preallocate

    def update(self, key_states, value_states, *args, positions: torch.Tensor, **kwargs):
        self.tail_keys = torch.cat([self.tail_keys, key_states[0]], dim=1)
        self.tail_values = torch.cat([self.tail_values, value_states[0]], dim=1)
        self.append_slot_state(positions, key_states.shape[-2])
        return self.keys, self.values

    def keep(self, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        raise TypeError("a depth-merged (minicache) layer cannot evict slots")

    def nbytes(self) -> int:
        total = 0
        for pair, tail in ((self.merged_keys, self.tail_keys), (self.merged_values, self.tail_values)):
            total += pair.own_nbytes(self.side) + tail.numel() * tail.element_size()
            if self.side == 0:
                total += pair.shared_nbytes()
        return total + self.attention_state_nbytes()

    def reserved_nbytes(self) -> int:
        return self.nbytes()

    def logical_nbytes(self) -> int:
        return self.nbytes()

    def copy(self) -> DepthMergedLayer:
        other = DepthMergedLayer()
        other.__dict__.update(vars(self))
        other._shared = self._shared = True
        other.extras = {name: state.clone() for name, state in self.extras.items()}
        return other
