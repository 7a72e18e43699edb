"""ThinK's channel-pruned cache layer: every slot's key holds only the kept channels of its KV head (the storage;
the policy that picks the channels is `kvbench.methods.think`)."""

from __future__ import annotations

import torch

from kvbench.engine.cache import KVLayer


class ChannelPrunedLayer(KVLayer):
    """A plain layer whose key buffer is `[1, Hkv, L, c]`: the `c` kept channels `channels [Hkv, c]` (ascending) of
    each KV head, for every slot, also the ones appended later. Values keep every channel. Attention reads the keys
    scattered back into `d` channels with zeros in the pruned ones (a transient tensor), so q . k sums over exactly
    the kept channels. Eviction (`keep`), copy-on-write and byte accounting are `KVLayer`'s, on the narrower keys;
    `nbytes` adds the channel indices."""

    def __init__(self) -> None:
        super().__init__()
        self.channels: torch.Tensor | None = None
        self.head_dim = 0

    @classmethod
    def from_layer(cls, layer: KVLayer, channels: torch.Tensor) -> ChannelPrunedLayer:
        """`layer`'s slots with only `channels [Hkv, c]` of their keys kept (a fresh key buffer; values shared)."""
        new = cls()
        new.__dict__.update({k: v for k, v in vars(layer).items() if k not in ("channels", "head_dim")})
        new.channels = channels.to(layer.device)
        new.head_dim = layer.keys.shape[-1]
        new._key_buf = new.prune(layer.keys).contiguous()
        new._value_buf = layer.values  # the held slots only: the next append reallocates both
        new._position_buf = layer.positions
        new._shared = True
        return new

    def prune(self, keys: torch.Tensor) -> torch.Tensor:
        """The kept channels of keys `[1, Hkv, n, d]` -> `[1, Hkv, n, c]`."""
        index = self.channels[None, :, None, :].expand(keys.shape[0], -1, keys.shape[2], -1)
        return keys.gather(-1, index)

    def expand(self, keys: torch.Tensor) -> torch.Tensor:
        """Pruned keys `[1, Hkv, n, c]` back in `d` channels, zeros in the pruned ones."""
        full = keys.new_zeros((*keys.shape[:-1], self.head_dim))
        index = self.channels[None, :, None, :].expand(keys.shape[0], -1, keys.shape[2], -1)
        return full.scatter(-1, index, keys)

    def update(self, key_states, value_states, *args, positions: torch.Tensor, **kwargs):
        keys, values = super().update(self.prune(key_states), value_states, positions=positions)
        return self.expand(keys), values

    def nbytes(self) -> int:
        return super().nbytes() + (0 if self.channels is None else self.channels.numel() * self.channels.element_size())

    def copy(self) -> ChannelPrunedLayer:
        other = ChannelPrunedLayer()
        other.__dict__.update(vars(super().copy()))
        other.channels, other.head_dim = self.channels, self.head_dim
        return other
