"""The volume formats thinslice reads and writes: one row each, the only place that lists their suffixes.

Readers, writers, the cohort and training discovery, the command line's output checks and every name-stripping
helper look formats up here, so that a new format is one new row (and its reader/writer functions). Readers and
writers are named as ``"module:function"`` strings and imported on first use: they import this table themselves.

Suffixes are compared in lower case. The first suffix of a row is its single-file form (the one a cohort writes for
a detached header of the same format); suffixes in ``written_beside`` are detached headers whose voxels ITK writes
into a data file beside them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from thinslice.io.discovery import is_dicom_file


def _frozen(mapping: Mapping[str, tuple[str, ...]]) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, eq=False)  # rows compare by identity (``fmt is NIFTI``), and hash so
class FileFormat:
    """One volume format: how it is recognised, which functions read and write it, and what of a header it keeps.

    ``reader(path, series_uid)`` returns a Volume; ``writer(volume, path, dtype=, overwrite=, options=)`` writes one
    (``options``: the DICOM series options, unused by the file formats).
    """

    name: str  # short name; for a written single-file suffix the cohort's --format name is the suffix itself
    title: str  # what messages call it
    suffixes: tuple[str, ...]  # lower case; empty for the fall-back row
    reader: str  # "module:function"
    writer: str | None  # "module:function", or None when thinslice does not write the format
    read_with: str  # the library that decodes it
    write_with: str
    keeps: str  # what a read and a write keep of the header
    written_beside: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # header suffix -> data files
    read_beside: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # named suffix -> files read with it
    uncompressed: tuple[str, ...] = ()  # suffixes written without compression
    folder: bool = False  # read from and written to a folder (a DICOM series)

    def __post_init__(self) -> None:
        object.__setattr__(self, "written_beside", _frozen(self.written_beside))
        object.__setattr__(self, "read_beside", _frozen(self.read_beside))

    def read(self, path: Path, series_uid: str | None = None) -> Any:
        """The Volume in ``path`` (``series_uid`` picks a DICOM series; the file formats ignore it)."""
        return _resolve(self.reader)(path, series_uid)

    def write(self, volume: Any, path: Path, *, dtype: str, overwrite: bool, options: Any) -> None:
        """Write ``volume`` to ``path`` in this format (checks of the target are the caller's)."""
        if self.writer is None:
            raise ValueError(f"thinslice does not write {self.title}")  # no row without a writer is looked up
        _resolve(self.writer)(volume, path, dtype=dtype, overwrite=overwrite, options=options)

    @property
    def single_file_suffixes(self) -> tuple[str, ...]:
        """The suffixes that hold a whole volume in one file (not the detached headers)."""
        return tuple(s for s in self.suffixes if s not in self.written_beside)


NIFTI = FileFormat(
    name="nifti", title="NIfTI", suffixes=(".nii.gz", ".nii"),
    reader="thinslice.io.readers:read_nifti_file", writer="thinslice.io.writers:write_image_file",
    read_with="nibabel (header and geometry; NIfTI-1 and NIfTI-2)", write_with="SimpleITK (NIfTI-1)",
    keeps="geometry (sform/qform: spacing, origin, direction; a sheared sform resampled), voxel type, the slice "
          "thickness as a note in descrip; no other metadata",
    uncompressed=(".nii",))
NRRD = FileFormat(
    name="nrrd", title="NRRD", suffixes=(".nrrd", ".nhdr"),
    reader="thinslice.io.readers:read_itk_file", writer="thinslice.io.writers:write_image_file",
    read_with="SimpleITK", write_with="SimpleITK",
    keeps="geometry, voxel type, the slice thickness and thinslice's metadata as key/value fields",
    written_beside={".nhdr": (".raw.gz", ".raw")})
METAIMAGE = FileFormat(
    name="metaimage", title="MetaImage", suffixes=(".mha", ".mhd"),
    reader="thinslice.io.readers:read_itk_file", writer="thinslice.io.writers:write_image_file",
    read_with="SimpleITK", write_with="SimpleITK",
    keeps="geometry, voxel type, the slice thickness and thinslice's metadata as key/value fields",
    written_beside={".mhd": (".zraw", ".raw")})
DICOM = FileFormat(
    name="dicom", title="DICOM series", suffixes=(".dcm", ".ima", ".dicom"),
    reader="thinslice.io.readers:read_dicom_input", writer="thinslice.io.writers:write_dicom_folder",
    read_with="pydicom (headers, series grouping) and SimpleITK/GDCM (pixels)", write_with="pydicom",
    keeps="read: geometry from the slice positions, rescale, padding, slice thickness, patient/study/series tags; "
          "written: a new derived int16 CT series in the source's patient and study", folder=True)
OTHER_ITK = FileFormat(
    name="itk", title="other ITK image", suffixes=(),
    reader="thinslice.io.readers:read_itk_file", writer=None,
    read_with="SimpleITK (any 3D file it opens, e.g. an Analyze .hdr/.img pair)", write_with="",
    keeps="geometry and voxel type as ITK reads them", read_beside={".hdr": (".img", ".img.gz")})

FORMATS: tuple[FileFormat, ...] = (NIFTI, NRRD, METAIMAGE, DICOM, OTHER_ITK)
FILE_FORMATS: tuple[FileFormat, ...] = tuple(f for f in FORMATS if f.suffixes and not f.folder)
VOLUME_SUFFIXES: tuple[str, ...] = tuple(s for f in FILE_FORMATS for s in f.suffixes)  # one file each
DICOM_SUFFIXES: tuple[str, ...] = DICOM.suffixes
# Files that only hold the voxels of a header beside them (never a volume or DICOM file on their own).
DATA_FILE_SUFFIXES: tuple[str, ...] = tuple(dict.fromkeys(
    s for f in FORMATS for beside in (f.written_beside, f.read_beside) for group in beside.values() for s in group))


def _resolve(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def file_extension(path: str | Path) -> str:
    """Lower-case extension, with a table suffix of two parts (``.nii.gz``) kept whole."""
    name = Path(path).name.lower()
    for suffix in (s for f in FORMATS for s in f.suffixes if s.count(".") > 1):
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def format_for_suffix(ext: str) -> FileFormat | None:
    """The row whose suffixes hold ``ext`` (as :func:`file_extension` gives it), or None."""
    return next((f for f in FORMATS if ext.lower() in f.suffixes), None)


def is_volume_file_name(path: str | Path) -> bool:
    """Whether ``path``'s name ends with a suffix of a single-file format (NIfTI, NRRD, MetaImage)."""
    return file_extension(path) in VOLUME_SUFFIXES


def input_format(path: Path) -> FileFormat:
    """The row that reads ``path``: a folder is a DICOM series; a file by its suffix, else DICOM when its header
    says so, else whatever else ITK can open."""
    if path.is_dir():
        return DICOM
    found = format_for_suffix(file_extension(path))
    if found is not None:
        return found
    return DICOM if path.is_file() and is_dicom_file(path) else OTHER_ITK


def strip_volume_suffix(name: str) -> str:
    """``name`` without its volume-file suffix (``ct.nii.gz`` -> ``ct``); other names unchanged."""
    ext = file_extension(name)
    return name[: len(name) - len(ext)] if ext in VOLUME_SUFFIXES and len(name) > len(ext) else name


def single_file_suffix(ext: str) -> str:
    """The single-file twin of a detached header's suffix (``.nhdr`` -> ``.nrrd``, ``.mhd`` -> ``.mha``): what a
    cohort writes for such an input, with the voxels inside; other suffixes unchanged."""
    found = format_for_suffix(ext)
    return found.suffixes[0] if found is not None and ext in found.written_beside else ext


def files_written_beside(path: Path) -> list[Path]:
    """The data files a write of ``path`` puts beside it (a detached header's .raw/.zraw...; none otherwise)."""
    ext = path.suffix.lower()
    found = format_for_suffix(ext)
    stem = path.name[: len(path.name) - len(path.suffix)]
    return [path.with_name(stem + s) for s in (found.written_beside.get(ext, ()) if found else ())]


def files_read_beside(path: Path) -> list[Path]:
    """The files by fixed name that a read of ``path`` opens beside it (an Analyze .hdr's .img), where they exist."""
    group = next((g for f in FORMATS for suffix, g in f.read_beside.items() if path.suffix.lower() == suffix), ())
    return [p for p in (path.with_suffix(s) for s in group) if p.is_file()]


def writes_compressed(path: str | Path) -> bool:
    """Whether a file output is written compressed (all but the suffixes a row lists as uncompressed)."""
    ext = file_extension(path)
    return not any(ext in f.uncompressed for f in FORMATS)


def output_suffixes() -> dict[str, str]:
    """The cohort's ``--format`` names and the suffix each writes ("" for a DICOM series folder)."""
    names = {s.lstrip("."): s for f in FILE_FORMATS if f.writer for s in f.single_file_suffixes}
    return names | {f.name: "" for f in FORMATS if f.folder and f.writer}


def writable_suffixes() -> tuple[str, ...]:
    """Every suffix a file output may end with."""
    return tuple(s for f in FILE_FORMATS if f.writer for s in f.suffixes)


def readable_text() -> str:
    """The formats a user may pass, for messages: 'NIfTI (.nii.gz/.nii), NRRD (...) ... or a DICOM series folder'."""
    files = ", ".join(f"{f.title} ({'/'.join(f.suffixes)})" for f in FILE_FORMATS)
    return f"{files} or a DICOM series folder"


def writable_text() -> str:
    """The file suffixes a user may write, for messages: '.nii.gz, .nii, ... or .mhd'."""
    *rest, last = writable_suffixes()
    return f"{', '.join(rest)} or {last}"
