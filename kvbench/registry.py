"""Name -> object registries with one-line errors that list the valid names and the closest match."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """Raised for an unknown model/method/task/metric name; the message is one line."""


def unknown_name_message(kind: str, name: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.0)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown {kind} '{name}'. Valid {kind}s: {', '.join(valid)}.{hint}"


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownNameError(unknown_name_message(self.kind, name, self._entries))
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def build_registered(registry: Registry, cfg: Any, field_kind: str) -> Any:
    """Instantiate the dataclass registered under `cfg.name` with the other config keys as its fields.

    Unknown keys fail in one line naming the valid ones (e.g. "unknown parameter 'windw' for method snapkv").
    """
    params = dict(cfg)
    name = params.pop("name", None)
    cls = registry.get(name)
    valid = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown {field_kind} '{unknown[0]}' for {registry.kind} {name}. Valid {field_kind}s: {', '.join(valid)}."
        )
    return cls(**params)
