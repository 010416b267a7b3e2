"""Checks of options and output paths that run before any volume is read, so that a typo costs no computation.

The writers repeat the output checks (they serve the Python API too); here they only move ahead of the work, with
the same messages.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from thinslice.errors import ThinsliceError

if TYPE_CHECKING:
    from thinslice.io.volume import Volume

log = logging.getLogger("thinslice.cli")

# A stack with slices further apart than this, or with fewer slices than _SPARSE_MIN_SLICES, is not a thick-slice
# CT (no CT reconstruction is thicker than 10 mm): its output is interpolation between a few images.
_SPARSE_ABOVE_MM = 10.0
_SPARSE_MIN_SLICES = 3
# Names of the process's own streams (/dev/stdout may point at a regular file when redirected); /dev/shm is fine.
_STREAM_PREFIXES = ("/proc/", "/dev/fd/", "/dev/std", "/dev/tty")


def check_positive(value: float | None, flag: str, unit: str = " of mm") -> None:
    """Refuse 0, negative, NaN and infinite values for ``flag`` (None: the option was not given)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ThinsliceError(f"{flag} must be a positive number{unit}, got {value:g}")


# A slice spacing or thickness outside this range is a typo (0.001 for 1, or metres for mm): finer than any CT
# reconstruction, or deeper than any body.
MM_RANGE = (0.05, 1000.0)


def check_mm(value: float | None, flag: str) -> None:
    """:func:`check_positive`, then the plausible range of a slice spacing or thickness (:data:`MM_RANGE`)."""
    check_positive(value, flag)
    low, high = MM_RANGE
    if value is not None and not low <= value <= high:
        raise ThinsliceError(f"{flag} {value:g} mm is not a CT slice spacing or thickness (from {low:g} to "
                             f"{high:g} mm); give it in mm, e.g. {flag} 1")


def ranged(kind: type, low: float, high: float) -> Callable[[str], float]:
    """An argparse ``type`` for a number of ``kind`` (int or float) in ``[low, high]``: anything else ends in
    argparse's one-line error ("argument --samples: must be a whole number from 1 to 64, got 100000000") before any
    work, instead of hours of computation or a crash deep inside a method."""
    what = "a whole number" if kind is int else "a number"
    span = f"from {low:d} to {high:d}" if kind is int else f"from {low:g} to {high:g}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} {span}, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be {what} {span}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its message for values it cannot convert
    return parse


# Ranges of the numeric options shared by several commands.
SEED = ranged(int, 0, 2**32 - 1)  # numpy and torch seeds
SAMPLES = ranged(int, 1, 64)  # ldm samples averaged: 64 already takes hours on a CPU
STEPS = ranged(int, 1, 1000)  # sampling steps (the shipped models use 4 or 15)
PATCH = ranged(int, 4, 4096)  # patch edge in voxels
ADAPT_STEPS = ranged(int, 1, 100_000)
FACTOR = ranged(float, 1, 64)  # thick/thin slice ratio


def check_input(path: str | Path) -> None:
    """Refuse an input that is a symbolic-link loop (the readers would only say "not found" or raise)."""
    _refuse_link_loop(Path(path), "input")


def check_output_path(path: str | Path) -> None:
    """Refuse an output that is (or lies under) a symbolic-link loop, before anything compares it with the input."""
    _refuse_link_loop(Path(path), "output")


def check_output(output: str | Path, dtype: str = "int16", overwrite: bool = False) -> None:
    """Refuse an output the writers would refuse, or one that is not a place for a file: '-', a device, a pipe, a
    path under a regular file; and an existing output file unless ``overwrite`` (nothing the user had is replaced
    without being asked)."""
    from thinslice.io.writers import check_file_target, is_folder_output

    text = str(output)
    if text.strip() in ("", "-"):
        raise ThinsliceError(f"output {text!r}: thinslice writes a file or a DICOM folder, not a stream; give a path "
                             "such as out.nii.gz, or out_series/ for DICOM")
    path = Path(text)
    _refuse_link_loop(path, "output")
    _check_parent_folders(path)
    if _is_special(path):
        raise ThinsliceError(f"output {text} is not a regular file or folder (a device, terminal or pipe); give a "
                             "path such as out.nii.gz, or out_series/ for DICOM")
    if is_folder_output(text):
        _check_folder_output(path, dtype)
        return
    check_file_target(path)
    if not overwrite:
        refuse_existing(path)


def refuse_existing(path: Path) -> None:
    """One line for an output file that is already there (with a detached header: its data file too)."""
    for item in _files_of(path):
        if item.exists() or item.is_symlink():
            raise ThinsliceError(f"output {item} exists; pass --overwrite to replace it")


def note_replaced(path: str | Path, existed: bool) -> None:
    """Say in one line that ``--overwrite`` replaced an existing output (no line when there was none)."""
    if existed:
        log.info(f"note: replaced the existing {path}")


def output_exists(path: str | Path) -> bool:
    """True when writing ``path`` (a file output) replaces a file that is there now."""
    return any(item.is_file() for item in _files_of(Path(path)))


def _files_of(path: Path) -> list[Path]:
    """The files a file output consists of: ``.mhd``/``.nhdr`` headers name a data file beside them."""
    from thinslice.io.writers import files_written

    return files_written(path)


def _refuse_link_loop(path: Path, role: str) -> None:
    """A symbolic link that leads back to itself cannot be read or written; say so instead of a traceback."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ThinsliceError(f"{role} {path} is a symbolic link that loops back on itself (or a folder on its "
                                 "path is); point it at a real file or folder") from None
    except ValueError:  # an embedded NUL byte: the writer's own check says so
        return


def _check_parent_folders(path: Path) -> None:
    """The output's folder must be a folder: under a regular file the OS says only "File exists" or "Not a
    directory"."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ThinsliceError(f"the output's folder {parent} is a file, not a folder; choose another output "
                                     "path")
            return


def _check_folder_output(path: Path, dtype: str) -> None:
    if dtype != "int16":
        raise ThinsliceError("DICOM series are written as int16 HU; use --dtype int16 or write NIfTI/NRRD/MHA for "
                             "float32 values")
    if path.exists() and not path.is_dir():
        raise ThinsliceError(f"{path} is an existing file; a DICOM output needs a folder path")
    if path.is_dir() and any(path.iterdir()):
        raise ThinsliceError(f"output folder {path} is not empty; choose a new folder")


def _is_special(path: Path) -> bool:
    """True for /dev/stdout, /proc/self/fd/1 and anything that exists but is neither a file nor a folder
    (/dev/null, a pipe, a terminal)."""
    if str(path.absolute()).startswith(_STREAM_PREFIXES):
        return True
    try:
        mode = path.stat().st_mode
    except OSError:
        return False  # does not exist yet: the writer creates it
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def warn_if_sparse(volume: Volume) -> None:
    """Say when the input is a few far-apart images rather than a thick-slice scan: the output is then invented
    between them, and a user should know before reading it as a thin-slice CT."""
    n, gap = volume.num_slices, volume.slice_spacing
    if n >= _SPARSE_MIN_SLICES and gap <= _SPARSE_ABOVE_MM:
        return
    log.warning("the input is a sparse stack (%d slices %.3g mm apart; a thick-slice CT has %d or more, at most "
                "%g mm apart): the output between its slices is interpolated, not measured", n, gap,
                _SPARSE_MIN_SLICES, _SPARSE_ABOVE_MM)
