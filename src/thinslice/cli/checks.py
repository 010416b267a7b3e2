"""Checks of options and output paths that run before any volume is read, so that a typo costs no computation.

The writers repeat the output checks (they serve the Python API too); here they only move ahead of the work, with
the same messages.
"""

from __future__ import annotations

import logging
import math
import stat
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


def check_output(output: str | Path, dtype: str = "int16") -> None:
    """Refuse an output the writers would refuse, or one that is not a place for a file: '-', a device, a pipe."""
    from thinslice.io.writers import check_file_target, is_folder_output

    text = str(output)
    if text.strip() in ("", "-"):
        raise ThinsliceError(f"output {text!r}: thinslice writes a file or a DICOM folder, not a stream; give a path "
                             "such as out.nii.gz, or out_series/ for DICOM")
    path = Path(text)
    if _is_special(path):
        raise ThinsliceError(f"output {text} is not a regular file or folder (a device, terminal or pipe); give a "
                             "path such as out.nii.gz, or out_series/ for DICOM")
    if is_folder_output(text):
        _check_folder_output(path, dtype)
        return
    check_file_target(path)


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
