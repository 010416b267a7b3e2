"""What a cohort run passes around: the settings of the run, one case to upsample, one input skipped.

All three are plain picklable dataclasses, because the same :class:`Case` goes to an in-process call, a process pool
worker or a Ray actor on another machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from thinslice.io.formats import output_suffixes

# Output suffixes by ``--format`` name (``dicom``: a series folder), from the formats table; ``auto`` keeps the
# input's format.
FORMATS = output_suffixes()


@dataclass(frozen=True)
class Settings:
    """The command's settings shared by every case (a manifest row may override spacing, method and options)."""

    spacing: float
    method: str = "auto"
    options: dict[str, object] = field(default_factory=dict)
    fmt: str = "auto"
    dtype: str = "int16"
    thumbnails: bool = True
    overwrite: bool = False  # replace existing files under the output names that are not this batch's own


@dataclass(frozen=True)
class Case:
    """One series or volume to upsample, with everything a worker needs (no access to the driver's state).

    ``key`` identifies the input across runs (resolved file path, or folder and series UID); ``signature`` changes
    when the input files or the case's settings change, so that a re-run redoes exactly the changed cases.
    """

    key: str
    name: str
    kind: str  # "file" or "dicom"
    path: str  # the file, or the folder of the DICOM series
    spacing: float
    method: str
    options: tuple[tuple[str, object], ...]
    output: str
    signature: str
    series_uid: str = ""
    label: str = ""  # patient / study / series description, for the report
    replace_output: bool = False  # the output at ``output`` is this batch's own (a previous run): it may be replaced


@dataclass(frozen=True)
class Skip:
    """An input found but not upsampled, and why (a scout, not CT, a single slice...)."""

    key: str
    path: str
    reason: str
    series_uid: str = ""
    label: str = ""


@dataclass(frozen=True)
class Found:
    """A discovered input before its output name is assigned: a volume file or one DICOM series."""

    key: str
    kind: str
    path: str
    base_name: str
    files: tuple[str, ...]
    series_uid: str = ""
    label: str = ""
    ext: str = ""  # the input's own output extension for ``--format auto`` ("" = DICOM folder)
    spacing: float | None = None  # manifest overrides
    method: str | None = None
    options: tuple[tuple[str, object], ...] = ()
    name: str | None = None
    source: str = ""  # where it was given: the command-line input, or "manifest.csv line 3"


def files_signature(files: tuple[str, ...]) -> str:
    """A short hash of the files' names, sizes and modification times: changes when an input is replaced or edited,
    without reading the data (a re-run of a 1,000-scan cohort must not re-read terabytes to find nothing to do)."""
    digest = hashlib.sha1()
    for name in sorted(files):
        try:
            st = os.stat(name)
            digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{name}\0missing\n".encode())
    return digest.hexdigest()[:16]


def settings_signature(spacing: float, method: str, options: tuple[tuple[str, object], ...], output: str,
                       dtype: str) -> str:
    """A short hash of what a case's result depends on besides its input."""
    text = json.dumps([float(spacing), method, [list(o) for o in options], output, dtype], default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def output_path(out_dir: Path, name: str, ext: str) -> str:
    """Where a case's result goes: ``DIR/name.ext``, or the folder ``DIR/name/`` for a DICOM series."""
    return str(out_dir / (name + ext)) if ext else str(out_dir / name) + os.sep
