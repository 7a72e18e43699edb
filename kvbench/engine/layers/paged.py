"""Quest's paged cache layer: every slot stays, each page of `page_size` consecutive slots carries the elementwise
min and max of its keys, and a one-token query attends over only the top-k pages by the upper bound of q . k
(the policy and its settings: `kvbench.methods.quest`). Nothing is freed: this layer holds MORE than a plain one."""

from __future__ import annotations

import math
from typing import Any

import torch

from kvbench.engine.cache import KVLayer


def page_bounds(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise min and max of keys `[Hkv, L, d]` over each page of `page_size` slots, `[Hkv, ceil(L / p), d]` each
    (the last page may be partial: only its slots count)."""
    heads, length, dim = keys.shape
    pages = math.ceil(length / page_size)
    pad = pages * page_size - length
    padded = torch.nn.functional.pad(keys, (0, 0, 0, pad))
    filled = torch.arange(pages * page_size, device=keys.device) < length
    grid = padded.unflatten(1, (pages, page_size))
    inside = filled.view(pages, page_size)[None, :, :, None]
    low = grid.masked_fill(~inside, float("inf")).amin(dim=2)
    high = grid.masked_fill(~inside, float("-inf")).amax(dim=2)
    return low, high


def page_upper_bounds(query: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Quest's page score per query head: sum_i max(q_i m_i, q_i M_i) >= q . k for every key k of the page, for
    queries `[H, d]` over bounds `[Hkv, P, d]` (query head h reads KV head h // g). Reduced over each GQA group by the
    max (the bound of the group's largest logit). `[Hkv, P]`."""
    heads, kv_heads = query.shape[0], low.shape[0]
    q = query.float().unflatten(0, (kv_heads, heads // kv_heads))[:, :, None, :]  # [Hkv, g, 1, d]
    bound = torch.maximum(q * low.float()[:, None], q * high.float()[:, None]).sum(dim=-1)  # [Hkv, g, P]
    return bound.amax(dim=1)


def select_pages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The top-`k` pages per KV head by score, in ascending page order, `[Hkv, k]`."""
    return torch.sort(torch.topk(scores, k, dim=-1).indices, dim=-1).values


class PagedLayer(KVLayer):
    """A plain layer plus per-page key bounds `low`/`high` `[Hkv, P, d]` (kept current on every append). With
    `pages_read` set, a one-token query reads only that many pages per KV head (`read_subset`, called by the attention
    function); `pages_read=None` reads everything (Quest's dense layers). `nbytes` adds the bounds."""

    def __init__(self) -> None:
        super().__init__()
        self.page_size = 16
        self.pages_read: int | None = None
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None
        self.tally: Any = None  # receives (bytes read, bytes held) after every selective read

    @classmethod
    def from_layer(cls, layer: KVLayer, page_size: int, pages_read: int | None, tally: Any = None) -> PagedLayer:
        """`layer`'s slots (buffers shared, copy-on-write), with its page bounds computed."""
        new = cls()
        new.__dict__.update({k: v for k, v in vars(layer).items() if k not in ("page_size", "pages_read", "tally")})
        new.page_size, new.pages_read, new.tally = page_size, pages_read, tally
        new.low, new.high = page_bounds(layer.keys[0], page_size)
        return new

    def num_pages(self) -> int:
        return 0 if self.low is None else self.low.shape[1]

    def update(self, key_states, value_states, *args, positions: torch.Tensor, **kwargs):
        first_page = self.get_seq_length() // self.page_size
        keys, values = super().update(key_states, value_states, positions=positions)
        # Only the pages the new slots fall in change: the last old page (if partial) and the new ones.
        low, high = page_bounds(keys[0, :, first_page * self.page_size :], self.page_size)
        if self.low is None:
            self.low, self.high = low, high
        else:
            self.low = torch.cat([self.low[:, :first_page], low], dim=1)
            self.high = torch.cat([self.high[:, :first_page], high], dim=1)
        return keys, values

    def bounds_nbytes(self) -> int:
        return 0 if self.low is None else 2 * self.low.numel() * self.low.element_size()

    def nbytes(self) -> int:
        return super().nbytes() + self.bounds_nbytes()

    def reserved_nbytes(self) -> int:
        return super().reserved_nbytes() + self.bounds_nbytes()

    def logical_nbytes(self) -> int:
        return super().logical_nbytes() + self.bounds_nbytes()

    def read_subset(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """For a one-token `query [1, H, 1, d]` over this layer's `key/value [1, Hkv, L, d]` and one-query `mask`
        (`KVLayer.attention_mask`'s): the slots of the selected pages, and their mask `[1, Hkv, 1, k * page_size]`
        (a partial last page's missing slots hidden). Unchanged when every page would be read."""
        pages = self.num_pages()
        length = key.shape[-2]
        if self.pages_read is None or self.pages_read >= pages:
            if self.tally is not None:
                self.tally(self.nbytes(), self.nbytes())
            return key, value, mask
        chosen = select_pages(page_upper_bounds(query[0, :, 0], self.low, self.high), self.pages_read)
        offsets = torch.arange(self.page_size, device=key.device)
        slots = (chosen[:, :, None] * self.page_size + offsets).flatten(1)  # [Hkv, k * p]
        inside = slots < length
        slots = slots.clamp(max=length - 1)
        gather = slots[None, :, :, None]
        key = key.gather(2, gather.expand(-1, -1, -1, key.shape[-1]))
        value = value.gather(2, gather.expand(-1, -1, -1, value.shape[-1]))
        heads = slots.shape[0]
        if mask is None:
            selected = inside[None, :, None, :]
        else:
            rows = mask[0, :, 0].expand(heads, -1).gather(1, slots)
            if mask.dtype == torch.bool:
                selected = (rows & inside)[None, :, None, :]
            else:
                selected = rows.masked_fill(~inside, float("-inf"))[None, :, None, :]
        if self.tally is not None:
            read = int(inside.sum()) * self._bytes_per_slot() + self.bounds_nbytes()
            self.tally(read, self.nbytes())
        return key, value, selected

    def keep(self, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Eviction (a bounded layer's `drop_unreachable`): the pages are re-formed over the kept slots."""
        super().keep(indices, valid)
        self.low, self.high = page_bounds(self.keys[0], self.page_size)

    def copy(self) -> PagedLayer:
        other = PagedLayer()
        other.__dict__.update(vars(super().copy()))
        other.page_size, other.pages_read, other.tally = self.page_size, self.pages_read, self.tally
        other.low, other.high = self.low, self.high  # replaced (never written in place) on append
        return other
