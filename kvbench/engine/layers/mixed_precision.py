"""MiKV's mixed-precision cache layer: the slots an eviction method keeps stay in the cache dtype, the ones it
evicts are demoted to low-bit packed stores instead of dropped (policy: `kvbench.methods.mikv`)."""

from __future__ import annotations

import torch

from kvbench.engine.cache import PAD_POSITION, KVLayer
from kvbench.engine.quant.segments import SegmentStore, UniformSegment


class MiKVLayer(KVLayer):
    """A layer whose plain K/V tensors hold the base's kept (high-precision) slots, and whose `low` stores hold
    every slot the base evicted, quantised per token (`UniformSegment`, one scale/zero per slot and head) or, at
    lo_bits=16, unchanged (`FPSegment`). The base sees only the high-precision slots (its own cache); attention
    sees both, merged into position order, so lo_bits=16 attends over exactly the full cache's tensors.

    Keys are stored as beta * k and read back as k^ / beta: q . (k^ / beta) = (q / beta) . k^, the balancer's
    "divide queries by beta", without touching the model.
    """

    def __init__(self, lo_bits: int, beta: torch.Tensor | None, drop: bool) -> None:
        super().__init__()
        self.lo_bits, self.beta, self.drop = lo_bits, beta, drop
        self.low_keys: SegmentStore | None = None
        self.low_values: SegmentStore | None = None
        self.low_positions: torch.Tensor | None = None
        self.merged_positions: torch.Tensor | None = None

    @classmethod
    def from_layer(cls, layer: KVLayer, lo_bits: int, beta: torch.Tensor | None, drop: bool) -> MiKVLayer:
        new = cls(lo_bits, beta, drop)
        new.__dict__.update({k: v for k, v in vars(layer).items() if k not in ("lo_bits", "beta", "drop")})
        heads = layer.keys.shape[1]
        new.low_keys = SegmentStore(layer.keys[0, :, :0])
        new.low_values = SegmentStore(layer.values[0, :, :0])
        new.low_positions = torch.empty((heads, 0), dtype=torch.long, device=layer.device)
        return new

    def low_count(self) -> int:
        return 0 if self.low_positions is None else self.low_positions.shape[1]

    def demote(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Append slots `[Hkv, m, d]` (padding slots: PAD_POSITION) to the low-precision stores."""
        if keys.shape[1] == 0:
            return
        if self.beta is not None:
            keys = keys * self.beta[:, None, :].to(keys.dtype)
        for store, data in ((self.low_keys, keys), (self.low_values, values)):
            store.append_fp(data.contiguous())
            if self.lo_bits != 16:
                store.encode_oldest_fp(data.shape[1], self.encoder)
        self.low_positions = torch.cat([self.low_positions, positions], dim=1)

    def encoder(self, x: torch.Tensor) -> UniformSegment:
        return UniformSegment.encode(x, self.lo_bits, x.shape[-1], "channel")  # per token and head

    def keep(self, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """The base's eviction: kept slots stay, the others are demoted (dropped with drop=true)."""
        if not self.drop:
            length = self.get_seq_length()
            kept = torch.zeros((self.num_heads, length), dtype=torch.bool, device=self.device)
            indices = indices.to(self.device)
            if valid is None:
                kept.scatter_(1, indices, True)
            else:  # padded entries point at slot 0: only the valid ones mark a slot as kept
                valid = valid.to(self.device)
                rows = torch.arange(self.num_heads, device=self.device)[:, None].expand_as(indices)
                kept[rows[valid], indices[valid]] = True
            kept |= self.positions == PAD_POSITION  # padding is never demoted
            evicted = ~kept
            counts = evicted.sum(dim=1)
            width = int(counts.max()) if length else 0
            if width:
                order = torch.sort((~evicted).to(torch.int8), dim=1, stable=True).indices[:, :width]
                real = torch.arange(width, device=self.device)[None, :] < counts[:, None]
                gather = order[None, :, :, None].expand(1, -1, -1, self.keys.shape[-1])
                keys = self.keys.gather(2, gather)[0].masked_fill(~real[:, :, None], 0)
                values = self.values.gather(2, gather)[0].masked_fill(~real[:, :, None], 0)
                positions = self.positions.gather(1, order).masked_fill(~real, PAD_POSITION)
                self.demote(keys, values, positions)
        super().keep(indices, valid)

    def update(self, key_states, value_states, *args, positions: torch.Tensor, **kwargs):
        keys, values = super().update(key_states, value_states, positions=positions)
        self.merged_positions = None
        if self.low_count() == 0:
            return keys, values
        low_keys = self.low_keys.materialize(keys.dtype)
        if self.beta is not None:
            low_keys = low_keys / self.beta[:, None, :].to(keys.dtype)
        low_values = self.low_values.materialize(values.dtype)
        merged = torch.cat([self.low_positions, self.positions], dim=1)
        order = torch.sort(merged, dim=1, stable=True).indices  # position order (padding last)
        self.merged_positions = merged.gather(1, order)
        gather = order[None, :, :, None].expand(1, -1, -1, keys.shape[-1])
        keys = torch.cat([low_keys[None], keys], dim=2).gather(2, gather)
        values = torch.cat([low_values[None], values], dim=2).gather(2, gather)
        return keys, values

    def attention_mask(self, query_positions: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        if self.merged_positions is None:
            return super().attention_mask(query_positions)
        padded = bool((self.merged_positions == PAD_POSITION).any())
        if query_positions.shape[0] == 1 and not padded:
            return None, False
        same = bool((self.merged_positions == self.merged_positions[:1]).all())
        key_pos = self.merged_positions[:1] if same else self.merged_positions
        mask = key_pos[:, None, :] <= query_positions.to(self.device)[None, :, None]
        return mask[None], False

    def copy(self) -> MiKVLayer:
        other = MiKVLayer.from_layer(super().copy(), self.lo_bits, self.beta, self.drop)
        other.low_keys, other.low_values = self.low_keys.clone(), self.low_values.clone()
        other.low_positions = self.low_positions.clone()
        return other

    def lengths(self) -> torch.Tensor:
        low = (self.low_positions != PAD_POSITION).sum(dim=-1) if self.low_count() else 0
        return super().lengths() + low

    def high_entries(self) -> int:
        return int(super().lengths().sum())

    def low_nbytes(self) -> int:
        return self.low_keys.nbytes() + self.low_values.nbytes()

    def beta_nbytes(self) -> int:
        return 0 if self.beta is None else self.beta.numel() * 2  # stored as fp16

    def nbytes(self) -> int:
        return super().nbytes() + self.low_nbytes() + self.beta_nbytes()

    def logical_nbytes(self) -> int:
        return super().logical_nbytes() + self.low_nbytes() + self.beta_nbytes()
