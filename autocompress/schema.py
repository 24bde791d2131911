"""Checking a user's file against its schema (pydantic), and saying what is wrong in one line.

The config (:mod:`autocompress.config`), a policy (:mod:`autocompress.policy`) and a search space
(:mod:`autocompress.space`) are each described once, as pydantic types; this module turns pydantic's first error into
the :class:`~autocompress.errors.InputError` the CLI prints (``config.search.trials: must be an integer, got 'ten'``):
the field as a dotted path from the file's root, and the rule in words.

A schema says a rule in words in three ways: a validator raises :class:`Rule` (its message, and optionally the key
below the validated value that is at fault, for rules across fields); :func:`one_of` for a closed set of names;
:func:`says` for a value of the wrong shape, and :func:`only_keys` for a mapping with a key it does not know.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

from pydantic import AfterValidator, BeforeValidator, TypeAdapter, ValidationError, WrapValidator

from autocompress.errors import InputError


class Rule(ValueError):
    """Raised by a schema's validator: ``message`` in words; ``key``: the field below the validated value it is about."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key


def one_of(what: str, choices: Iterable[str] | Callable[[], Iterable[str]]) -> AfterValidator:
    """A validator for a name from a closed set: ``unknown <what> 'x' (a, b, c)``. ``choices`` may be a function, for
    sets that are only known when the check runs (imported late to keep the import graph flat)."""

    def check(value: Any) -> Any:
        known = tuple(choices() if callable(choices) else choices)
        if value not in known:
            raise Rule(f"unknown {what} {value!r} ({', '.join(map(str, known))})")
        return value

    return AfterValidator(check)


def says(message: str) -> WrapValidator:
    """A value whose own shape is wrong (not a mapping, an empty list, ...) fails with ``message``; what is wrong
    further inside it, and a :class:`Rule` about it, keep their own words."""

    def wrap(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            if any(not error["loc"] and not isinstance((error.get("ctx") or {}).get("error"), Rule)
                   for error in exc.errors()):
                raise Rule(message) from None
            raise

    return WrapValidator(wrap)


def unknown_key(allowed: Iterable[str] = ()) -> str:
    """The one wording of an unknown key, wherever it is found: ``unknown key (expected one of: a, b)``."""
    allowed = [str(a) for a in allowed]
    return f"unknown key (expected one of: {', '.join(allowed)})" if allowed else "unknown key"


def only_keys(*allowed: str) -> BeforeValidator:
    """A mapping may hold only these keys: ``unknown key (expected one of: a, b)``, naming the key."""

    def check(value: Any) -> Any:
        if isinstance(value, Mapping):
            unknown = sorted(str(key) for key in value if key not in allowed)
            if unknown:
                raise Rule(unknown_key(allowed), key=unknown[0])
        return value

    return BeforeValidator(check)


def check(adapter: TypeAdapter, data: Any, source: str,
          messages: Mapping[str, str] | None = None, keys: Callable[[tuple], Iterable[str] | None] | None = None) -> Any:
    """Validate ``data`` with ``adapter``; on failure raise the first error as a one-line :class:`InputError`.

    ``messages``: a fixed message for any error at or below a dotted field (``{"plugins": "must be ..."}``), for
    shapes whose rule reads better as one sentence than as pydantic's parts. ``keys(loc)``: the keys allowed at
    ``loc``, named when a key is unknown there.
    """
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise input_error(exc, source, messages, keys) from None


def input_error(exc: ValidationError, source: str, messages: Mapping[str, str] | None = None,
                keys: Callable[[tuple], Iterable[str] | None] | None = None) -> InputError:
    error = exc.errors(include_url=False)[0]
    loc = tuple(part for part in error["loc"] if part != "[key]")
    rule = (error.get("ctx") or {}).get("error")
    if isinstance(rule, Rule) and rule.key:
        loc = (*loc, rule.key)
    where = dotted(source, loc)
    for prefix, message in (messages or {}).items():
        field = dotted(source, tuple(prefix.split(".")))
        if where == field or where.startswith(field + ".") or where.startswith(field + "["):
            return InputError(field, message)
    return InputError(where, _words(error, rule, loc, keys))


def dotted(source: str, loc: tuple) -> str:
    """``("layers", 0, "match")`` under ``space.techniques.x`` -> ``space.techniques.x.layers[0].match``."""
    text = source
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _words(error: Mapping[str, Any], rule: Any, loc: tuple, keys: Callable[[tuple], Iterable[str] | None] | None) -> str:
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if isinstance(rule, Rule):
        return rule.message
    if isinstance(rule, Exception):
        return str(rule)
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return unknown_key((keys(loc[:-1]) or ()) if keys else ())
    if value is None and kind.endswith("_type"):
        return "must not be empty"
    if kind == "missing":
        return "is required"
    if kind == "greater_than_equal":
        bound = ctx["ge"]
        return "must be 0 or more" if bound == 0 else f"must be at least {bound}, got {value!r}"
    if kind == "greater_than":
        return f"must be above {ctx['gt']:g}, got {value!r}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']:g}, got {value!r}"
    if kind == "finite_number" or (isinstance(value, float) and math.isnan(value)):
        return f"must be a number, got {value!r}"
    what = {
        "int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string",
        "dict_type": "a mapping", "dataclass_type": "a mapping", "typed_dict_type": "a mapping", "model_type": "a mapping",
        "list_type": "a list",
    }.get(kind)
    if what:
        return f"must be {what}" if what in ("a mapping", "a list") else f"must be {what}, got {value!r}"
    return error["msg"]
