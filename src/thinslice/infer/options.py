"""Option values of the upsampling methods. ``thinslice upsample --option KEY=VALUE`` passes strings: the CLI turns
them into the types of the method's options dataclass with :func:`coerce_options` (the only place text is parsed);
the library takes typed values and :func:`check_option_types` refuses others with a one-line error."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import numpy as np

from thinslice.errors import ThinsliceError

# The acquisition options (resolved into an Acquisition, not part of a method's options dataclass).
ACQUISITION_TYPES: dict[str, Any] = {"profile": str, "thickness": float}


def option_types(options_cls: type) -> dict[str, Any]:
    """Field name -> type of an options dataclass, plus the acquisition options."""
    hints = typing.get_type_hints(options_cls)
    return {**ACQUISITION_TYPES, **{f.name: hints.get(f.name, Any) for f in dataclasses.fields(options_cls)}}


def _plain(hint: Any) -> Any:
    """``X | None`` -> X (other unions stay as they are)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner[0] if len(inner) == 1 else Any
    return hint


def coerce_options(values: Mapping[str, object], types_by_name: Mapping[str, Any]) -> dict[str, object]:
    """Command-line values (strings, or argparse's numbers and lists) as the typed values the method declares."""
    out: dict[str, object] = {}
    for name, value in values.items():
        hint = _plain(types_by_name.get(name, Any))
        if value is None or hint is Any:
            out[name] = value
        elif hint is bool:
            out[name] = option_bool(name, value)
        elif hint is int:
            out[name] = option_int(name, value)
        elif hint is float:
            out[name] = option_float(name, value)
        elif typing.get_origin(hint) is tuple and typing.get_args(hint) == (int, int, int):
            out[name] = option_patch(name, value)
        elif typing.get_origin(hint) is tuple:
            out[name] = tuple(value.split(",")) if isinstance(value, str) else tuple(_items(value))
        else:
            out[name] = str(value)
    return out


def check_option_types(values: Mapping[str, object], types_by_name: Mapping[str, Any]) -> None:
    """Refuse a value of another type than declared (a library caller passing text, say) in one line."""
    for name, value in values.items():
        hint = _plain(types_by_name.get(name, Any))
        if value is None or hint is Any:
            continue
        origin = typing.get_origin(hint) or hint
        ok = isinstance(value, origin) and not (origin in (int, float) and isinstance(value, bool))
        if origin is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ThinsliceError(f"option {name} must be {getattr(origin, '__name__', origin)}, got {value!r}")


def _flag(name: str) -> str:
    """How the user spelled the option: ``--adapt-steps`` (``--option adapt_steps=...`` for the rest)."""
    return "--" + name.replace("_", "-")


def option_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ThinsliceError(f"{_flag(name)} must be true or false, got '{value}'")


def option_int(name: str, value: object, minimum: int | None = None) -> int:
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ThinsliceError(f"{_flag(name)} must be a whole number, got '{value}'") from None
    if minimum is not None and number < minimum:
        raise ThinsliceError(f"{_flag(name)} must be at least {minimum}, got {number}")
    return number


def option_float(name: str, value: object, positive: bool = False) -> float:
    try:
        number = float(value if isinstance(value, (int, float)) else str(value))
    except (TypeError, ValueError):
        raise ThinsliceError(f"{_flag(name)} must be a number, got '{value}'") from None
    if not np.isfinite(number) or (positive and number <= 0):
        raise ThinsliceError(f"{_flag(name)} must be a {'positive ' if positive else ''}finite number, got {value}")
    return number


def option_patch(name: str, value: object) -> tuple[int, int, int]:
    """A (d, h, w) voxel size from a 3-sequence or text like '32,128,128' / '32x128x128'."""
    items = value.replace("x", ",").replace(" ", ",").split(",") if isinstance(value, str) else _items(value)
    try:
        sizes = [int(str(v).strip()) for v in items if str(v).strip() != ""]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or min(sizes) < 1:
        raise ThinsliceError(f"{_flag(name)} must be three positive voxel counts D H W, got {value}")
    return sizes[0], sizes[1], sizes[2]


def _items(value: object) -> list[object]:
    """The elements of a list/tuple value (argparse's nargs), or the value alone."""
    return list(value) if isinstance(value, (list, tuple)) else [value]
