"""DICOM series: listing the series of a folder and writing a volume as a CT series.

Reading goes through SimpleITK/GDCM (see :mod:`thinslice.io.readers`), which sorts slices by their position in the
patient rather than by file name. Writing uses pydicom because it gives full control over the tags a CT viewer or
PACS expects (CT Image Storage SOP class, rescale, geometry written with full DS precision), which SimpleITK's
per-slice writer does not.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from thinslice.errors import ThinsliceError
from thinslice.io.volume import Volume

# DICOM decimal strings (DS) hold at most 16 characters.
_DS_MAX_LEN = 16


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found in a folder (what a user needs to pick one with ``--series``)."""

    uid: str
    description: str
    modality: str
    num_files: int
    folder: Path
    # The files of the series sorted by slice position (as GDCM orders them), so that reading needs no new scan.
    files: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def describe(self) -> str:
        desc = self.description or "no description"
        return f"{self.uid} ({desc!r}, {self.modality or '?'}, {self.num_files} files)"


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` starts like a DICOM Part-10 file (128-byte preamble then 'DICM')."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_header(path: Path, tags: list[str] | None = None) -> Dataset | None:
    """The DICOM header of ``path`` without pixel data, or None when the file is not DICOM."""
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=tags)
    except InvalidDicomError:
        return None
    except Exception:  # noqa: BLE001 - any other file found while scanning a tree may make pydicom fail oddly
        return None


def header_text(ds: Dataset | None, keyword: str) -> str:
    """A header element as a stripped one-line string ('' when absent)."""
    if ds is None:
        return ""
    value = ds.get(keyword, "")
    if value is None:
        return ""
    return " ".join(str(value).split())


def list_dicom_series(folder: str | Path) -> list[SeriesInfo]:
    """The DICOM series stored directly in ``folder`` (not its subfolders), grouped by SeriesInstanceUID."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ThinsliceError(f"{folder} is not a folder; pass a folder that holds the DICOM files of a series")
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    result: list[SeriesInfo] = []
    for uid in series_ids:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        ds = read_header(Path(files[0]), ["Modality", "SeriesDescription"]) if files else None
        result.append(SeriesInfo(uid=uid, description=header_text(ds, "SeriesDescription"),
                                 modality=header_text(ds, "Modality"), num_files=len(files), folder=folder,
                                 files=tuple(files)))
    return result


# ---------------------------------------------------------------------------------------------------- writing
def format_ds(value: float) -> str:
    """``value`` as a DICOM decimal string with as many significant digits as 16 characters allow.

    Written by hand because pydicom's auto-formatting keeps fewer digits, and geometry must survive a round trip
    to well below 1e-4 mm.
    """
    value = float(value)
    if value == 0 or abs(value) < 1e-12:
        return "0"
    for digits in range(15, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= _DS_MAX_LEN:
            return text
    raise ThinsliceError(f"cannot write {value} as a DICOM decimal string")


def _right_handed_grid(volume: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(array, origin, direction) of ``volume`` with a right-handed, orthonormal frame.

    DICOM derives the slice direction as the cross product of the row and column directions, so a left-handed grid
    (determinant < 0) is written with its slice order reversed: the same image in the patient, another index order.
    """
    direction = volume.direction / np.linalg.norm(volume.direction, axis=0, keepdims=True)
    array = volume.array
    origin = np.asarray(volume.origin, dtype=np.float64)
    normal = np.cross(direction[:, 0], direction[:, 1])
    along = float(np.dot(normal, direction[:, 2]))
    if abs(abs(along) - 1.0) > 1e-4 or abs(float(np.dot(direction[:, 0], direction[:, 1]))) > 1e-4:
        raise ThinsliceError("the volume's axes are not perpendicular (sheared grid), which DICOM cannot store; "
                             "resample it to an orthogonal grid or write NIfTI/NRRD/MHA instead")
    if along < 0:
        nk = array.shape[0]
        origin = origin + direction[:, 2] * volume.spacing[2] * (nk - 1)
        direction = direction.copy()
        direction[:, 2] = -direction[:, 2]
        array = array[::-1]
    return array, origin, direction


def write_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    series_description: str | None = None,
    modality: str = "CT",
    patient_id: str | None = None,
    patient_name: str | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    series_number: int = 1,
    unsigned: bool = False,
    rescale_intercept: float = 0.0,
    pixel_padding_value: int | None = None,
) -> list[Path]:
    """Write ``volume`` as one DICOM file per slice (along index axis k) into the existing empty ``folder``.

    Values are HU rounded to integers and stored as int16 (or uint16 with ``rescale_intercept``, e.g. -1024, when
    ``unsigned``); RescaleSlope is 1. New Series/SOP UIDs are generated; the study is the source's (metadata
    ``study_uid``) unless given. Callers that want an
    atomic write use :func:`thinslice.io.writers.write_volume`, which wraps this.
    """
    folder = Path(folder)
    array, origin, direction = _right_handed_grid(volume)
    si, sj, sk = volume.spacing
    stored = np.rint(array - np.float32(rescale_intercept))  # float32 holds every int16/uint16 value exactly
    lo, hi = (0, 65535) if unsigned else (-32768, 32767)
    stored = np.clip(stored, lo, hi).astype(np.uint16 if unsigned else np.int16)

    meta = volume.metadata
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    # A derived series (e.g. the thin-slice result) belongs to the study of the series it was computed from.
    study_uid = study_uid or meta.get("study_uid") or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    sop_class = CTImageStorage if modality == "CT" else SecondaryCaptureImageStorage
    # SliceThickness is the nominal thickness along the stacking axis (k); leave it empty when unknown so that a
    # round trip does not invent one.
    thickness = volume.slice_thickness if volume.slice_axis == 2 else None
    iop = [format_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    description = series_description if series_description is not None else meta.get(
        "series_description", "thinslice")
    window = (-600, 1500) if modality == "CT" else None

    paths: list[Path] = []
    for k in range(stored.shape[0]):
        sop_uid = generate_uid()
        file_meta = FileMetaDataset()
        file_meta.MediaStorageSOPClassUID = sop_class
        file_meta.MediaStorageSOPInstanceUID = sop_uid
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = file_meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.PatientID = patient_id if patient_id is not None else meta.get("patient_id", "anonymous")
        ds.PatientName = patient_name if patient_name is not None else ds.PatientID
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
        ds.StudyID = ""
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Manufacturer = "thinslice"
        ds.SeriesDescription = description[:64]
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.KVP = ""
        ds.PositionReferenceIndicator = ""
        position = origin + direction[:, 2] * sk * k
        ds.ImagePositionPatient = [format_ds(v) for v in position]
        ds.ImageOrientationPatient = iop
        ds.SliceLocation = format_ds(float(np.dot(position, direction[:, 2])))
        ds.PixelSpacing = [format_ds(sj), format_ds(si)]  # (between rows, between columns)
        ds.SliceThickness = format_ds(thickness) if thickness else ""
        ds.SpacingBetweenSlices = format_ds(sk)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[2])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0 if unsigned else 1
        ds.RescaleIntercept = format_ds(rescale_intercept)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU" if modality == "CT" else "US"
        if window:
            ds.WindowCenter, ds.WindowWidth = str(window[0]), str(window[1])
        if pixel_padding_value is not None:
            ds.add_new(0x00280120, "US" if unsigned else "SS", int(pixel_padding_value))
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<u2" if unsigned else "<i2").tobytes()
        path = folder / f"slice_{k + 1:05d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths
