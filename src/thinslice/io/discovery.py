"""Finding the DICOM series of a folder: every header read once, with pydicom, and nothing decoded.

GDCM's own scanner re-reads the whole folder for every series (24 series, 840 files: 12 s) and stops at the first
file it cannot parse, so it is not used here. Files are grouped by SeriesInstanceUID and then by image orientation:
a topogram (scout) that shares the UID of its axial series becomes a group of its own, as dcm2niix splits it. Files
that are not DICOM are ignored; DICOM files that cannot be parsed are named in one note and left out.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from thinslice.errors import ThinsliceError
from thinslice.io.lazy import lazy_import

pydicom = lazy_import("pydicom")
log = logging.getLogger(__name__)

_TAGS = ["SOPClassUID", "Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
         "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns", "NumberOfFrames",
         "ImageType"]
# Two orientations are the same when their direction cosines differ by less than this.
_ORIENTATION_TOL = 1e-3
# A slice normal within this cosine of a patient axis names the orientation (else "oblique").
_ORIENTATION_NAME_COS = 0.9
_NAMED_FILES = 5  # unreadable files named in a note before "and N more"


@dataclass(frozen=True)
class SeriesInfo:
    """One group of images found in a folder: a series, or the part of it with one orientation."""

    uid: str
    description: str
    modality: str
    num_files: int
    folder: Path
    # The files sorted by their position along the slice normal (name order when positions are missing).
    files: tuple[str, ...] = field(default=(), repr=False, compare=False)
    number: int | None = None
    orientation: str = ""  # axial, coronal, sagittal, oblique; "" without ImageOrientationPatient
    spacing: float | None = None  # median gap between slice positions, mm
    sizes: tuple[tuple[str, int], ...] = ()  # ("512x512", file count) for each image size
    label: str = ""  # what --series takes for this group (the UID, or UID:orientation when a UID is split)
    frames: int = 1  # NumberOfFrames of a single multi-frame file
    sop_class: str = ""
    has_geometry: bool = False  # every file has a position, an orientation and a pixel spacing
    localizer: bool = False  # ImageType says LOCALIZER (a scout/topogram), never a volume

    @property
    def is_image(self) -> bool:
        return bool(self.sizes)

    @property
    def is_volume(self) -> bool:
        """A candidate 3D volume: a stack of 2 or more images, or one multi-frame image."""
        return self.is_image and not self.localizer and (self.num_files >= 2 or self.frames > 1)

    @property
    def count(self) -> int:
        return self.num_files if self.frames <= 1 else self.frames

    def describe(self) -> str:
        """One line: number, modality, orientation, count, spacing, description, label."""
        number = "-" if self.number is None else str(self.number)
        unit = "frames" if self.frames > 1 else ("images" if self.is_image else "objects")
        spacing = f"{self.spacing:.4g} mm" if self.spacing else "-"
        desc = self.description or "no description"
        return (f"#{number:<5} {self.modality or '?':<4} {self.orientation or '-':<8} {self.count:>5} {unit:<7} "
                f"{spacing:<9} {desc!r:<28} {self.label or self.uid}")


@dataclass
class FolderScan:
    """The series of one folder, and the files that were left out."""

    folder: Path
    series: list[SeriesInfo]
    unreadable: list[Path] = field(default_factory=list)

    @property
    def volumes(self) -> list[SeriesInfo]:
        return [s for s in self.series if s.is_volume]

    def listing(self) -> list[str]:
        """One line per candidate volume (sorted by SeriesNumber), then one line summing up the rest."""
        lines = [s.describe() for s in self.volumes]
        rest = [s for s in self.series if not s.is_volume]
        singles, objects = Counter(), Counter()
        for s in rest:
            if s.is_image:
                singles[(s.modality or "?") + (" scout" if s.localizer else "")] += s.num_files
            else:
                objects[s.modality or "?"] += s.num_files
        parts = []
        if singles:
            parts.append(f"{sum(singles.values())} single or scout image(s) ({_counts(singles)})")
        if objects:
            parts.append(f"{sum(objects.values())} non-image object(s) ({_counts(objects)})")
        if parts:
            lines.append("also " + " and ".join(parts) + ": not volumes")
        return lines

    def pick(self, key: str | None = None, file: Path | None = None) -> SeriesInfo:
        """The group ``--series KEY`` (UID, label or SeriesNumber) names, the one holding ``file``, or the only
        volume; otherwise an error whose details list the series."""
        holding = [s for s in self.series if str(file) in s.files] if file is not None else []
        if holding:
            return holding[0]
        if key is None:
            return self._only()
        matches = [s for s in self.series if key in (s.uid, s.label, str(s.number))]
        if not matches:
            raise ThinsliceError(f"series {key} is not in {self.folder}; pick one of those listed below",
                                 details=self.listing())
        volumes = [s for s in matches if s.is_volume]
        if len(volumes) > 1:
            raise ThinsliceError(f"{len(volumes)} series in {self.folder} match {key}; pick one by the UID or label "
                                 "in the last column below", details=[s.describe() for s in volumes])
        return self._chosen(volumes[0]) if volumes else matches[0]

    def _only(self) -> SeriesInfo:
        if len(self.volumes) == 1:
            return self._chosen(self.volumes[0])
        if not self.volumes and len(self.series) == 1:
            return self.series[0]  # one image: the reader says why it is not a volume
        if not self.volumes:
            raise ThinsliceError(f"{self.folder} holds no image series of 2 or more slices", details=self.listing())
        raise ThinsliceError(f"{self.folder} holds {len(self.volumes)} image series; pick one with --series NUMBER "
                             "or UID (listed below)", details=self.listing())

    def _chosen(self, chosen: SeriesInfo) -> SeriesInfo:
        others = [s for s in self.series if s.uid == chosen.uid and s is not chosen]
        if others:
            left = ", ".join(f"{s.num_files} {s.orientation or 'unoriented'}" for s in others)
            name = f"#{chosen.number}" if chosen.number is not None else chosen.uid
            log.info("series %s: %s image(s) of another orientation (scout/topogram) left out", name, left)
        return chosen


def _counts(counter: Counter) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counter.items()))


def list_dicom_series(folder: str | Path) -> list[SeriesInfo]:
    """The series of ``folder`` (not its subfolders), one entry per UID and orientation, sorted by SeriesNumber."""
    return scan_dicom_folder(folder).series


def scan_dicom_folder(folder: str | Path) -> FolderScan:
    """Read every file's header once and group the DICOM images of ``folder`` into series."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ThinsliceError(f"{folder} is not a folder; pass a folder that holds the DICOM files of a series")
    headers, unreadable = [], []
    with library_messages_to_debug():
        for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            header = _read_header(path)
            if header is not None and header["SeriesInstanceUID"]:
                headers.append((path, header))
            elif path.name.upper() != "DICOMDIR" and is_dicom_file(path):
                unreadable.append(path)  # starts like DICOM, but no series can be read from it
    if unreadable:
        names = ", ".join(p.name for p in unreadable[:_NAMED_FILES])
        more = f" and {len(unreadable) - _NAMED_FILES} more" if len(unreadable) > _NAMED_FILES else ""
        log.warning("%s: skipped %d file(s) that are not readable DICOM: %s%s", folder, len(unreadable), names, more)
    return FolderScan(folder, _group(folder, headers), unreadable)


@contextmanager
def library_messages_to_debug() -> Iterator[None]:
    """pydicom's warnings (Python warnings and its logger) go to thinslice's debug log, not the terminal."""
    pd_log = logging.getLogger("pydicom")
    saved = pd_log.propagate
    handler = _Forward()
    pd_log.addHandler(handler)
    pd_log.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        pd_log.removeHandler(handler)
        pd_log.propagate = saved
    for item in caught:
        log.debug("pydicom: %.200s", item.message)


class _Forward(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log.debug("pydicom: %.200s", record.getMessage())


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` starts like a DICOM Part-10 file (128-byte preamble then 'DICM')."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _read_header(path: Path) -> dict | None:
    """The tags of ``path`` that discovery needs, as plain Python values; None when it is not readable DICOM."""
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_TAGS)
    except pydicom.errors.InvalidDicomError:
        ds = _read_raw_dicom(path)
    except Exception:  # noqa: BLE001 - a damaged file may make pydicom fail in any way
        return None
    if ds is None:
        return None
    return {keyword: _value(ds, keyword) for keyword in _TAGS}


def _read_raw_dicom(path: Path) -> pydicom.Dataset | None:
    """A DICOM file without the 128-byte preamble (old archives), recognised by its first group (0008)."""
    try:
        with open(path, "rb") as fh:
            start = fh.read(4)
        if start[:2] not in (b"\x08\x00", b"\x02\x00"):
            return None
        return pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_TAGS, force=True)
    except Exception:  # noqa: BLE001
        return None


def _value(ds: pydicom.Dataset, keyword: str) -> object:
    """One element as a float tuple, an int or one-line text; None when absent or not parseable."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        if keyword in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
            return tuple(float(v) for v in value)
        if keyword in ("Rows", "Columns", "NumberOfFrames", "SeriesNumber"):
            return int(float(value))
        if keyword == "ImageType":
            return str(value) if isinstance(value, str) else "\\".join(str(v) for v in value)
        return " ".join(str(value).split())
    except (TypeError, ValueError, OverflowError):
        return None


# ------------------------------------------------------------------------------------------------- grouping
def _group(folder: Path, headers: list[tuple[Path, dict]]) -> list[SeriesInfo]:
    """One SeriesInfo per (UID, orientation), sorted by SeriesNumber, then description."""
    groups: dict[str, list[list[tuple[Path, dict]]]] = {}
    for path, header in headers:
        clusters = groups.setdefault(header["SeriesInstanceUID"], [])
        for cluster in clusters:
            if _same_orientation(cluster[0][1]["ImageOrientationPatient"], header["ImageOrientationPatient"]):
                cluster.append((path, header))
                break
        else:
            clusters.append([(path, header)])
    result = []
    for uid, clusters in groups.items():
        clusters.sort(key=len, reverse=True)
        infos = [_series_info(folder, uid, cluster) for cluster in clusters]
        words = Counter(info.orientation or "none" for info in infos)
        for index, info in enumerate(infos):
            word = info.orientation or "none"
            label = uid if len(infos) == 1 else f"{uid}:{word}" + (f"-{index + 1}" if words[word] > 1 else "")
            result.append(dataclasses.replace(info, label=label))
    return sorted(result, key=lambda s: (s.number is None, s.number or 0, s.description, s.uid, -s.num_files))


def _same_orientation(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and bool(np.max(np.abs(np.subtract(a, b))) < _ORIENTATION_TOL)


def _normal(header: dict) -> np.ndarray | None:
    iop = header["ImageOrientationPatient"]
    if iop is None or len(iop) != 6:
        return None
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    return normal / norm if norm > 1e-6 else None


def _orientation(header: dict) -> str:
    normal = _normal(header)
    if normal is None:
        return ""
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < _ORIENTATION_NAME_COS:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _series_info(folder: Path, uid: str, cluster: list[tuple[Path, dict]]) -> SeriesInfo:
    first = cluster[0][1]
    normal = _normal(first)
    positioned = normal is not None and all(h["ImagePositionPatient"] for _, h in cluster)
    if positioned:
        cluster = sorted(cluster, key=lambda item: float(np.dot(item[1]["ImagePositionPatient"], normal)))
    spacing = None
    if positioned and len(cluster) > 1:
        along = np.array([np.dot(h["ImagePositionPatient"], normal) for _, h in cluster])
        spacing = float(np.median(np.diff(along)))
    sizes = Counter(f"{h['Columns']}x{h['Rows']}" for _, h in cluster if h["Rows"] and h["Columns"])
    geometry = positioned and all(h["PixelSpacing"] for _, h in cluster)
    return SeriesInfo(uid=uid, description=first["SeriesDescription"] or "", modality=first["Modality"] or "",
                      num_files=len(cluster), folder=folder, files=tuple(str(p) for p, _ in cluster),
                      number=first["SeriesNumber"], orientation=_orientation(first), spacing=spacing,
                      sizes=tuple(sizes.most_common()), frames=int(first["NumberOfFrames"] or 1),
                      sop_class=first["SOPClassUID"] or "", has_geometry=geometry,
                      localizer="LOCALIZER" in (first["ImageType"] or "").upper())
