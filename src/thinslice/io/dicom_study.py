"""What a DICOM series written by thinslice keeps from the DICOM series it was computed from, and what is new.

A thin series made from a thick DICOM series belongs to the same patient, study and frame of reference: a viewer or
PACS files it beside the thick series and can link positions between the two. It is a new series of its own (a
number not used by the source, a description that says what it is, DERIVED\\SECONDARY, references to the source
images), so that nobody mistakes it for an acquisition. From a volume file without a DICOM source, the patient and
study elements a CT image must carry (DICOM type 2) are written empty rather than invented.

The source's attributes are captured when the series is read (one pydicom header read of its first file, plus the
instance UIDs and positions GDCM already has) and travel with the volume as one JSON string in
``Volume.metadata[SOURCE_KEY]``, which survives resampling like every other metadata entry.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from thinslice.io.discovery import read_dataset
from thinslice.io.lazy import lazy_import

if TYPE_CHECKING:  # the real modules for the type checker; at run time they load on first use
    import pydicom
else:
    pydicom = lazy_import("pydicom")
log = logging.getLogger(__name__)

SOURCE_KEY = "dicom_source"

# Patient, Patient Study, General Study and Frame of Reference modules, then series/acquisition facts that stay true
# of a derived series, then the lossy-compression history of the pixels (a lossy input stays lossy when upsampled).
_KEPT = (
    "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "PatientSex", "OtherPatientIDsSequence", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence", "PatientAge", "PatientSize", "PatientWeight",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription",
    "FrameOfReferenceUID", "PositionReferenceIndicator",
    "PatientPosition", "Laterality", "BodyPartExamined", "KVP",
    "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod",
)
# Type 2 elements of the CT Image IOD that must be present, empty when unknown.
_TYPE2_EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator",
                "PatientPosition", "KVP")
# Transfer syntaxes that are always lossy (JPEG baseline / extended): the pixels read were lossy-compressed.
_LOSSY_SYNTAXES = {"1.2.840.10008.1.2.4.50": "ISO_10918_1", "1.2.840.10008.1.2.4.51": "ISO_10918_1"}
_TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "UC", "PN"}
# BodyPartExamined values (PS3.16 CID 4031) of structures that are not paired: no Laterality (dciodvfy's rule too).
_UNPAIRED_BODY_PARTS = frozenset((
    "CHEST", "HEAD", "ABDOMEN", "PELVIS", "NECK", "SPINE", "CSPINE", "TSPINE", "LSPINE", "HEART", "CHESTABDOMEN",
    "CHESTABDPELVIS", "ABDOMENPELVIS", "WHOLEBODY", "HEADNECK", "BRAIN", "LIVER", "SKULL", "AORTA", "COLON",
    "PANCREAS", "STOMACH", "COCCYX", "BLADDER", "LARYNX", "MEDIASTINUM", "NECKCHEST", "SPLEEN", "PROSTATE", "UTERUS",
    "TRACHEA", "ESOPHAGUS", "JAW", "STERNUM"))
_LO_MAX = 64
# A derived series is numbered this far above its source, out of the range scanners number their series in.
SERIES_NUMBER_OFFSET = 1000


@dataclass(frozen=True)
class SourceSeries:
    """The DICOM series a volume was read from: attributes to keep, series identity, instances and positions."""

    kept: dict  # DICOM JSON (PS3.18 F.2) of the _KEPT elements present in the source, with its character set
    series_uid: str
    series_number: int | None
    description: str
    sop_class_uid: str
    instance_uids: tuple[str, ...]
    positions: tuple[tuple[float, float, float] | None, ...]  # ImagePositionPatient of each instance

    def to_json(self) -> str:
        return json.dumps(self.__dict__, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> SourceSeries | None:
        """The record stored by :func:`capture_source`, or None for a volume that did not come from DICOM."""
        text = metadata.get(SOURCE_KEY)
        if not text:
            return None
        data = json.loads(text)
        data["instance_uids"] = tuple(data["instance_uids"])
        data["positions"] = tuple(tuple(p) if p else None for p in data["positions"])
        return cls(**data)

    @property
    def slice_gap(self) -> float | None:
        """Distance between the first two source slices (mm), for the derivation text."""
        known = [p for p in self.positions[:2] if p is not None]
        return float(np.linalg.norm(np.subtract(known[1], known[0]))) if len(known) == 2 else None


def capture_source(first_file: Path, instances: list[tuple[str, str]]) -> str | None:
    """JSON for ``Volume.metadata[SOURCE_KEY]``: the first file's kept attributes and every instance's
    (SOPInstanceUID, ImagePositionPatient text) in slice order. None (and a warning) when the header cannot be
    read: the volume is then written like one from a file without DICOM source."""
    try:
        ds = read_dataset(first_file, stop_before_pixels=True)  # old files without file meta too
        ds.decode()  # text to str in the source's character set, so that it can be re-encoded in ours
        record = _record(ds, instances)
        pydicom.Dataset.from_json(record.kept)  # what cannot be written back is found now, not at writing
    except Exception as exc:  # noqa: BLE001 - reading the volume worked; only the study link is lost
        # pydicom's own text for a file it does not recognise is advice to a programmer (force=True): not shown
        reason = ("its header is not readable DICOM" if isinstance(exc, pydicom.errors.InvalidDicomError)
                  else str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__)
        log.warning("%s: its patient and study cannot be kept for a DICOM output (%s)", first_file, reason)
        return None
    return record.to_json()


def _record(ds: pydicom.Dataset, instances: list[tuple[str, str]]) -> SourceSeries:
    kept = pydicom.Dataset()
    for keyword in ("SpecificCharacterSet", *_KEPT):
        if keyword in ds:
            kept.add(ds[keyword])
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if syntax in _LOSSY_SYNTAXES and "LossyImageCompression" not in kept:
        kept.LossyImageCompression = "01"
        kept.LossyImageCompressionMethod = _LOSSY_SYNTAXES[syntax]
    number = ds.get("SeriesNumber")
    uids = tuple(uid for uid, _ in instances)
    return SourceSeries(
        kept=kept.to_json_dict(), series_uid=str(ds.get("SeriesInstanceUID", "")),
        series_number=int(number) if number not in (None, "") else None,
        description=" ".join(str(ds.get("SeriesDescription", "")).split()),
        sop_class_uid=str(ds.get("SOPClassUID", "")), instance_uids=uids if all(uids) else (),
        positions=tuple(_position(text) for _, text in instances) if all(uids) else ())


def _position(text: str) -> tuple[float, float, float] | None:
    try:
        values = tuple(float(v) for v in text.split("\\"))
    except ValueError:
        return None
    return (values[0], values[1], values[2]) if len(values) == 3 else None


# ------------------------------------------------------------------------------------------- the written series
def series_description(head: str, spacing_mm: float, method: str | None) -> str:
    """'<source description> <mm> mm thinslice <method>', the source part shortened to fit DICOM's 64 characters."""
    tail = f"{spacing_mm:.4g} mm thinslice" + (f" {method}" if method else "")
    room = _LO_MAX - len(tail) - 1
    return f"{head[:room].rstrip()} {tail}" if head and room > 0 else tail[:_LO_MAX]


def derivation_description(source: SourceSeries | None, spacing_mm: float, method: str | None) -> str:
    """DerivationDescription: what was computed from what, for a reader of the header."""
    from thinslice.version import __version__

    text = (f"thinslice {__version__}" + (f" method {method}" if method else "")
            + f": slices computed along the slice axis at {spacing_mm:.4g} mm spacing")
    if source is not None:
        gap = source.slice_gap
        number = f" {source.series_number}" if source.series_number is not None else ""
        text += f" from series{number} {source.series_uid}" + (f" ({gap:.4g} mm spacing)" if gap else "")
    return text[:1024]


def add_study_modules(ds: pydicom.Dataset, source: SourceSeries | None) -> None:
    """Patient, General Study, Frame of Reference and carried series elements: the source's, else type 2 empty."""
    if source is not None:
        kept = pydicom.Dataset.from_json(source.kept)
        for element in kept:
            if element.keyword != "SpecificCharacterSet":
                ds.add(element)
    for keyword in _TYPE2_EMPTY:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "FrameOfReferenceUID" not in ds:
        ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    # Laterality is type 2C: required (empty when unknown) for a paired or unnamed body part, not allowed for others.
    if str(ds.get("BodyPartExamined", "")).upper() in _UNPAIRED_BODY_PARTS:
        if "Laterality" in ds:
            del ds.Laterality
    elif "Laterality" not in ds:
        ds.Laterality = ""


def add_series_identity(ds: pydicom.Dataset, source: SourceSeries | None, description: str,
                        derivation: str, number: int | None, offset: int, normal: np.ndarray) -> None:
    """New series: number (the source's + ``offset``, unless given), description, dates, DERIVED\\SECONDARY with the
    slice orientation, derivation text."""
    now = _dt.datetime.now()
    ds.SeriesNumber = number if number is not None else (
        source.series_number + offset if source and source.series_number is not None else 1)
    ds.SeriesDescription = description[:_LO_MAX]
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ImageType = ["DERIVED", "SECONDARY", orientation_word(normal)]
    ds.DerivationDescription = derivation


def orientation_word(normal: np.ndarray) -> str:
    """AXIAL, CORONAL or SAGITTAL: the patient axis closest to the slice normal (LPS), as viewers label a stack."""
    return ("SAGITTAL", "CORONAL", "AXIAL")[int(np.argmax(np.abs(np.asarray(normal, dtype=np.float64))))]


def set_character_set(ds: pydicom.Dataset, source: SourceSeries | None) -> None:
    """ISO_IR 192 (UTF-8) when any text is not ASCII, else the source's character set (if it had one).

    Text is held decoded (str), so writing it under UTF-8 is always possible, whatever the source's encoding was.
    """
    if any(_is_text(e) and not str(e.value).isascii() for e in ds.iterall()):
        ds.SpecificCharacterSet = "ISO_IR 192"
        return
    charset = (source.kept.get("00080005", {}).get("Value") if source else None)
    if charset:
        ds.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]


def _is_text(element: pydicom.DataElement) -> bool:
    return element.VR in _TEXT_VRS and element.value not in (None, "")


def add_source_references(ds: pydicom.Dataset, source: SourceSeries | None, position: np.ndarray,
                          normal: np.ndarray) -> None:
    """SourceImageSequence and ReferencedSeriesSequence (Common Instance Reference) naming the source slices this
    slice lies between, or every source instance when the two stacks are not parallel (a reformat)."""
    if source is None or not source.instance_uids or not source.sop_class_uid:
        return
    refs = _bracketing_instances(source, np.asarray(position, dtype=np.float64), np.asarray(normal, dtype=np.float64))
    purpose = pydicom.Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    items = [_reference(source, index) for index in refs]
    for item in items:
        item.PurposeOfReferenceCodeSequence = [purpose]
    ds.SourceImageSequence = items
    series = pydicom.Dataset()
    series.SeriesInstanceUID = source.series_uid
    series.ReferencedInstanceSequence = [_reference(source, index) for index in refs]
    ds.ReferencedSeriesSequence = [series]


def _reference(source: SourceSeries, index: int) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = source.sop_class_uid
    item.ReferencedSOPInstanceUID = source.instance_uids[index]
    return item


def _bracketing_instances(source: SourceSeries, position: np.ndarray, normal: np.ndarray) -> list[int]:
    """Indices of the one or two source slices on either side of ``position`` along the slice normal."""
    count = len(source.instance_uids)
    if count < 2 or any(p is None for p in source.positions) or len(source.positions) != count:
        return list(range(count))
    points = np.asarray(source.positions, dtype=np.float64)
    travel = points[-1] - points[0]
    if np.linalg.norm(travel) < 1e-6:
        return list(range(count))
    if abs(float(travel @ normal)) < 0.7 * float(np.linalg.norm(travel)):  # a reformat (or a tilt beyond 45 deg)
        return list(range(count))
    along = points @ normal  # along the written slices' normal: right for a gantry tilt resampled upright too
    where = float(position @ normal)
    nearest = np.argsort(np.abs(along - where), kind="stable")
    first = int(nearest[0])
    if abs(along[first] - where) < 1e-3:
        return [first]
    other = [int(i) for i in nearest[1:] if (along[i] - where) * (along[first] - where) < 0][:1]
    return sorted([first, *other])
