"""Building the base method of a wrapper (`method.base=<name>`, `method.base_params={...}`): AdaKV, KVCrush,
PrefixKV and MiKV wrap another method with the same two hyperparameters and refuse what they cannot wrap."""

from __future__ import annotations

from typing import Any

from kvbench.methods.base import METHODS, Method, ScoringMethod, build_method


def normalise_params(params: Any) -> dict[str, Any]:
    """`method.base_params` as a plain dict with string keys (Hydra passes a DictConfig or null)."""
    return {str(key): value for key, value in dict(params or {}).items()}


def scorers() -> list[str]:
    """Registered methods that rank slots (`ScoringMethod`): what scorer wrappers accept as base."""
    return sorted(name for name in METHODS.names() if issubclass(METHODS.get(name), ScoringMethod))


def build_base(wrapper: str, base: str, params: dict[str, Any], kind: type = ScoringMethod) -> Method:
    """The wrapped method; one line naming the bad base and the valid ones when it is not a `kind`."""
    if base == wrapper:
        raise ValueError(f"{wrapper} cannot wrap itself; choose a scoring method as method.base")
    method = build_method({"name": base, **params})
    if not isinstance(method, kind):
        valid = scorers() if kind is ScoringMethod else sorted(METHODS.names())
        raise ValueError(f"{wrapper} cannot wrap '{base}' (not a scoring method). Valid bases: {', '.join(valid)}.")
    return method
