"""Check a value against a type hint, with messages that name the key, the value and what is allowed."""

from __future__ import annotations

import difflib
import enum
import types
import typing
from typing import Any, Literal


class TypeProblem(Exception):
    """A value does not fit its declared type; str(e) is the user-facing reason."""


def closest(name: str, candidates: typing.Iterable[str]) -> str | None:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


def describe(hint: Any) -> str:
    """A short human description of a type hint ('int', 'one of [...]', 'str or list of str')."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return "any value"
    if hint is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return f"list of {describe(args[0])}" if args else "list"
    if origin is dict or hint is dict:
        return "mapping"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    return getattr(hint, "__name__", str(hint))


def coerce(value: Any, hint: Any) -> Any:
    """Return `value` converted to `hint` where that is lossless (int->float, number->str), or raise."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is object:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise TypeProblem("expected null")
    if origin is Literal:
        allowed = typing.get_args(hint)
        value = _yaml_bool_word(value, allowed)
        if value in allowed and not (isinstance(value, bool) and True not in allowed and False not in allowed):
            return value
        raise TypeProblem(f"expected {describe(hint)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        # Try exact-type members first so that e.g. 1 stays an int in `int | str`.
        for arg in sorted(args, key=lambda a: 0 if _exact(value, a) else 1):
            try:
                return coerce(value, arg)
            except TypeProblem:
                continue
        raise TypeProblem(f"expected {describe(hint)}")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [m.value for m in hint]
        value = _yaml_bool_word(value, values)
        if isinstance(value, hint):
            return value.value
        if value in values:
            return value
        raise TypeProblem(f"expected {describe(hint)}")
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        if isinstance(value, (list, tuple)):
            return [coerce(v, item) for v in value]
        raise TypeProblem(f"expected {describe(hint)}")
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise TypeProblem("expected a mapping")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeProblem("expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeProblem("expected an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value  # an int is a valid float; keep it as written
        if isinstance(value, str):
            # PyYAML reads `2e-4` (no dot) as a string; it is the way everyone writes learning rates.
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeProblem("expected a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeProblem("expected a string")
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise TypeProblem(f"expected {describe(hint)}")
    return value


def _yaml_bool_word(value: Any, allowed) -> Any:
    """YAML 1.1 reads a bare `no` / `yes` as a boolean; give the word back where the field wants it."""
    if isinstance(value, bool):
        word = "yes" if value else "no"
        if word in allowed and value not in allowed:
            return word
    return value


def _exact(value: Any, hint: Any) -> bool:
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float, str):
        return type(value) is hint
    origin = typing.get_origin(hint) or hint
    return isinstance(origin, type) and isinstance(value, origin)
