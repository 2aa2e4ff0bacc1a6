"""Validation helpers for typed, documented configuration dataclasses.

Every run is checked before it does any work: a wrong value must stop it with a message that
names the parameter, what it got, and what is allowed, never fail half-way through training.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A parameter is unknown, of the wrong type, or out of its allowed range."""


def check_range(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise `ConfigError` unless `low <= value <= high` (bounds optional, strictness per side)."""
    ok = True
    if low is not None:
        ok &= value >= low if low_inclusive else value > low
    if high is not None:
        ok &= value <= high if high_inclusive else value < high
    if not ok:
        left = "" if low is None else f"{low} {'<=' if low_inclusive else '<'} "
        right = "" if high is None else f" {'<=' if high_inclusive else '<'} {high}"
        raise ConfigError(f"{name} = {value!r} is out of range: it must satisfy {left}{name}{right}.")


def check_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{name} = {value!r} is not allowed: choose one of {choices}.")


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def from_mapping(cls: type[T], values: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> T:
    """Build dataclass `cls` from `values` over `defaults`, rejecting unknown names and wrong types.

    Ints are accepted for float fields (and converted), as YAML and the command line write
    `4` for a temperature of 4.0. Range checks are the dataclass's own `__post_init__`. A
    field that neither `values`, `defaults` nor the dataclass sets is named in the error.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {unknown} for {cls.__name__}; known parameters are: {sorted(fields)}."
        )
    values = {**{k: v for k, v in (defaults or {}).items() if k in fields}, **values}
    unset = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if unset:
        raise ConfigError(f"{cls.__name__} needs a value for {unset}.")
    hints = typing.get_type_hints(cls)
    converted = {}
    for name, value in values.items():
        hint = hints[name]
        if not _matches(value, hint):
            raise ConfigError(
                f"{name} = {value!r} has type {type(value).__name__}; expected {_type_name(hint)}."
            )
        if hint is float and isinstance(value, int):
            value = float(value)
        converted[name] = value
    return cls(**converted)


def from_namespace(cls: type[T], namespace: Mapping[str, Any]) -> T:
    """Build dataclass `cls` from the same-named entries of `namespace` (a notebook's globals).

    A notebook's parameters cell defines one variable per field; this collects them, so the
    notebook validates exactly what papermill injected.
    """
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    missing = [name for name in names if name not in namespace]
    if missing:
        raise ConfigError(f"the parameters cell does not define {missing}.")
    return from_mapping(cls, {name: namespace[name] for name in names})
