from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.methods.base import Method, register_method


@register_method("full")
@dataclass
class Full(Method):
    """No compression: the full KV cache, the reference every method is compared with."""

    compresses: ClassVar[bool] = False
