"""Name -> object registries with one-line errors that list the valid names and the closest match."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """Raised for an unknown model/method/task/metric name; the message is one line."""


class FieldValueError(ValueError):
    """A config value of the wrong type or out of range; the message names the key and is one line."""


def closest_hint(name: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), sorted(valid), n=1, cutoff=0.0)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_name_message(kind: str, name: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    return f"unknown {kind} '{name}'. Valid {kind}s: {', '.join(valid)}.{closest_hint(name, valid)}"


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


def type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        item = {int: "ints", float: "numbers", str: "strings", bool: "true/false values"}
        return f"a list of {item.get(args[0], type_name(args[0])) if args else 'values'}"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    return {int: "an int", float: "a number", bool: "true/false", str: "a string", dict: "a mapping"}.get(
        origin or annotation, getattr(annotation, "__name__", str(annotation))
    )


def _coerce(value: Any, annotation: Any) -> Any:
    """`value` as `annotation` (int, float, bool, str, list[...], dict, Literal, X | None, Any); raises
    TypeError when it is not one. Config values arrive as YAML/command-line scalars, so no parsing of strings."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg)
            except TypeError:
                pass
        raise TypeError
    if origin is typing.Literal:
        if value in args:
            return value
        raise TypeError
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if annotation is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():  # 64.0 is 64; 1.5 is refused, not truncated
            return int(value)
        raise TypeError
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            return float(value)
        raise TypeError
    if annotation is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if origin is list or annotation is list:
        items = list(value) if is_sequence(value) else [value]  # a scalar is a one-item list
        return [_coerce(item, args[0]) for item in items] if args else items
    if origin is dict or annotation is dict:
        if value is None:  # `null` in a YAML means "none given" for a mapping of extra parameters
            return {}
        if is_mapping(value):
            return dict(value)
        raise TypeError
    return value  # other annotations (classes, tuples) are checked by the object itself


def is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig"


def is_mapping(value: Any) -> bool:
    return isinstance(value, dict) or type(value).__name__ == "DictConfig"


def check_field(key: str, value: Any, annotation: Any, minimum: float | None = 0) -> Any:
    """`value` checked against its annotation and `minimum` (numbers, and the numbers of a list: >= 0 unless
    the field says otherwise with `metadata={"min": ...}`), or a one-line error naming `key`."""
    try:
        coerced = _coerce(value, annotation)
    except TypeError:
        raise FieldValueError(f"{key} must be {type_name(annotation)}, got {value!r}") from None
    numbers = coerced if isinstance(coerced, list) else [coerced]
    if minimum is not None:
        for number in numbers:
            if isinstance(number, (int, float)) and not isinstance(number, bool) and number < minimum:
                raise FieldValueError(f"{key} must be >= {minimum}, got {value!r}")
    return coerced


AT_LEAST_ONE = {"min": 1}  # dataclass field metadata: counts and lengths that must be positive


def field_minimum(spec: dataclasses.Field) -> float | None:
    return spec.metadata.get("min", 0)


def build_registered(registry: Registry, cfg: Any, field_kind: str) -> Any:
    """Instantiate the dataclass registered under `cfg.name` with the other config keys as its fields.

    Every value is checked against the field's type annotation and minimum (`check_field`); unknown keys and
    bad values fail in one line naming the key (e.g. "unknown parameter 'windw' for method snapkv").
    """
    params = dict(cfg)
    name = params.pop("name", None)
    cls = registry.get(name)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    valid = sorted(fields)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown {field_kind} '{unknown[0]}' for {registry.kind} {name}. Valid {field_kind}s: "
            f"{', '.join(valid)}.{closest_hint(unknown[0], valid)}"
        )
    hints = typing.get_type_hints(cls)
    checked = {
        key: check_field(f"{registry.kind}.{key}", value, hints[key], field_minimum(fields[key]))
        for key, value in params.items()
    }
    return cls(**checked)
