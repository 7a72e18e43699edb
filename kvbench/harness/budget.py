"""Budget semantics: parse/validate the configured budget and turn it into KV entries for a prompt."""

from __future__ import annotations

import math
from typing import Any

BUDGET_RULE = "a positive int (KV entries per KV head per layer), a float in (0, 1) (kept fraction), or null"


class BudgetError(ValueError):
    pass


def parse_budget(value: Any) -> int | float | None:
    """Validate one configured budget; returns int, float in (0,1), or None (no compression)."""
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "full")):
        return None
    if isinstance(value, bool):
        raise BudgetError(f"budget must be {BUDGET_RULE}; got {value!r} (bool)")
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise BudgetError(f"budget must be {BUDGET_RULE}; got {value!r} (str)") from None
    if isinstance(value, int):
        if value <= 0:
            raise BudgetError(f"budget must be {BUDGET_RULE}; got {value}")
        return value
    if isinstance(value, float):
        if not (0.0 < value < 1.0) or math.isnan(value):
            raise BudgetError(f"budget must be {BUDGET_RULE}; got {value}")
        return value
    raise BudgetError(f"budget must be {BUDGET_RULE}; got {value!r} ({type(value).__name__})")


def entries_for(budget: int | float | None, prompt_tokens: int) -> int | None:
    """KV entries per KV head per layer that `budget` means for a prompt of `prompt_tokens`; None = keep all.

    The caller compresses only when the result is smaller than the prompt (a shorter prompt is recorded as
    not compressed).
    """
    if budget is None:
        return None
    return budget if isinstance(budget, int) else max(1, round(budget * prompt_tokens))
