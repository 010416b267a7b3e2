"""Option values of the upsampling methods: ``thinslice upsample --option KEY=VALUE`` passes strings, the Python
API typed values; these accept both and name the flag in their one-line errors."""

from __future__ import annotations

import numpy as np

from thinslice.errors import ThinsliceError


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
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ThinsliceError(f"{_flag(name)} must be a number, got '{value}'") from None
    if not np.isfinite(number) or (positive and number <= 0):
        raise ThinsliceError(f"{_flag(name)} must be a {'positive ' if positive else ''}finite number, got {value}")
    return number


def option_patch(name: str, value: object) -> tuple[int, int, int]:
    """A (d, h, w) voxel size from a 3-sequence or text like '32,128,128' / '32x128x128'."""
    items = value.replace("x", ",").replace(" ", ",").split(",") if isinstance(value, str) else value
    try:
        sizes = tuple(int(v) for v in items if str(v).strip() != "")  # type: ignore[union-attr]
    except (TypeError, ValueError):
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise ThinsliceError(f"{_flag(name)} must be three positive voxel counts D H W, got {value}")
    return sizes  # type: ignore[return-value]
