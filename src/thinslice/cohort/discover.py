"""Finding the cases of a cohort: volume files, folders of them, DICOM trees and CSV manifests.

A DICOM tree is walked folder by folder; the series of each folder come from :func:`thinslice.io.list_dicom_series`
(the reader's own grouping, so that a case is read exactly as ``thinslice upsample`` would read it). What a hospital
export holds besides the axial CT series (scouts, reformats, MR or PET, single slices, mixed orientations) is
recognised from the headers alone and recorded as skipped with the reason, before any voxel is read.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections.abc import Collection, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np

from thinslice.cohort.cases import Found, Skip
from thinslice.errors import ThinsliceError
from thinslice.io import list_dicom_series
from thinslice.io.formats import (
    DATA_FILE_SUFFIXES,
    file_extension,
    is_volume_file_name,
    single_file_suffix,
    strip_volume_suffix,
)
from thinslice.io.readers import files_read

log = logging.getLogger(__name__)

# A series is axial when its slice normal is within this angle of the patient's head-feet axis (gantry tilt included).
AXIAL_MAX_DEG = 40.0
_HEADER_TAGS = ["SeriesInstanceUID", "StudyInstanceUID", "Modality", "PatientID", "StudyDate", "StudyID",
                "SeriesNumber", "SeriesDescription", "ImageType", "ImageOrientationPatient"]
# Files that are never a volume nor a DICOM slice (data files of detached headers, notes, tables).
_NOT_IMAGES = (*DATA_FILE_SUFFIXES, ".txt", ".csv", ".json", ".md", ".xml", ".html", ".png", ".jpg")
MANIFEST_COLUMNS = ("input", "output", "spacing", "method", "options", "series")


def discover(inputs: Iterable[str | Path], exclude: Path | None = None,
             skip: Collection[str] = frozenset()) -> tuple[list[Found], list[Skip]]:
    """Every case under ``inputs`` (files, folders, DICOM trees, ``.csv`` manifests) and every input skipped.

    ``exclude`` (the output folder) is never searched, nor are the files and folders whose resolved paths are in
    ``skip`` (what the batch wrote, for an output folder inside an input folder). An input that does not exist is
    an error, not a skip: it is a typo in the command, not a property of the data. An input given twice is returned
    twice (each with its ``source``): the batch decides what repeats mean.
    """
    found: list[Found] = []
    skipped: list[Skip] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise ThinsliceError(f"input {path} does not exist; check the path")
        if path.is_file() and path.name.lower().endswith(".csv"):
            f, s = read_manifest(path, exclude, skip)
        elif path.is_dir():
            f, s = scan_tree(path, exclude, skip)
        else:
            f, s = _single_file(path)
        found += [x if x.source else replace(x, source=str(path)) for x in f]
        skipped += s
    return found, skipped


def _single_file(path: Path) -> tuple[list[Found], list[Skip]]:
    """A file given by name: a volume file, or one DICOM file standing for its series."""
    if is_volume_file_name(path):
        return [volume_file(path)], []
    header = _header(path)
    if header is None:
        return [], [Skip(str(path.resolve()), str(path), "neither a volume file (.nii.gz, .nrrd, .mha...) nor DICOM")]
    uid = _text(header, "SeriesInstanceUID")
    found, skipped = scan_folder(path.parent)
    return [f for f in found if _is_series(f.series_uid, uid)], [s for s in skipped if _is_series(s.series_uid, uid)]


def _is_series(selector: str, uid: str) -> bool:
    """Whether a series selector (a UID, or ``UID:orientation`` for part of a split series) belongs to ``uid``."""
    return selector == uid or selector.split(":")[0] == uid


def volume_file(path: Path) -> Found:
    """A NIfTI/NRRD/MetaImage file as a case, named after its stem."""
    # Detached headers (.nhdr/.mhd) are written as their single-file twins, which carry the data inside.
    out_ext = single_file_suffix(file_extension(path))
    return Found(key=str(path.resolve()), kind="file", path=str(path),
                 base_name=safe_name(strip_volume_suffix(path.name)), files=_volume_files(path), ext=out_ext,
                 label=path.name)


def _volume_files(path: Path) -> tuple[str, ...]:
    """The header and every data file it names, so that a resume notices a replaced data file too (a header that
    names a file outside its folder is refused when the case is read)."""
    try:
        return tuple(str(p.resolve()) for p in files_read(path))
    except ThinsliceError:
        return (str(path.resolve()),)


# ------------------------------------------------------------------------------------------------ folders
def scan_tree(root: Path, exclude: Path | None = None,
              skip: Collection[str] = frozenset()) -> tuple[list[Found], list[Skip]]:
    """Volume files and DICOM series in ``root`` and all its subfolders (hidden folders, ``exclude`` and the paths in
    ``skip`` left out). Symbolic links to folders are followed (archives are often assembled from links), each real
    folder visited once, so a link loop or two links to one folder cannot repeat or hang the search."""
    found: list[Found] = []
    skipped: list[Skip] = []
    excluded = {str(exclude.resolve())} if exclude is not None else set()
    excluded |= set(skip)
    visited: set[str] = set()
    for folder, dirs, _names in os.walk(root, followlinks=True):
        here = Path(folder)
        real = os.path.realpath(here)
        if real in visited or (real in excluded and here != root):  # (--out may be the input folder itself)
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(here / d) not in excluded
                         and os.path.realpath(here / d) not in visited)
        f, s = scan_folder(here, skip)
        found += f
        skipped += s
    return found, skipped


def scan_folder(folder: Path, skip: Collection[str] = frozenset()) -> tuple[list[Found], list[Skip]]:
    """The volume files and DICOM series stored directly in ``folder`` (the files in ``skip`` left out)."""
    found: list[Found] = []
    maybe_dicom = False
    real = os.path.realpath(folder) if skip else ""
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_file() or (skip and _real(real, entry) in skip):
            continue
        if is_volume_file_name(entry):
            found.append(volume_file(entry))
        elif not entry.name.lower().endswith(_NOT_IMAGES):
            maybe_dicom = True
    if not maybe_dicom:
        return found, []
    try:
        series = list_dicom_series(folder)
    except (ThinsliceError, OSError) as exc:  # an unreadable folder is one skip, not the end of the cohort
        return found, [Skip(str(folder.resolve()), str(folder), f"cannot list the DICOM series: {exc}")]
    skipped: list[Skip] = []
    for info in series:
        case, skip_ = dicom_series(folder, info)
        found += [case] if case else []
        skipped += [skip_] if skip_ else []
    return found, skipped


def _real(real_folder: str, entry: Path) -> str:
    """The resolved path of ``entry`` of a folder whose resolved path is ``real_folder`` (one system call unless the
    entry is itself a link: an archive of a million slices is not resolved component by component)."""
    return os.path.realpath(entry) if entry.is_symlink() else os.path.join(real_folder, entry.name)


# -------------------------------------------------------------------------------------------------- DICOM
def dicom_series(folder: Path, info: object) -> tuple[Found | None, Skip | None]:
    """One series of ``list_dicom_series`` as a case, or as a skip with the reason read from its headers."""
    uid = str(getattr(info, "uid", ""))
    files = tuple(str(Path(f).resolve()) for f in (getattr(info, "files", ()) or _files_of(folder, uid)))
    uid = str(getattr(info, "label", "") or uid)  # what read_volume's series_uid takes (UID, or UID:orientation)
    headers = [h for h in (_header(Path(f)) for f in files) if h is not None]
    first = headers[0] if headers else None
    label = _label(first, folder)
    key = f"{folder.resolve()}#{uid}"
    # then what discovery saw in the pixel headers: a segmentation, a dose screen or exam summary, a scout
    reason = series_skip_reason(headers, len(files)) or str(getattr(info, "not_stack", ""))
    if reason:
        return None, Skip(key, str(folder), reason, uid, label)
    return Found(key=key, kind="dicom", path=str(folder), base_name=dicom_name(first, uid), files=files,
                 series_uid=uid, label=label, ext=""), None


def series_skip_reason(headers: list, num_files: int) -> str:
    """Why a series is not an axial CT volume ('' when it is one)."""
    if not headers:
        return "no readable DICOM header in the series"
    modality = _text(headers[0], "Modality") or "unknown"
    if modality != "CT":
        return f"modality {modality} is not CT"
    image_type = {str(v).upper() for v in (headers[0].get("ImageType") or [])}
    if "LOCALIZER" in image_type or "SCOUT" in image_type or "TOPOGRAM" in image_type:
        return "localizer/scout image (ImageType " + "\\".join(sorted(image_type)) + ")"
    if num_files < 2:
        return "only one slice (a scout, a dose report or a single image), not a volume"
    found = [o for h in headers if (o := _orientation(h)) is not None]
    orientations = {tuple(np.round(o, 3)) for o in found}
    if len(orientations) > 1:
        return f"inconsistent geometry: {len(orientations)} different slice orientations in one series"
    if orientations:
        tilt = _tilt_deg(np.array(next(iter(orientations))))
        if tilt > AXIAL_MAX_DEG:
            return f"not axial (slices {tilt:.0f} degrees from axial: a coronal/sagittal reformat or a scout)"
    return ""


def _orientation(header) -> np.ndarray | None:
    try:
        values = np.array([float(v) for v in header.get("ImageOrientationPatient")], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return values if values.shape == (6,) else None


def _tilt_deg(orientation: np.ndarray) -> float:
    """Angle between the slice normal and the head-feet axis, in degrees."""
    normal = np.cross(orientation[:3], orientation[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return 90.0
    return float(np.degrees(np.arccos(min(1.0, abs(normal[2]) / norm))))


def dicom_name(header, uid: str) -> str:
    """``patient_study_series-description``: readable in a file browser, stable across runs."""
    patient = _text(header, "PatientID") or "anonymous"
    study = _text(header, "StudyDate") or _text(header, "StudyID") or _short(_text(header, "StudyInstanceUID"))
    number = _text(header, "SeriesNumber")
    series = "_".join(p for p in (f"s{number}" if number else _short(uid), _text(header, "SeriesDescription")) if p)
    return safe_name(f"{patient}_{study}_{series}")


def _label(header, folder: Path) -> str:
    if header is None:
        return folder.name
    parts = [_text(header, k) for k in ("PatientID", "StudyDate", "SeriesNumber", "SeriesDescription")]
    return " / ".join(p for p in parts if p) or folder.name


def _files_of(folder: Path, uid: str) -> tuple[str, ...]:
    """The files of series ``uid`` in ``folder`` by their headers (when the series listing carries no file list)."""
    return tuple(str(p) for p in sorted(folder.iterdir())
                 if p.is_file() and _text(_header(p), "SeriesInstanceUID") == uid)


def _header(path: Path):
    """The DICOM header of ``path`` (no pixels; old files without file meta too), or None when it is not DICOM."""
    from thinslice.io.dicom import read_header

    return read_header(path, _HEADER_TAGS)


def _text(header, keyword: str) -> str:
    if header is None:
        return ""
    value = header.get(keyword, "")
    return " ".join(str(value if value is not None else "").split())


def _short(uid: str) -> str:
    return hashlib.sha1(uid.encode()).hexdigest()[:8] if uid else ""


def safe_name(text: str, limit: int = 80) -> str:
    """``text`` as a portable file name: letters, digits, ``-`` and ``_`` (no dots, which would read as an
    extension)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-_")[:limit] or "case"


# ----------------------------------------------------------------------------------------------- manifest
def read_manifest(path: Path, exclude: Path | None = None,
                  skip: Collection[str] = frozenset()) -> tuple[list[Found], list[Skip]]:
    """Cases from a CSV manifest: columns ``input`` (required), ``output`` (a name), ``spacing``, ``method``,
    ``options`` (``KEY=VALUE`` separated by ``;``) and ``series`` (a UID); relative inputs are relative to the
    manifest's folder."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ThinsliceError(f"cannot read the manifest {path}: {exc}") from None
    if rows and "input" not in rows[0]:
        raise ThinsliceError(f"manifest {path} has no 'input' column; its columns are {', '.join(rows[0])} (expected "
                             f"{', '.join(MANIFEST_COLUMNS)})")
    found: list[Found] = []
    skipped: list[Skip] = []
    for number, row in enumerate(rows, start=2):
        f, s = _manifest_row(path, number, row, exclude, skip)
        found += f
        skipped += s
    return found, skipped


def _manifest_row(manifest: Path, number: int, row: dict, exclude: Path | None,
                  skip: Collection[str] = frozenset()) -> tuple[list[Found], list[Skip]]:
    where = f"{manifest} line {number}"
    text = (row.get("input") or "").strip()
    if not text:
        raise ThinsliceError(f"{where}: empty 'input'; give a volume file or DICOM folder")
    source = Path(text) if Path(text).is_absolute() else manifest.parent / text
    if not source.exists():
        return [], [Skip(f"{source.resolve()}", str(source), f"{where}: input does not exist")]
    found, skipped = scan_tree(source, exclude, skip) if source.is_dir() else _single_file(source)
    series = (row.get("series") or "").strip()
    if series:
        found = [f for f in found if _is_series(f.series_uid, series)]
        skipped = [s for s in skipped if _is_series(s.series_uid, series)]
        if not found and not skipped:
            skipped = [Skip(f"{source.resolve()}#{series}", str(source), f"{where}: series {series} not found")]
    overrides = _overrides(where, row)
    if overrides.get("name") and len(found) > 1:
        raise ThinsliceError(f"{where}: output name {overrides['name']!r} for {len(found)} series; add a 'series' "
                             "column or list each series on its own line")
    return [_with(f, {**overrides, "source": where}) for f in found], skipped


def _overrides(where: str, row: dict) -> dict:
    """A manifest row's per-case settings, checked."""
    out: dict = {}
    if (row.get("output") or "").strip():
        name = row["output"].strip()
        out["name"] = safe_name(strip_volume_suffix(name))
    if (row.get("spacing") or "").strip():
        try:
            out["spacing"] = float(row["spacing"])
        except ValueError:
            raise ThinsliceError(f"{where}: spacing {row['spacing']!r} is not a number of mm") from None
        if not out["spacing"] > 0:
            raise ThinsliceError(f"{where}: spacing must be positive (mm)")
    if (row.get("method") or "").strip():
        out["method"] = row["method"].strip()
    if (row.get("options") or "").strip():
        pairs = [p.partition("=") for p in row["options"].split(";") if p.strip()]
        if any(not sep or not key.strip() for key, sep, _ in pairs):
            raise ThinsliceError(f"{where}: options must be KEY=VALUE separated by ';', got {row['options']!r}")
        out["options"] = tuple((k.strip().replace("-", "_"), v.strip()) for k, _, v in pairs)
    return out


def _with(found: Found, overrides: dict) -> Found:
    from dataclasses import replace

    return replace(found, **overrides)
