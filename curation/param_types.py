"""Checks YAML values against a constructor's type hints, so a mistyped parameter fails at load.

A step's `__init__` signature is its schema: `timeout_s: float` accepts 5 or 5.0 but not `[5]`
or `"5"`, `languages: Sequence[str]` accepts `[en]` but not `en` (which would iterate as "e",
"n"). Without this, a wrong type surfaces as a TypeError deep in a run, or worse, as every
document dropped with a counted error. Annotations this module does not understand pass: the
constructor still decides.
"""

from __future__ import annotations

import collections.abc as abc
import inspect
import types
import typing
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin

_SEQUENCES = (list, tuple, set, frozenset, abc.Sequence, abc.Iterable, abc.Collection, abc.Set)
_MAPPINGS = (dict, abc.Mapping)


@cache
def param_hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of `cls.__init__` (parameter name -> annotation), without `return`."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - an annotation that cannot be resolved is not checked
        hints = {}
    hints.pop("return", None)
    return hints


def param_error(value: Any, hint: Any) -> str | None:
    """None when `value` fits `hint`, else what was expected and what came:
    "must be a number, got list [5]"."""
    if _fits(value, hint):
        return None
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"must be {describe(hint)}, got {type(value).__name__} {shown}"


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union or origin is types.UnionType:
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in _SEQUENCES or origin in _SEQUENCES:
        # A string is iterable but never meant as a list here: `languages: en` is a mistake.
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_fits(v, args[0]) for v in value)
    if hint in _MAPPINGS or origin in _MAPPINGS:
        if not isinstance(value, dict):
            return False
        return len(args) != 2 or all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    return True  # an annotation we do not model: leave it to the constructor


def describe(hint: Any, plural: bool = False) -> str:
    """Plain words for a type hint: `float | None` -> "a number or null"."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union or origin is types.UnionType:
        # "or null" reads best last.
        parts = sorted(args, key=lambda a: a is type(None))
        return " or ".join(describe(a, plural) for a in parts)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is None or hint is type(None):
        return "nulls" if plural else "null"
    names = {bool: ("true or false", "booleans"), int: ("an integer", "integers"),
             float: ("a number", "numbers"), str: ("a string", "strings")}
    if hint in names:
        return names[hint][plural]
    if hint in _SEQUENCES or origin in _SEQUENCES:
        head = "lists" if plural else "a list"
        return f"{head} of {describe(args[0], plural=True)}" if args else head
    if hint in _MAPPINGS or origin in _MAPPINGS:
        return "mappings" if plural else "a mapping"
    return getattr(hint, "__name__", str(hint))
