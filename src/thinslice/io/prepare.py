"""Turn a collection of CT scans (a LIDC-IDRI-like DICOM tree or a folder of volumes) into a training set.

Output layout (all paths in text files are relative to ``OUT_DIR``)::

    OUT_DIR/volumes/<patient>_<series id>.nii.gz   one int16 HU NIfTI per usable CT series
    OUT_DIR/series.csv                              every series found, converted or skipped (with the reason)
    OUT_DIR/train.txt, val.txt, test.txt            volume paths, split by patient
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from thinslice.errors import ThinsliceError
from thinslice.io.atomic import write_text_atomic
from thinslice.io.dicom import header_text, read_header
from thinslice.io.formats import DATA_FILE_SUFFIXES, VOLUME_SUFFIXES, file_extension, is_volume_file_name
from thinslice.io.readers import read_volume
from thinslice.io.tables import spreadsheet_safe
from thinslice.io.volume import Volume
from thinslice.io.writers import write_volume

SPLIT_NAMES = ("train", "val", "test")
CSV_COLUMNS = ("file", "patient", "series_uid", "modality", "shape", "spacing", "slice_thickness", "status",
               "reason", "source")
_HEADER_TAGS = ["SeriesInstanceUID", "Modality", "PatientID", "SeriesDescription"]
# Data files of detached-header formats: read through their header, never on their own.
_DATA_SUFFIXES = (*DATA_FILE_SUFFIXES, ".gz")


@dataclass
class SeriesRow:
    """One line of ``series.csv``."""

    patient: str
    series_uid: str
    modality: str
    source: str
    file: str = ""
    shape: str = ""
    spacing: str = ""
    slice_thickness: str = ""
    status: str = "skipped"
    reason: str = ""

    def as_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in CSV_COLUMNS}


@dataclass
class PrepareReport:
    """What :func:`prepare_dataset` found and wrote."""

    out_dir: Path
    rows: list[SeriesRow] = field(default_factory=list)
    splits: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def converted(self) -> list[SeriesRow]:
        return [r for r in self.rows if r.status == "ok"]

    def summary(self) -> str:
        """A short table: counts per status and reason, then the split sizes."""
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for row in self.rows:
            counts[(row.status, _reason_kind(row.reason) if row.status != "ok" else "")] += 1
        lines = [f"{'status':<9} {'series':>6}  reason"]
        for (status, reason), n in sorted(counts.items()):
            lines.append(f"{status:<9} {n:>6}  {reason}")
        patients = {r.patient for r in self.converted}
        lines.append(f"converted {len(self.converted)} CT series of {len(patients)} patients into "
                     f"{self.out_dir / 'volumes'}")
        split_text = ", ".join(f"{name} {len(self.splits.get(name, []))}" for name in SPLIT_NAMES)
        lines.append(f"split (volumes): {split_text}; table: {self.out_dir / 'series.csv'}")
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    """The reason without its numbers, so that the summary groups similar skips."""
    head, sep, tail = reason.split(";")[0].partition(" (")
    return (re.sub(r"[-+]?\d+(\.\d+)?", "N", head) + sep + tail)[:100]


def prepare_dataset(
    src: str | Path,
    out: str | Path,
    *,
    min_slices: int = 16,
    max_slice_spacing: float = 3.0,
    seed: int = 0,
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
    progress: bool = False,
) -> PrepareReport:
    """Convert every usable CT series under ``src`` to NIfTI in ``out`` and split the patients.

    A series is skipped (with a reason in ``series.csv``) when it is not CT, has fewer than ``min_slices`` slices, or
    its slices are more than ``max_slice_spacing`` mm apart. Patients are shuffled with ``seed`` and divided by the
    ``split`` fractions (train, val, test), so that no patient is in two splits.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ThinsliceError(f"{src} is not a folder; pass the folder holding the DICOM studies or volume files")
    if src.resolve() == out.resolve():
        raise ThinsliceError("the output folder must differ from the source folder")
    fractions = _check_split(split)
    if min_slices < 2:
        raise ThinsliceError("--min-slices must be at least 2")
    if max_slice_spacing <= 0:
        raise ThinsliceError("--max-slice-spacing must be positive (mm)")

    volume_files, dicom_series, unreadable = _scan(src, out)
    if not volume_files and not dicom_series:
        extra = f" ({unreadable} files that are neither DICOM nor volumes)" if unreadable else ""
        raise ThinsliceError(f"no DICOM series and no NIfTI/NRRD/MHA files found under {src}{extra}")

    volumes_dir = out / "volumes"
    volumes_dir.mkdir(parents=True, exist_ok=True)
    tasks: list[tuple[SeriesRow, Path | None, list[Path]]] = []
    for path in volume_files:
        patient = _stem(path)
        tasks.append((SeriesRow(patient=_safe(patient), series_uid="", modality="", source=str(path)), path, []))
    for uid, entry in dicom_series.items():
        row = SeriesRow(patient=_safe(entry["patient"]), series_uid=uid, modality=entry["modality"],
                        source=str(entry["folders"][0]) if len(entry["folders"]) == 1 else str(src))
        tasks.append((row, None, entry["files"]))
    tasks.sort(key=lambda t: (t[0].patient, t[0].series_uid, t[0].source))

    used_names: set[str] = set()
    report = PrepareReport(out_dir=out)
    for row, volume_file, files in tqdm(tasks, desc="prepare", unit="series", disable=not progress):
        _process(row, volume_file, files, volumes_dir, used_names, min_slices, max_slice_spacing)
        report.rows.append(row)

    report.splits = _split_patients(report.converted, fractions, seed)
    write_text_atomic(out / "series.csv", _csv_text(report.rows))
    for name in SPLIT_NAMES:
        write_text_atomic(out / f"{name}.txt", "".join(f"{p.as_posix()}\n" for p in report.splits[name]))
    report.splits = {name: [out / p for p in paths] for name, paths in report.splits.items()}
    return report


def read_split_file(path: str | Path) -> list[Path]:
    """Volume paths listed in a split file (one per line; relative paths are relative to the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise ThinsliceError(f"split file {path} does not exist; create it with `thinslice prepare`")
    entries: list[Path] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entry = Path(line)
        entries.append(entry if entry.is_absolute() else path.parent / entry)
    missing = [p for p in entries if not p.exists()]
    if missing:
        raise ThinsliceError(f"{len(missing)} of {len(entries)} volumes listed in {path} are missing (first: "
                             f"{missing[0]}); re-run `thinslice prepare` or fix the list")
    return entries


def resolve_data_paths(specs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Volume files from split files (.txt), folders (their NIfTI/NRRD/MHA files) or individual files: how every
    training and benchmark command turns its data arguments into volumes (read by :func:`training_volume`)."""
    if isinstance(specs, (str, Path)):
        specs = [specs]
    paths: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.suffix == ".txt" and p.is_file():
            paths += read_split_file(p)
        elif p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and is_volume_file_name(f))
            if not found:
                raise ThinsliceError(f"no volume files ({', '.join(VOLUME_SUFFIXES)}) in folder {p}")
            paths += found
        elif p.exists():
            paths.append(p)
        else:
            raise ThinsliceError(f"training data not found: {p}; pass a split .txt file, a folder or volume files")
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise ThinsliceError(f"{len(missing)} listed volume(s) do not exist, e.g. {missing[0]}")
    if not paths:
        raise ThinsliceError("no training volumes given")
    return paths


def training_volume(item: Volume | str | Path) -> Volume:
    """A training volume given in memory or as a file (one of :func:`resolve_data_paths`), read when it is a path."""
    return item if isinstance(item, Volume) else read_volume(Path(item))


# ------------------------------------------------------------------------------------------------ scanning
def _scan(src: Path, out: Path) -> tuple[list[Path], dict[str, dict], int]:
    """Volume files and DICOM series (grouped by SeriesInstanceUID from headers only) under ``src``."""
    out_abs = out.resolve()
    volume_files: list[Path] = []
    series: dict[str, dict] = {}
    unreadable = 0
    for root, dirs, names in os.walk(src):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (root_path / d).resolve() != out_abs)
        for name in sorted(names):
            path = root_path / name
            ext = file_extension(path)
            if name.startswith("."):
                continue
            if ext in VOLUME_SUFFIXES:
                volume_files.append(path)
                continue
            if name.lower().endswith(_DATA_SUFFIXES) or ext in (".xml", ".txt", ".csv", ".json", ".md"):
                continue
            ds = read_header(path, _HEADER_TAGS)
            uid = header_text(ds, "SeriesInstanceUID")
            if ds is None or not uid:
                unreadable += 1
                continue
            entry = series.setdefault(uid, {"files": [], "folders": [], "modality": header_text(ds, "Modality"),
                                            "patient": header_text(ds, "PatientID")
                                            or path.relative_to(src).parts[0]})
            entry["files"].append(path)
            if root_path not in entry["folders"]:
                entry["folders"].append(root_path)
    return volume_files, series, unreadable


def _process(row: SeriesRow, path: Path | None, files: list[Path], volumes_dir: Path, used_names: set[str],
             min_slices: int, max_slice_spacing: float) -> None:
    """Check, read and convert one series; the outcome is recorded in ``row``."""
    if path is None:  # a DICOM series
        if row.modality != "CT":
            row.reason = f"modality {row.modality or 'unknown'} is not CT"
            return
        if len(files) < min_slices:
            row.reason = f"only {len(files)} slices (< --min-slices {min_slices})"
            return
        folders = {f.parent for f in files}
        if len(folders) > 1:
            row.reason = f"series files are spread over {len(folders)} folders; gather them in one folder"
            return
    try:
        volume = read_volume(path) if path is not None else read_volume(files[0].parent, row.series_uid)
    except ThinsliceError as exc:
        row.status, row.reason = "failed", str(exc)
        return
    row.shape = "x".join(str(n) for n in volume.shape_ijk)
    row.spacing = "x".join(f"{s:.4g}" for s in volume.spacing)
    row.slice_thickness = f"{volume.slice_thickness:.4g}" if volume.slice_thickness else ""
    if path is not None and volume.metadata.get("modality", "CT") != "CT":
        row.modality = volume.metadata["modality"]
        row.reason = f"modality {row.modality} is not CT"
        return
    row.modality = row.modality or volume.metadata.get("modality", "")
    # DICOM slices are stacked along index axis k; for other files the geometry tells (thickest axis).
    axis = 2 if path is None else volume.slice_axis
    n_slices, slice_spacing = volume.shape_ijk[axis], float(volume.spacing[axis])
    if n_slices < min_slices:
        row.reason = f"only {n_slices} slices (< --min-slices {min_slices})"
        return
    if slice_spacing > max_slice_spacing + 1e-6:
        row.reason = f"slice spacing {slice_spacing:.3g} mm (> --max-slice-spacing {max_slice_spacing:g})"
        return
    name = row.patient if path is not None else f"{row.patient}_{_short_id(row.series_uid)}"
    base, k = name, 1
    while name in used_names:  # two files with the same stem in different folders
        k += 1
        name = f"{base}-{k}"
    used_names.add(name)
    target = volumes_dir / f"{name}.nii.gz"
    try:
        write_volume(_clean(volume), target, dtype="int16", reference_input=path or files[0].parent)
    except ThinsliceError as exc:
        row.status, row.reason = "failed", str(exc)
        return
    row.file = target.relative_to(volumes_dir.parent).as_posix()
    row.status = "ok"


def _clean(volume: Volume) -> Volume:
    """The volume with only metadata worth keeping in a training file (no patient identifiers)."""
    keep = {k: v for k, v in volume.metadata.items() if k in ("modality", "series_description", "kernel",
                                                              "body_part", "padding_replaced")}
    return Volume(volume.array, volume.spacing, volume.origin, volume.direction, volume.slice_thickness, keep)


# ---------------------------------------------------------------------------------------------- splitting
def _check_split(split: tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in split)
    if len(values) != 3 or any(v < 0 or not np.isfinite(v) for v in values) or sum(values) <= 0:
        raise ThinsliceError(f"--split needs three non-negative fractions (train val test), got {split}")
    if abs(sum(values) - 1.0) > 1e-3:
        raise ThinsliceError(f"--split fractions must add up to 1, got {' + '.join(f'{v:g}' for v in values)}")
    return values[0], values[1], values[2]


def split_counts(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """Patients per split: largest remainders, and at least one for every non-zero fraction when n allows."""
    exact = [f * n for f in fractions]
    counts = [int(np.floor(x)) for x in exact]
    for i in sorted(range(3), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    wanted = [i for i in range(3) if fractions[i] > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                donor = max(range(3), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _split_patients(rows: list[SeriesRow], fractions: tuple[float, float, float], seed: int
                    ) -> dict[str, list[Path]]:
    patients = sorted({r.patient for r in rows})
    order = np.random.default_rng(seed).permutation(len(patients))
    counts = split_counts(len(patients), fractions)
    bounds = np.cumsum([0, *counts])
    split_of = {}
    for s, name in enumerate(SPLIT_NAMES):
        for idx in order[bounds[s]:bounds[s + 1]]:
            split_of[patients[idx]] = name
    splits: dict[str, list[Path]] = {name: [] for name in SPLIT_NAMES}
    for row in rows:
        splits[split_of[row.patient]].append(Path(row.file))
    return splits


# ---------------------------------------------------------------------------------------------- utilities
def _stem(path: Path) -> str:
    name = path.name
    ext = file_extension(path)
    return name[: len(name) - len(ext)] if ext else path.stem


def _safe(text: str) -> str:
    """A file-name-safe version of a patient id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "unknown"


def _short_id(series_uid: str) -> str:
    return hashlib.sha1(series_uid.encode()).hexdigest()[:8]


def _csv_text(rows: list[SeriesRow]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: spreadsheet_safe(v) for k, v in row.as_dict().items()})
    return buffer.getvalue()


