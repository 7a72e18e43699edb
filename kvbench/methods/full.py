from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.methods.base import Method, register_method


@register_method("full")
@dataclass
class Full(Method):
    """No compression: the full KV cache, the reference every method is compared with."""

    compresses: ClassVar[bool] = False
    keeps_slot_subset: ClassVar[bool] = False  # never evicts: nothing for a slot-subset wrapper to work on
    plain_kv_layers: ClassVar[bool] = True
    position_only: ClassVar[bool] = True
    batchable: ClassVar[bool] = True  # tested: tests/test_batched.py

    def decode_grows_only(self) -> bool:
        return True
