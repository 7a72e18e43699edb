"""Pieces of a cache: the K/V slots of a run of tokens in every layer, cut out, moved and spliced together.

Segment reuse and edited contexts build the cache of a prompt from pieces encoded at other times or positions
instead of one prefill. A piece holds post-RoPE keys rotated at `positions`; `moved` gives it new positions
and, with the model's `inv_freq`, re-rotates its keys there with the shared helper `kvbench.engine.rope.rerotate`
(without it the keys keep their old rotation: the ablations `reuse_norotate` / `no_rerotate`). `assemble`
concatenates pieces into a `KVCache` whose slot positions are the pieces' positions, so masks and the positions
of later tokens follow the assembled layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.engine import rope
from kvbench.engine.cache import KVCache
from kvbench.engine.generation import forward_tokens
from kvbench.engine.models import LoadedModel


@dataclass
class KVPiece:
    """Slots of consecutive tokens in every layer: keys/values `[1, Hkv, n, d]` per layer, positions `[n]`."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def nbytes(self) -> int:
        """Bytes of the K/V tensors the piece holds."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def moved(self, start: int, inv_freq: torch.Tensor | None) -> KVPiece:
        """The piece at positions `start, start + 1, ...`; keys re-rotated there when `inv_freq` is given (else
        they keep the rotation of their old positions while the cache records the new ones)."""
        if not len(self):
            return self
        new = self.positions - self.positions[0] + start
        if inv_freq is None or bool((new == self.positions).all()):
            return KVPiece(self.keys, self.values, new)
        keys = [rope.rerotate(k, self.positions, new, inv_freq) for k in self.keys]
        return KVPiece(keys, self.values, new)


def take(cache: KVCache, start: int, end: int) -> KVPiece:
    """Slots `start:end` of an uncompressed cache (every head holds the same positions), copied out."""
    for layer in cache.layers:
        if layer.per_head or layer.padded:
            raise ValueError("only an uncompressed cache (the same slots in every head) can be cut into pieces")
    return KVPiece(
        [layer.keys[:, :, start:end].clone() for layer in cache.layers],
        [layer.values[:, :, start:end].clone() for layer in cache.layers],
        cache.layers[0].positions[0, start:end].clone(),
    )


def assemble(pieces: list[KVPiece], num_layers: int, next_position: int | None = None) -> KVCache:
    """A cache holding `pieces` in order; new tokens continue at `next_position` (default: after the last slot)."""
    pieces = [piece for piece in pieces if len(piece)]
    cache = KVCache(num_layers)
    if pieces:
        positions = torch.cat([piece.positions for piece in pieces])
        for index, layer in enumerate(cache.layers):
            keys = torch.cat([piece.keys[index] for piece in pieces], dim=2)
            values = torch.cat([piece.values[index] for piece in pieces], dim=2)
            layer.update(keys, values, positions=positions)
        cache.seen_tokens = int(positions.max()) + 1
    if next_position is not None:
        cache.seen_tokens = next_position
    return cache


def encode_piece(lm: LoadedModel, pieces: list[KVPiece], token_ids: list[int], start: int) -> KVPiece:
    """Encode `token_ids` at positions `start, start + 1, ...` attending to `pieces` (and causally to themselves);
    returns their slots."""
    cache = assemble(pieces, lm.config.num_hidden_layers, next_position=start)
    held = cache.layers[0].get_seq_length()
    if token_ids:
        forward_tokens(lm, cache, token_ids)
    return take(cache, held, held + len(token_ids))
