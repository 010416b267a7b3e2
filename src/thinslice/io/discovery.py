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
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from thinslice.errors import ThinsliceError
from thinslice.io.lazy import lazy_import

if TYPE_CHECKING:  # the real modules for the type checker; at run time they load on first use
    import pydicom
else:
    pydicom = lazy_import("pydicom")
log = logging.getLogger(__name__)

_TAGS = ["SOPClassUID", "SOPInstanceUID", "Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
         "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns", "NumberOfFrames",
         "ImageType", "SamplesPerPixel", "BitsAllocated", "PixelData"]
_GEOMETRY = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")
# A pixel spacing outside this range (mm) is a damaged header, not a scanner's voxel.
SPACING_RANGE_MM = (1e-3, 100.0)
# Pixel data is read deferred: its length and place in the file are checked without loading it.
_DEFER = "1 KB"
# SOP classes (words of their names) that hold pixels but are not an image stack of the patient.
_NOT_STACKS = {
    "Segmentation": "a segmentation object (SEG), not an image series; pass the image series it was drawn on",
    "Encapsulated": "an encapsulated document (PDF, CDA, ...), not an image series",
}
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
    # What is wrong with single files ("NAME: what"), found from their headers: pixel data shorter than or different
    # from what the header describes, impossible geometry, a missing position, the same instance in two places.
    problems: tuple[str, ...] = ()
    any_geometry: bool = False  # at least one file has a position, an orientation and a pixel spacing
    voxels: int = 0  # rows x columns x frames summed over the files, from the headers
    bytes_per_voxel: int = 2  # BitsAllocated / 8 of the first file

    @property
    def object_kind(self) -> str:
        """What the SOP class says this is when it is an object with pixels but no image stack (a segmentation, an
        encapsulated document); '' otherwise."""
        name = _sop_name(self.sop_class)
        return next((what for word, what in _NOT_STACKS.items() if word in name), "")

    @property
    def not_stack(self) -> str:
        """Why this group is no CT slice stack at all ('' when it may be one): a segmentation, a screen capture (dose
        report, exam summary), a scout, or images without any patient geometry. Files that are merely damaged are
        :attr:`problems` instead: those are errors to name, not objects to skip."""
        if self.object_kind:
            return self.object_kind
        if self.localizer:
            return "a localizer (scout/topogram), not a volume"
        if self.is_image and not self.any_geometry:
            kind = "a secondary capture (a screen such as a dose report or exam summary)" if "Secondary Capture" in \
                _sop_name(self.sop_class) else "images"
            return (f"{kind} without patient geometry (no ImagePositionPatient, ImageOrientationPatient or "
                    "PixelSpacing), not a CT slice stack")
        return ""

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
        singles: Counter[str] = Counter()
        objects: Counter[str] = Counter()
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


def scan_dicom_folder(folder: str | Path, follow_dicomdir: bool = False) -> FolderScan:
    """Read every file's header once and group the DICOM images of ``folder`` into series.

    ``follow_dicomdir``: where ``folder`` holds a DICOMDIR, scan the image files it references (in any subfolder)
    instead of the files beside it, as a CD/DVD export is laid out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ThinsliceError(f"{folder} is not a folder; pass a folder that holds the DICOM files of a series")
    headers, unreadable = [], []
    dicomdir = find_dicomdir(folder) if follow_dicomdir else None
    files = dicomdir_files(dicomdir) if dicomdir else sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    with library_messages_to_debug():
        for path in files:
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
    """True when ``path`` starts like a DICOM Part-10 file (128-byte preamble then 'DICM') or like an old
    ACR-NEMA style file without that preamble (see :func:`is_raw_dicom`)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM" or is_raw_dicom(path)
    except OSError:
        return False


def is_raw_dicom(path: Path) -> bool:
    """True when ``path`` starts like a DICOM data set without preamble and file meta (old ACR-NEMA style archives):
    its first element is in group 0008 (or 0002) with an element number below 0x0100 and a short length."""
    try:
        with open(path, "rb") as fh:
            start = fh.read(8)
    except OSError:
        return False
    if len(start) < 8 or start[:2] not in (b"\x08\x00", b"\x02\x00"):
        return False
    element = int.from_bytes(start[2:4], "little")
    explicit = start[4:6].isalpha() and start[4:6].isupper()
    length = int.from_bytes(start[6:8] if explicit else start[4:8], "little")
    return element < 0x100 and length < 1024


def read_dataset(path: Path, **kwargs: Any) -> pydicom.Dataset:
    """``pydicom.dcmread(path, **kwargs)``, reading an old file without preamble and file meta (ACR-NEMA style) the
    same way as a Part-10 file, so that every command (discovery, reading, the study kept for a DICOM output, batch)
    sees the same header. Raises pydicom's InvalidDicomError when it is not DICOM."""
    try:
        return pydicom.dcmread(str(path), **kwargs)
    except pydicom.errors.InvalidDicomError:
        if not is_raw_dicom(path):
            raise
        return pydicom.dcmread(str(path), force=True, **kwargs)


def _read_header(path: Path) -> dict | None:
    """The tags of ``path`` that discovery needs, as plain Python values, plus what is wrong with the file
    ("problem"); None when it is not readable DICOM."""
    try:
        ds = read_dataset(path, defer_size=_DEFER, specific_tags=_TAGS)
    except Exception:  # noqa: BLE001 - a damaged file may make pydicom fail in any way
        return None
    header = {keyword: _value(ds, keyword) for keyword in _TAGS if keyword != "PixelData"}
    header["problem"] = _geometry_problem(ds) or (_pixel_problem(path, ds) if header["Rows"] else "")
    return header


def describe_damage(path: Path) -> str:
    """What makes ``path`` (a file that starts like DICOM) unreadable, in a few words, for a message that names it."""
    try:
        with library_messages_to_debug():
            ds = read_dataset(path, defer_size=256)
            ds.get("SeriesInstanceUID")
    except Exception as exc:  # noqa: BLE001 - what pydicom says is the reason
        return f"not parseable: {str(exc).splitlines()[0][:80]}"
    size = path.stat().st_size
    for tag in list(ds.keys()):
        element = ds.get_item(tag, keep_deferred=True)
        length = int(getattr(element, "length", 0) or 0)  # a raw (deferred) element has a length; a decoded none
        end = int(getattr(element, "value_tell", 0) or 0) + length
        if length != 0xFFFFFFFF and end > size:
            return f"element {tag} claims {length} bytes, past the end of the {size}-byte file"
    if "SeriesInstanceUID" not in ds:
        return "no SeriesInstanceUID (the header is cut short or damaged)"
    return "damaged header"


def _geometry_problem(ds: pydicom.Dataset) -> str:
    """What is impossible in a file's geometry ('' when nothing): NaN or infinite values, a spacing of zero, below
    zero or far beyond any scanner's (ITK would silently take 1 mm, or fail with a raw numerical message)."""
    for keyword in _GEOMETRY:
        if keyword not in ds or ds.get(keyword) in (None, ""):
            continue
        try:
            values = [float(v) for v in ds.get(keyword)]
        except (TypeError, ValueError):
            return f"{keyword} is not a list of numbers ({_raw(ds, keyword)})"
        if not all(np.isfinite(values)):
            return f"{keyword} holds NaN or infinite values ({_raw(ds, keyword)})"
        if keyword == "PixelSpacing" and not all(SPACING_RANGE_MM[0] <= v <= SPACING_RANGE_MM[1] for v in values):
            return (f"PixelSpacing {_raw(ds, keyword)} is not a voxel size (must be {SPACING_RANGE_MM[0]:g} to "
                    f"{SPACING_RANGE_MM[1]:g} mm)")
    return ""


def _raw(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    text = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else str(
        value)
    return text[:60]


def _pixel_problem(path: Path, ds: pydicom.Dataset) -> str:
    """How a file's pixel data falls short of, or differs from, what Rows x Columns x frames x samples x
    BitsAllocated promise ('' when it matches). ITK reads such a file without a word, padding with zeros (0 HU
    slices) or stacking garbage, so the lengths are compared here, from the header alone."""
    # keep_deferred gives the raw element (its length and offset in the file), though pydicom annotates DataElement
    element: Any = ds.get_item(0x7FE00010, keep_deferred=True) if 0x7FE00010 in ds else None
    if element is None:
        return "no pixel data (the file is truncated, or an element's length runs past its end)"
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(float(ds.get("NumberOfFrames") or 1))
        samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.get("BitsAllocated") or 0)
    except (TypeError, ValueError, AttributeError):
        return "Rows, Columns, NumberOfFrames, SamplesPerPixel or BitsAllocated is not a number"
    what = f"Rows {rows} x Columns {columns} x {frames} frame(s) x {samples} sample(s) x {bits} bits"
    if min(rows, columns, frames, samples) < 1 or not 1 <= bits <= 64:  # 12: packed pixels of old archives
        return f"its header describes no image ({what})"
    if element.length == 0xFFFFFFFF:  # encapsulated (compressed) pixel data: one frame per fragment at least
        return _fragment_problem(ds, frames, what)
    expected = (rows * columns * frames * samples * bits + 7) // 8
    length = int(element.length)
    end = int(getattr(element, "value_tell", 0) or 0) + length
    size = path.stat().st_size
    if end > size:
        return f"pixel data is cut short: {max(0, size - end + length)} of {length} bytes present (truncated file)"
    if length < expected or length >= expected + max(2, columns * samples * bits // 8):  # beyond even padding
        return (f"pixel data holds {length} bytes but its header ({what}) describes {expected}: the header does "
                "not match the image")
    return ""


def _fragment_problem(ds: pydicom.Dataset, frames: int, what: str) -> str:
    """For compressed pixel data: fewer frames (basic offset table entries, else fragments) than NumberOfFrames."""
    from pydicom.encaps import generate_fragments, parse_basic_offsets

    try:
        buffer = BytesIO(ds.PixelData)
        offsets = parse_basic_offsets(buffer)
        count = len(offsets) if offsets else sum(1 for _ in generate_fragments(buffer))
    except Exception as exc:  # noqa: BLE001 - damaged encapsulation fails in pydicom in many ways
        return f"its compressed pixel data is damaged ({str(exc)[:80]})"
    if count < frames:
        return f"its compressed pixel data holds {count} frame(s) but its header ({what}) describes {frames}"
    return ""


def find_dicomdir(folder: Path) -> Path | None:
    """The DICOMDIR file directly in ``folder`` (any letter case), or None."""
    for entry in folder.iterdir():
        if entry.name.upper() == "DICOMDIR" and entry.is_file():
            return entry
    return None


def dicomdir_files(dicomdir: Path) -> list[Path]:
    """The files a DICOMDIR references (its directory records' ReferencedFileID, relative to its folder). Files it
    names that are missing are left out with a note; an unreadable DICOMDIR is one line that says what to pass."""
    try:
        ds = pydicom.dcmread(str(dicomdir))
        records = list(ds.DirectoryRecordSequence)
    except Exception as exc:  # noqa: BLE001 - a damaged DICOMDIR may make pydicom fail in any way
        raise ThinsliceError(f"{dicomdir}: the DICOMDIR cannot be read ({str(exc)[:80]}); pass the folder that holds "
                             "one series' files, or use `thinslice prepare` for the whole tree") from None
    files: list[Path] = []
    missing: list[Path] = []
    for record in records:
        parts = record.get("ReferencedFileID")
        if not parts:
            continue
        parts = [parts] if isinstance(parts, str) else list(parts)
        path = dicomdir.parent.joinpath(*[str(p) for p in parts])
        (files if path.is_file() else missing).append(path)
    if missing:
        log.warning("%s: %d file(s) it references are missing, e.g. %s", dicomdir, len(missing), missing[0])
    return sorted(set(files))


def _sop_name(uid: str) -> str:
    return pydicom.uid.UID(uid).name if uid else ""


def _value(ds: pydicom.Dataset, keyword: str) -> object:
    """One element as a float tuple, an int or one-line text; None when absent or not parseable."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        if keyword in _GEOMETRY:
            return tuple(float(v) for v in value)
        if keyword in ("Rows", "Columns", "NumberOfFrames", "SeriesNumber", "SamplesPerPixel", "BitsAllocated"):
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
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return True  # a NaN orientation stays in its series, where it is named as that file's problem
    return len(a) == len(b) and bool(np.max(np.abs(np.subtract(a, b))) < _ORIENTATION_TOL)


def _normal(header: dict) -> np.ndarray | None:
    iop = header["ImageOrientationPatient"]
    if iop is None or len(iop) != 6 or not np.all(np.isfinite(iop)):
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
    cluster = _drop_duplicates(cluster)
    first = cluster[0][1]
    normal = _normal(first)
    problems = [f"{p.name}: {h['problem']}" for p, h in cluster if h["problem"]]
    placed = [all(h[k] for k in _GEOMETRY) for _, h in cluster]
    if any(placed) and not all(placed):
        problems += [f"{p.name}: no {' or '.join(k for k in _GEOMETRY if not h[k])}, unlike the other files of its "
                     "series" for (p, h), ok in zip(cluster, placed, strict=True) if not ok]
    problems += _same_instance_problems(cluster)
    positioned = normal is not None and all(_finite(h["ImagePositionPatient"]) for _, h in cluster)
    if normal is not None and positioned:
        cluster = sorted(cluster, key=lambda item: float(np.dot(item[1]["ImagePositionPatient"], normal)))
    spacing = None
    if normal is not None and positioned and len(cluster) > 1:
        along = np.array([np.dot(h["ImagePositionPatient"], normal) for _, h in cluster])
        spacing = float(np.median(np.diff(along)))
    sizes = Counter(f"{h['Columns']}x{h['Rows']}" for _, h in cluster if h["Rows"] and h["Columns"])
    geometry = positioned and all(h["PixelSpacing"] for _, h in cluster)
    return SeriesInfo(uid=uid, description=first["SeriesDescription"] or "", modality=first["Modality"] or "",
                      num_files=len(cluster), folder=folder, files=tuple(str(p) for p, _ in cluster),
                      number=first["SeriesNumber"], orientation=_orientation(first), spacing=spacing,
                      sizes=tuple(sizes.most_common()), frames=int(first["NumberOfFrames"] or 1),
                      sop_class=first["SOPClassUID"] or "", has_geometry=geometry,
                      localizer="LOCALIZER" in (first["ImageType"] or "").upper(), problems=tuple(problems),
                      any_geometry=any(placed), voxels=sum(_voxels(h) for _, h in cluster),
                      bytes_per_voxel=max(1, (first["BitsAllocated"] or 16) // 8))


def _finite(values: tuple | None) -> bool:
    if not values:
        return False
    return bool(np.all(np.isfinite(values)))


def _voxels(header: dict) -> int:
    return (header["Rows"] or 0) * (header["Columns"] or 0) * max(1, header["NumberOfFrames"] or 1)


def _drop_duplicates(cluster: list[tuple[Path, dict]]) -> list[tuple[Path, dict]]:
    """``cluster`` with each instance once: a second file with the same SOPInstanceUID and the same position (a
    copied file) is left out with a note; the same UID at another position is kept, for the reader to refuse."""
    seen: dict[tuple, Path] = {}
    kept = []
    for path, header in cluster:
        key = (header["SOPInstanceUID"], header["ImagePositionPatient"])
        if header["SOPInstanceUID"] and key in seen:
            log.warning("%s is the same instance as %s (same SOPInstanceUID and position): read once",
                        path, seen[key].name)
            continue
        seen[key] = path
        kept.append((path, header))
    return kept


def _same_instance_problems(cluster: list[tuple[Path, dict]]) -> list[str]:
    """Files that carry one SOPInstanceUID at different positions: not copies, so neither can be chosen."""
    by_uid: dict[str, list[Path]] = {}
    for path, header in cluster:
        if header["SOPInstanceUID"]:
            by_uid.setdefault(header["SOPInstanceUID"], []).append(path)
    return [f"{paths[0].name} and {paths[1].name}: the same instance (SOPInstanceUID {uid}) at different positions"
            for uid, paths in by_uid.items() if len(paths) > 1]
