"""Give every config field its declared type, or a ValueError naming the key.

YAML and ``key=value`` overrides hand us whatever the user wrote; Python's dataclasses
do not check annotations, so ``bf16: "false"`` would be a truthy string and
``train_iters: 2.5`` a float that the loop rounds up. :func:`typed_fields` reads the
dataclass's own type hints and converts or refuses each value. The rules:

===================  ==========================================================  =============================
declared type        accepted                                                    refused (examples)
===================  ==========================================================  =============================
``bool``             True / False; the strings "true" / "false" (any case),      "maybe", "yes", 1, 0, None
                     since a quoted YAML boolean has an unambiguous meaning
``int``              int; a float or string with an integral value (8.0, "16")    True (bool is not an int), 2.5
``float``            int or float; a numeric string ("1e-5": YAML 1.1 reads a     True, "fast", nan, inf
                     mantissa without a dot as a string); must be finite
``str``              str                                                          3, True, None
``X | None``         None, or what X accepts                                      (as X)
``list[X]``          a list or tuple whose items X accepts                        a bare string
``A | B``            a value A or B already is; else the first that accepts it   (neither accepts it)
``dict``             dict                                                         a list
===================  ==========================================================  =============================
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing

_BOOL_STRINGS = {"true": True, "false": False}


class _Refused(Exception):
    """Internal: the value does not fit one arm of the annotation (message: what it expected)."""


def _describe(hint) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type):
        return {"bool": "a boolean (true/false)", "int": "an integer", "float": "a number",
                "str": "a string", "dict": "a mapping", "list": "a list"}.get(hint.__name__, hint.__name__)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        (item, *_) = typing.get_args(hint) or (typing.Any,)
        return f"a list of {_describe(item).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    return str(hint)


def _convert(value, hint):
    """``value`` as ``hint`` or raise _Refused."""
    if hint is typing.Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Refused
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(hint)
        for arm in arms:  # exact fits first: "sigmoid" stays a str for ``str | list[str]``
            if _fits_exactly(value, arm):
                return _convert(value, arm)
        for arm in arms:
            try:
                return _convert(value, arm)
            except _Refused:
                continue
        raise _Refused
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Refused
        (item, *_) = typing.get_args(hint) or (typing.Any,)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_convert(v, item))
            except _Refused as e:
                raise _Refused(f"item {i} ({v!r}) is not {_describe(item)}") from e
        return out
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise _Refused
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_STRINGS:
            return _BOOL_STRINGS[value.strip().lower()]
        raise _Refused
    if hint is int:
        if isinstance(value, bool):
            raise _Refused
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())  # exact for long digit strings
            except ValueError:
                pass
        number = _number(value)
        if number is not None and number.is_integer():
            return int(number)
        raise _Refused
    if hint is float:
        if isinstance(value, bool):
            raise _Refused
        number = _number(value)
        if number is None:
            raise _Refused
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Refused
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Refused
    return value  # an annotation this module does not model: leave it to the dataclass


def _number(value) -> float | None:
    """A finite float from a float or numeric string, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            return None
    elif isinstance(value, float):
        number = value
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _fits_exactly(value, hint) -> bool:
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and (
            hint is float or isinstance(value, int))
    if hint is str:
        return isinstance(value, str)
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return False


def convert_value(value, hint, key: str):
    """``value`` converted to ``hint``; ValueError "``key``: expected ..., got ..." otherwise."""
    try:
        return _convert(value, hint)
    except _Refused as e:
        detail = f" ({e})" if str(e) else ""
        raise ValueError(f"{key}: expected {_describe(hint)}, got {value!r}{detail}") from None


def typed_fields(cls, values: dict, section: str) -> dict:
    """``values`` (field name -> raw value) with each value converted to ``cls``'s declared type.

    Unknown names are passed through (the dataclass constructor rejects them). ``section``
    prefixes the key in messages: ``train.train_iters: expected an integer, got 2.5``.
    """
    hints = typing.get_type_hints(cls)
    return {k: convert_value(v, hints[k], f"{section}.{k}") if k in hints else v for k, v in values.items()}


def check_field_types(obj, section: str) -> None:
    """Convert every field of the dataclass instance ``obj`` in place (call first in __post_init__)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, convert_value(getattr(obj, f.name), hints[f.name], f"{section}.{f.name}"))


def check_positive(obj, section: str, *names: str) -> None:
    """ValueError unless each named field is > 0 (None passes: it means "off" or "derive it")."""
    for n in names:
        v = getattr(obj, n)
        if v is not None and not v > 0:
            raise ValueError(f"{section}.{n} must be > 0, got {v!r}")


def check_range(obj, section: str, name: str, lo: float, hi: float, *, hi_open: bool = True) -> None:
    """ValueError unless lo <= value < hi (or <= hi with hi_open=False)."""
    v = getattr(obj, name)
    if not (lo <= v and (v < hi if hi_open else v <= hi)):
        raise ValueError(f"{section}.{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {v!r}")
