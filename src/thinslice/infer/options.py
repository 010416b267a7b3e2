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


@dataclasses.dataclass(frozen=True)
class MethodFlag:
    """One method option as the command line offers it: ``thinslice upsample`` and ``thinslice batch`` build their
    flags from :data:`METHOD_FLAGS`, so the two can never drift apart, and :class:`~thinslice.infer.upsampler.
    Upsampler.from_args` reads the same names back. Values stay text-like here; the method's options dataclass
    declares the type (:func:`coerce_options`). ``bounds`` is the accepted range of a number (checked when parsed,
    before any work); ``group`` is where the flag is listed in ``--help`` ("acquisition" or "learned")."""

    name: str
    help: str
    kind: type | None = str  # int, float, str; None: an on/off switch
    bounds: tuple[float, float] | None = None
    choices: tuple[str, ...] = ()
    metavar: str | tuple[str, ...] | None = None
    nargs: int | None = None
    group: str = "learned"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _profile_choices() -> tuple[str, ...]:
    from thinslice.degrade.profiles import PROFILES

    return (*PROFILES, "auto")


# Every method option with a flag of its own (the rest: ``--option KEY=VALUE``); adding one is one row here plus the
# field in the options dataclass of each method that uses it.
METHOD_FLAGS: tuple[MethodFlag, ...] = (
    MethodFlag("profile", "slice profile of the input, for data consistency (cubic-dc, planes, cnn, ldm; default "
                          "gaussian with FWHM = slice thickness); auto: estimated from the scan itself (shape and "
                          "FWHM, in the report line)", choices=_profile_choices(), group="acquisition"),
    MethodFlag("thickness", "slice thickness of the input for data consistency (default: from the file, else the "
                            "slice spacing)", kind=float, metavar="MM", group="acquisition"),
    MethodFlag("device", "torch device, e.g. cpu, cuda, cuda:1 (default: auto)"),
    MethodFlag("seed", "random seed for sampling (0 to 2^32-1)", kind=int, bounds=(0, 2**32 - 1)),
    MethodFlag("steps", "number of sampling steps (1 to 1000)", kind=int, bounds=(1, 1000)),
    # 64 samples already take hours on a CPU
    MethodFlag("samples", "number of samples to average (1 to 64; 2 or more: a std map)", kind=int, bounds=(1, 64)),
    MethodFlag("uncertainty", "write a calibrated std map beside the output (<stem>_std; mean +- 1.645 std is the "
                              "90%% interval): planes from its two passes (cheap), ldm from --samples N (default 4)",
               kind=None),
    MethodFlag("checkpoint", "model checkpoint (file or folder)"),
    MethodFlag("preset", "model preset: tiny, small, paper or a .json file"),
    MethodFlag("patch_size", "process the volume in patches of this size (voxels) to bound memory", kind=int,
               bounds=(4, 4096), metavar=("D", "H", "W"), nargs=3),
    MethodFlag("adapt", "cnn, planes: fine-tune on the input itself first (its in-plane axes as training pairs; "
                        "planes: at most 3 minutes, --option adapt_seconds=S)", kind=None),
    MethodFlag("adapt_steps", "fine-tuning steps for --adapt (cnn: default 200, ~20-50 on a CPU; planes: 1500)",
               kind=int, bounds=(1, 100_000), metavar="N"),
    MethodFlag("precision", "bf16: autocast, about twice as fast on recent CPUs and GPUs (default fp32; planes: bf16)",
               choices=("fp32", "bf16")),
)


def flag_values(namespace: object) -> dict[str, object]:
    """The method options a parsed command line gave explicitly: every :data:`METHOD_FLAGS` row that is set, then
    each ``--option KEY=VALUE`` (as text; the method's types are applied by :func:`coerce_options`)."""
    options: dict[str, object] = {}
    for row in METHOD_FLAGS:
        value = getattr(namespace, row.name, None)
        if value is not None:
            options[row.name] = tuple(value) if isinstance(value, list) else value
    for item in getattr(namespace, "option", None) or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ThinsliceError(f"--option expects KEY=VALUE, got '{item}'")
        options[key.strip().replace("-", "_")] = value
    return options
