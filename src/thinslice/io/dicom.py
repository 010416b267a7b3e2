"""DICOM series: listing the series of a folder and writing a volume as a CT series.

Reading goes through SimpleITK/GDCM (see :mod:`thinslice.io.readers`), which sorts slices by their position in the
patient rather than by file name. Writing uses pydicom because it gives full control over the tags a CT viewer or
PACS expects (CT Image Storage SOP class, rescale, geometry written with full DS precision), which SimpleITK's
per-slice writer does not.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from thinslice.errors import ThinsliceError
from thinslice.io.dicom_study import (
    SERIES_NUMBER_OFFSET,
    SourceSeries,
    add_series_identity,
    add_source_references,
    add_study_modules,
    derivation_description,
    series_description,
    set_character_set,
)
from thinslice.io.discovery import SeriesInfo, is_dicom_file, list_dicom_series, read_dataset  # noqa: F401
from thinslice.io.lazy import lazy_import
from thinslice.io.volume import Volume

if TYPE_CHECKING:  # the real modules for the type checker; at run time they load on first use
    import pydicom
    import SimpleITK as sitk
else:
    sitk = lazy_import("SimpleITK")  # loaded when a file is first read or written
    pydicom = lazy_import("pydicom")

log = logging.getLogger(__name__)

# DICOM decimal strings (DS) hold at most 16 characters.
_DS_MAX_LEN = 16
# The display window of a CT output whose source carried none (a lung window).
DEFAULT_WINDOW = ("-600", "1500")


def read_header(path: Path, tags: list[str] | None = None) -> pydicom.Dataset | None:
    """The DICOM header of ``path`` without pixel data (old files without file meta too), or None when the file is
    not DICOM."""
    try:
        return read_dataset(path, stop_before_pixels=True, specific_tags=tags)
    except pydicom.errors.InvalidDicomError:
        return None
    except Exception:  # noqa: BLE001 - any other file found while scanning a tree may make pydicom fail oddly
        return None


def header_text(ds: pydicom.Dataset | None, keyword: str) -> str:
    """A header element as a stripped one-line string ('' when absent)."""
    if ds is None:
        return ""
    value = ds.get(keyword, "")
    if value is None:
        return ""
    return " ".join(str(value).split())


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


@dataclass(frozen=True)
class DicomSeriesOptions:
    """What a written DICOM series says about itself. Values are HU rounded to integers and stored as int16 (or
    uint16 with ``rescale_intercept``, e.g. -1024, when ``unsigned``); RescaleSlope is 1, unless the source stored
    finer steps (metadata ``value_step``, a fractional RescaleSlope), which are then kept. The display window is the
    source's (metadata ``window_center``/``window_width``), else a lung window. Unset UIDs are generated;
    patient, study and frame of reference are the DICOM source's (:mod:`thinslice.io.dicom_study`) unless given.
    Unset, the series number is the source's + ``series_number_offset`` (1 without a source) and the description
    '<source description> <mm> mm thinslice <method>' (``method``: else the one in metadata ``upsample``)."""

    series_description: str | None = None
    modality: str = "CT"
    patient_id: str | None = None
    patient_name: str | None = None
    series_uid: str | None = None
    study_uid: str | None = None
    series_number: int | None = None
    series_number_offset: int = SERIES_NUMBER_OFFSET
    method: str | None = None
    derivation_description: str | None = None
    unsigned: bool = False
    rescale_intercept: float = 0.0
    pixel_padding_value: int | None = None


def write_dicom_series(volume: Volume, folder: str | Path, options: DicomSeriesOptions | None = None,
                       **fields: Any) -> list[Path]:
    """Write ``volume`` as one DICOM file per slice (along index axis k) into the existing empty ``folder``.

    ``options`` (or its fields as keywords) describe the series. Callers that want an atomic write use
    :func:`thinslice.io.writers.write_volume`, which wraps this.
    """
    o = dataclasses.replace(options or DicomSeriesOptions(), **fields)
    check_ct_output(volume, o.modality)
    array, origin, direction = _right_handed_grid(volume)
    lo, hi = (0, 65535) if o.unsigned else (-32768, 32767)
    slope = rescale_slope(array, volume.metadata, o.rescale_intercept, (lo, hi))
    # float64: the division by a fractional slope must not add float32 rounding to the stored integers
    stored = np.rint((array.astype(np.float64) - o.rescale_intercept) / slope)
    stored = np.clip(stored, lo, hi).astype(np.uint16 if o.unsigned else np.int16)
    source = SourceSeries.from_metadata(volume.metadata)
    header = _series_header(volume, o, direction, stored.shape[1:], source)
    header.RescaleSlope = format_ds(slope)
    sk = volume.spacing[2]
    paths: list[Path] = []
    for k in range(stored.shape[0]):
        position = origin + direction[:, 2] * sk * k
        ds = _slice_dataset(header, k, position, direction[:, 2])
        add_source_references(ds, source, position, direction[:, 2])
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<u2" if o.unsigned else "<i2").tobytes()
        path = Path(folder) / f"slice_{k + 1:05d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def check_ct_output(volume: Volume, modality: str = "CT") -> None:
    """Refuse a CT Image Storage output of a volume read from another modality (MR, PET, ...): it would be labelled
    CT, lose its units (e.g. PET's) and be filed into the patient's study as a CT series."""
    source = str(volume.metadata.get("modality", "") or "CT").upper()
    if modality == "CT" and source != "CT":
        raise ThinsliceError(f"the input is {source} (Modality {source}), and thinslice writes DICOM output only as "
                             "CT images; write a NIfTI file (.nii.gz) instead")


def rescale_slope(array: np.ndarray, metadata: dict[str, str], intercept: float, limits: tuple[int, int]) -> float:
    """RescaleSlope of a DICOM output: 1 (integer HU), or the source's finer value step (metadata ``value_step``,
    e.g. 0.001) so that 20,000 levels stay 20,000 levels; a step too fine for the values' range in 16 bits is
    widened to the finest that fits (and said)."""
    try:
        step = float(metadata.get("value_step", "1"))
    except ValueError:
        step = 1.0
    if not (np.isfinite(step) and 0 < step < 1):
        return 1.0
    low, high = float(array.min()) - intercept, float(array.max()) - intercept
    fits = max(high / limits[1] if high > 0 else 0.0, low / limits[0] if low < 0 and limits[0] < 0 else 0.0)
    slope = float(format_ds(min(1.0, max(step, fits * 1.0001))))
    if slope > step:
        log.warning("the values (%.4g to %.4g) do not fit 16 bits in the source's steps of %.4g; the DICOM output "
                    "stores them in steps of %.4g", low + intercept, high + intercept, step, slope)
    else:
        log.info("the DICOM output keeps the source's value steps of %.4g (RescaleSlope %s)", step, format_ds(slope))
    return slope


def _window(metadata: dict[str, str]) -> tuple[list[str], list[str]]:
    """WindowCenter and WindowWidth of the output: the source's (all its windows), else :data:`DEFAULT_WINDOW`."""
    try:
        centers = [format_ds(float(v)) for v in metadata.get("window_center", "").split("\\") if v.strip()]
        widths = [format_ds(float(v)) for v in metadata.get("window_width", "").split("\\") if v.strip()]
    except (ValueError, ThinsliceError):
        centers = widths = []
    if centers and len(centers) == len(widths) and all(float(w) >= 1 for w in widths):
        return centers, widths
    return [DEFAULT_WINDOW[0]], [DEFAULT_WINDOW[1]]


def _series_header(volume: Volume, o: DicomSeriesOptions, direction: np.ndarray,
                   rows_columns: tuple[int, ...], source: SourceSeries | None) -> pydicom.Dataset:
    """The attributes every slice of the series shares (patient and study, series identity, geometry, pixels)."""
    meta = volume.metadata
    ds = pydicom.dataset.Dataset()
    add_study_modules(ds, source)  # the source's patient, study and frame of reference; type 2 empty without one
    if source is None and meta.get("patient_id"):
        ds.PatientID = meta["patient_id"]  # e.g. an NRRD that thinslice wrote from DICOM
    if o.patient_id is not None:
        ds.PatientID = o.patient_id
    if o.patient_name is not None:
        ds.PatientName = o.patient_name
    # A derived series (e.g. the thin-slice result) belongs to the study of the series it was computed from.
    ds.StudyInstanceUID = (o.study_uid or ds.get("StudyInstanceUID") or meta.get("study_uid")
                           or pydicom.uid.generate_uid())
    ds.SeriesInstanceUID = o.series_uid or pydicom.uid.generate_uid()
    ds.SOPClassUID = (pydicom.uid.CTImageStorage if o.modality == "CT"
                       else pydicom.uid.SecondaryCaptureImageStorage)
    ds.Modality = o.modality
    method = o.method or _method_of(meta)
    head = source.description if source is not None else meta.get("series_description", "")
    description = o.series_description if o.series_description is not None else series_description(
        head, volume.spacing[2], method)
    derivation = o.derivation_description or derivation_description(source, volume.spacing[2], method)
    add_series_identity(ds, source, description, derivation, o.series_number, o.series_number_offset,
                        direction[:, 2])
    ds.Manufacturer = "thinslice"
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [format_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    si, sj, sk = volume.spacing
    ds.PixelSpacing = [format_ds(sj), format_ds(si)]  # (between rows, between columns)
    # SliceThickness is the nominal thickness along the stacking axis (k); empty when unknown so that a round trip
    # does not invent one.
    thickness = volume.slice_thickness if volume.slice_axis == 2 else None
    ds.SliceThickness = format_ds(thickness) if thickness else ""
    ds.SpacingBetweenSlices = format_ds(sk)
    _pixel_format(ds, o, rows_columns)
    if o.modality == "CT":
        center, width = _window(meta)
        ds.WindowCenter = center if len(center) > 1 else center[0]
        ds.WindowWidth = width if len(width) > 1 else width[0]
    set_character_set(ds, source)
    return ds


def _method_of(metadata: dict[str, str]) -> str | None:
    """The method named in the metadata that :func:`thinslice.infer.upsample.run_method` (or degrade) leaves."""
    if metadata.get("upsample"):
        return metadata["upsample"].split()[0]
    return "degrade" if metadata.get("degrade") else None


def _pixel_format(ds: pydicom.Dataset, o: DicomSeriesOptions, rows_columns: tuple[int, ...]) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(rows_columns[0]), int(rows_columns[1])
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0 if o.unsigned else 1
    ds.RescaleIntercept = format_ds(o.rescale_intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU" if o.modality == "CT" else "US"
    if o.pixel_padding_value is not None:
        ds.add_new(0x00280120, "US" if o.unsigned else "SS", int(o.pixel_padding_value))


def _slice_dataset(header: pydicom.Dataset, k: int, position: np.ndarray,
                   normal: np.ndarray) -> pydicom.Dataset:
    """Slice ``k`` of the series: a copy of the shared header with its own SOP UID and position."""
    ds = copy.deepcopy(header)
    sop_uid = pydicom.uid.generate_uid()
    file_meta = pydicom.dataset.FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = header.SOPClassUID
    file_meta.MediaStorageSOPInstanceUID = sop_uid
    file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta = file_meta
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [format_ds(v) for v in position]
    ds.SliceLocation = format_ds(float(np.dot(position, normal)))
    return ds
