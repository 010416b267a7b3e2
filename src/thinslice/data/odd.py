"""Small synthetic archives with the odd properties real ones have (gantry tilt, sheared NIfTI, sagittal stacks,
radiographs, multi-frame objects, scouts in a series, damaged files, many series) and hostile objects (headers that
lie about their pixel data, impossible spacing, one bad file in a series, old files without file meta, DICOMDIR
exports, SEG objects, dose screens), built from the chest phantom.

The tests and the reliability run use them, so that every case runs without outside data. Each writer
returns what a correct reader must find (e.g. the world position of a marker), not just the files.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from thinslice.data.phantom import make_chest_phantom
from thinslice.io.lazy import lazy_import
from thinslice.io.volume import Volume

if TYPE_CHECKING:  # the real modules for the type checker; at run time they load on first use
    import pydicom
else:
    pydicom = lazy_import("pydicom")

MARKER_HU = 3000.0  # a bright voxel no phantom tissue reaches, to find a known point after resampling
MARKER_IJK = (3, 2)  # (i, j) of the marker: in the air around the body, so that its neighbours are exactly -1000
_AIR = -1000.0


def phantom(n: int = 12, size: int = 32, spacing: tuple[float, float, float] = (1.0, 1.0, 3.0),
            seed: int = 1) -> Volume:
    """A small noise-free chest phantom with a marker voxel at (i, j, k) = (*MARKER_IJK, n // 2)."""
    vol = make_chest_phantom(shape=(n, size, size), spacing=spacing, seed=seed, noise_hu=0.0)
    vol.array[n // 2, MARKER_IJK[1], MARKER_IJK[0]] = MARKER_HU
    return vol


def marker_index(vol: Volume) -> np.ndarray:
    """(i, j, k) of the marker in ``vol``: the centroid of its excess over air near the brightest voxel, which
    linear interpolation keeps exactly."""
    k, j, i = np.unravel_index(int(np.argmax(vol.array)), vol.array.shape)
    window = tuple(slice(max(0, c - 2), c + 3) for c in (k, j, i))
    weight = np.clip(vol.array[window] - _AIR, 0, None)
    idx = np.argwhere(weight > 0) + np.array([w.start for w in window])
    w = weight[weight > 0]
    return (idx[:, ::-1] * w[:, None]).sum(0) / w.sum()


def world(vol: Volume, ijk: np.ndarray) -> np.ndarray:
    """World (LPS, mm) position of the continuous index ``ijk`` of ``vol``."""
    return np.asarray(vol.origin) + vol.direction @ (np.asarray(vol.spacing) * np.asarray(ijk, dtype=np.float64))


def write_series(vol: Volume, folder: Path, prefix: str = "IMG") -> list[Path]:
    """``vol`` as a DICOM series in ``folder`` (created; may already hold other files), file names ``prefix*``."""
    from thinslice.io import write_volume

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}-{prefix}-tmp"
    write_volume(vol, tmp)
    paths = []
    for index, path in enumerate(sorted(tmp.iterdir())):
        paths.append(Path(shutil.move(str(path), str(folder / f"{prefix}{index:04d}.dcm"))))
    tmp.rmdir()
    return paths


def edit_headers(paths: list[Path], change) -> None:
    """Apply ``change(dataset, index)`` to every file and save it in place (pydicom's complaints about the odd
    values written on purpose go to the debug log)."""
    from thinslice.io.discovery import library_messages_to_debug

    with library_messages_to_debug():
        for index, path in enumerate(paths):
            ds = pydicom.dcmread(str(path))
            change(ds, index)
            ds.save_as(str(path))


# ---------------------------------------------------------------------------------------------- geometry cases
def tilted_series(folder: Path, degrees: float = 15.0) -> np.ndarray:
    """A series whose slices shift along y with z (gantry tilt); returns the marker's true world position."""
    vol = phantom()
    paths = write_series(vol, folder)
    shift = np.tan(np.radians(degrees))
    z0 = float(pydicom.dcmread(str(paths[0])).ImagePositionPatient[2])

    def tilt(ds, index):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + shift * (z - z0), z]
        ds.GantryDetectorTilt = degrees

    edit_headers(paths, tilt)
    ds = pydicom.dcmread(str(paths[vol.shape_ijk[2] // 2]))
    return np.array([float(v) for v in ds.ImagePositionPatient]) + np.array([*MARKER_IJK, 0.0])  # 1 mm pixels


def sheared_nifti(path: Path, degrees: float = 15.0, qform: bool = True) -> np.ndarray:
    """A NIfTI whose sform is sheared as dcm2niix writes one for uncorrected gantry tilt (``qform``: with an
    orthogonal qform beside it); returns the marker's true world position (LPS)."""
    from thinslice.io import write_volume

    vol = phantom()
    raw = path.with_suffix(".plain.nii")
    write_volume(vol, raw)
    header = bytearray(raw.read_bytes())
    raw.unlink()
    rows = np.array(struct.unpack("<12f", header[280:328]), dtype=np.float64).reshape(3, 4)
    rows[1, 2] = vol.spacing[2] * np.tan(np.radians(degrees))  # slice k moves along y (RAS) by k x this
    header[280:328] = struct.pack("<12f", *rows.ravel())
    if not qform:
        header[252:254] = struct.pack("<h", 0)
    path.write_bytes(bytes(header))
    ijk = np.array([*MARKER_IJK, vol.shape_ijk[2] // 2, 1.0])
    return np.diag([-1.0, -1.0, 1.0]) @ (rows @ ijk)


def sagittal_series(folder: Path) -> Volume:
    """A sagittal series of near-isotropic voxels (1 x 1 mm pixels, 1.1 mm apart): its slice axis is the stacking
    axis (left-right), not the in-plane head-feet axis. Returns the volume written."""
    base = make_chest_phantom(shape=(14, 40, 36), spacing=(1.0, 1.0, 1.1), seed=5)
    direction = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # rows->P, columns->I, slices->R
    vol = Volume(base.array, base.spacing, (-8.0, -20.0, 30.0), direction, slice_thickness=1.1)
    write_series(vol, folder)
    return vol


# ------------------------------------------------------------------------------------------ objects, not volumes
def radiographs(folder: Path, count: int = 4) -> None:
    """DX images of one series without ImagePositionPatient, ImageOrientationPatient or PixelSpacing."""
    vol = phantom(n=count)
    paths = write_series(vol, folder)

    def strip(ds, index):
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceLocation",
                        "SpacingBetweenSlices"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.Modality = "DX"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation

    edit_headers(paths, strip)


def enhanced_multiframe(path: Path, frames: int = 6) -> None:
    """An Enhanced MR multi-frame file: geometry only in the functional group sequences."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = _new_object(pydicom.uid.EnhancedMRImageStorage)
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "MR", 7, "enhanced t1"
    _pixel_module(ds, np.zeros((frames, 16, 16), np.uint16))
    ds.NumberOfFrames = frames
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.9, 0.9], 3.0
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in range(frames):
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, 3.0 * k]
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.save_as(str(path), enforce_file_format=True)


def _new_object(sop_class: str):
    """An empty DICOM object of ``sop_class`` with its file meta and new instance, study and series UIDs."""
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID(sop_class)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    return ds


def _pixel_module(ds, pixels: np.ndarray) -> None:
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()


def overlay_object(path: Path) -> None:
    """A secondary-capture (OT) image with a multi-frame overlay, the kind of file GDCM's scanner trips over."""
    ds = _new_object(pydicom.uid.SecondaryCaptureImageStorage)
    ds.Modality, ds.SeriesNumber = "OT", 99
    _pixel_module(ds, np.zeros((16, 16), np.uint16))
    for tag, vr, value in ((0x60000010, "US", 16), (0x60000011, "US", 16), (0x60000015, "IS", "5"),
                           (0x60000040, "CS", "G"), (0x60000050, "SS", [1, 1]), (0x60000100, "US", 1),
                           (0x60000102, "US", 0), (0x60003000, "OW", b"\x00" * 8)):
        ds.add_new(tag, vr, value)
    ds.save_as(str(path), enforce_file_format=True)


def damaged_file(path: Path) -> None:
    """A file that starts like DICOM (preamble, 'DICM') and then holds garbage."""
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + bytes(range(256)) * 4)


# ---------------------------------------------------------------------------------------------- series layouts
def series_with_topogram(folder: Path) -> None:
    """An axial series and two coronal topogram images of another size that carry the same SeriesInstanceUID."""
    paths = write_series(phantom(n=10), folder)
    uid = pydicom.dcmread(str(paths[0])).SeriesInstanceUID
    scout = make_chest_phantom(shape=(2, 24, 40), spacing=(1.5, 1.5, 1.0), seed=9)
    coronal = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    scout_paths = write_series(Volume(scout.array, scout.spacing, (-30.0, 0.0, 20.0), coronal), folder, "SCOUT")

    def same_uid(ds, index):
        ds.SeriesInstanceUID = uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    edit_headers(scout_paths, same_uid)


def sparse_series(folder: Path, gap_mm: float = 45.0) -> None:
    """Two axial slices ``gap_mm`` apart."""
    write_series(phantom(n=2, spacing=(1.0, 1.0, gap_mm)), folder)


def mixed_size_series(folder: Path) -> None:
    """One series whose last two images are 24 x 24 while the others are 32 x 32."""
    paths = write_series(phantom(n=8), folder)
    uid = pydicom.dcmread(str(paths[0])).SeriesInstanceUID
    small = write_series(phantom(n=2, size=24), folder, "SMALL")

    def join(ds, index):
        ds.SeriesInstanceUID = uid
        ds.ImagePositionPatient = [0.0, 0.0, 100.0 + 3.0 * index]

    edit_headers(small, join)


def many_series(folder: Path, series: int = 24, slices: int = 35, size: int = 64) -> None:
    """``series`` CT series of ``slices`` images each in one folder (numbers in shuffled order), plus a single
    scout image and a structure set, as a study export holds them."""
    base = phantom(n=slices, size=size)
    first = write_series(base, folder / "s00")
    rng = np.random.default_rng(0)
    for number in rng.permutation(series) + 1:
        uid = pydicom.uid.generate_uid()

        def relabel(ds, index, uid=uid, number=int(number)):
            ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, pydicom.uid.generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesNumber, ds.SeriesDescription = number, f"series {number} {'LUNG' if number % 2 else 'SOFT'}"

        for index, path in enumerate(first):
            ds = pydicom.dcmread(str(path))
            relabel(ds, index)
            ds.save_as(str(folder / f"S{number:02d}_{index:04d}.dcm"))
    shutil.rmtree(folder / "s00")
    write_series(phantom(n=2), folder / "scout")
    scout = sorted((folder / "scout").iterdir())
    shutil.move(str(scout[0]), str(folder / "scout.dcm"))
    shutil.rmtree(folder / "scout")
    _structure_set(folder / "rtstruct.dcm")


def _structure_set(path: Path) -> None:
    ds = _new_object(pydicom.uid.RTStructureSetStorage)
    ds.Modality, ds.SeriesNumber = "RTSTRUCT", 1000
    ds.save_as(str(path), enforce_file_format=True)


# ------------------------------------------------------------------------------------------- hostile objects
# Headers that do not match their pixel data, as damaged or hand-edited exports hold them.
HEADER_LIES = {
    "frames": {"NumberOfFrames": 4},  # one frame of pixels
    "rows": {"Rows": 128, "Columns": 128},  # 64 x 64 pixels
    "bits": {"BitsAllocated": 32, "BitsStored": 32, "HighBit": 31},  # 16-bit pixels
    "huge_frames": {"NumberOfFrames": 100000},  # a 9 KB file claiming 800 MB of pixels
}


def lying_header_file(path: Path, lie: str) -> None:
    """One 64 x 64 CT slice whose header says something else about its pixel data (see :data:`HEADER_LIES`)."""
    folder = path.parent / f"{path.stem}_series"
    first = write_series(phantom(n=2, size=64), folder)[0]
    ds = pydicom.dcmread(str(first))
    for keyword, value in HEADER_LIES[lie].items():
        setattr(ds, keyword, value)
    ds.save_as(str(path))
    shutil.rmtree(folder)


def series_with_spacing(folder: Path, spacing: str) -> list[Path]:
    """A series whose PixelSpacing is ``spacing`` (DICOM text such as '0\\0', '-0.7\\-0.7', 'nan\\nan')."""
    paths = write_series(phantom(n=6), folder)
    text = spacing.split("\\")

    def change(ds, index):
        ds["PixelSpacing"].value = text

    edit_headers(paths, change)
    return paths


def series_with_bad_file(folder: Path, damage: str) -> Path:
    """An 8-slice series with one damaged file; returns that file. ``damage``: ``truncated`` (pixel data cut),
    ``huge_length`` (an element claiming 64 KB in the middle of a 3 KB header), ``no_position`` (no
    ImagePositionPatient), ``nan_orientation``/``nan_position`` (NaN in the geometry), ``duplicate`` (one file copied
    under another name), ``same_uid`` (two slices carrying one SOPInstanceUID)."""
    paths = write_series(phantom(n=8), folder)
    bad = paths[3]
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-700])
    elif damage == "huge_length":
        _claim_huge_length(bad)
    elif damage == "duplicate":
        shutil.copy(bad, folder / "IMG_copy.dcm")
        return folder / "IMG_copy.dcm"
    else:
        _damage_header(bad, damage, pydicom.dcmread(str(paths[5])).SOPInstanceUID)
    return bad


def _damage_header(path: Path, damage: str, other_uid: str) -> None:
    from thinslice.io.discovery import library_messages_to_debug

    with library_messages_to_debug():  # pydicom's complaints about the NaN written on purpose
        ds = pydicom.dcmread(str(path))
        if damage == "no_position":
            del ds.ImagePositionPatient
        elif damage == "nan_orientation":
            ds["ImageOrientationPatient"].value = ["nan", "0", "0", "0", "1", "0"]
        elif damage == "nan_position":
            ds["ImagePositionPatient"].value = ["0", "nan", "9"]
        elif damage == "same_uid":
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(other_uid)
        else:
            raise ValueError(damage)
        ds.save_as(str(path))


def _claim_huge_length(path: Path) -> None:
    """Set the length of the (explicit VR) DerivationDescription to 65535 bytes, far past the end of the file."""
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<HH", 0x0008, 0x2111) + b"ST")
    if at < 0:
        raise ValueError(f"{path} has no DerivationDescription to damage")
    data[at + 6: at + 8] = b"\xff\xff"
    path.write_bytes(bytes(data))


def compressed_series(folder: Path, claimed_frames: int | None = None) -> list[Path]:
    """A 6-slice series in RLE Lossless (encapsulated pixel data); ``claimed_frames``: the third file's header says
    that many frames while its pixel data holds one."""
    paths = write_series(phantom(n=6), folder)
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(str(path))
        ds.compress(pydicom.uid.RLELossless)
        if claimed_frames is not None and index == 2:
            ds.NumberOfFrames = claimed_frames
        ds.save_as(str(path))
    return paths


def acr_nema_series(folder: Path, patient: str = "Old^Archive") -> list[Path]:
    """A CT series written as old archives hold it: no preamble, no "DICM", no file meta, implicit VR little
    endian. The patient, dates, StudyID and description are set, for a DICOM output to keep."""
    paths = write_series(phantom(n=6), folder)

    def strip(ds, index):
        ds.PatientName, ds.StudyDate, ds.StudyID = patient, "19990412", "4711"
        ds.StudyDescription, ds.SeriesDescription, ds.PatientPosition = "CT THORAX", "THORAX 3MM", "FFS"

    edit_headers(paths, strip)
    for path in paths:
        ds = pydicom.dcmread(str(path))
        del ds.file_meta
        ds.preamble = None
        ds.save_as(str(path), implicit_vr=True, little_endian=True, enforce_file_format=False)
    return paths


def dicomdir_export(root: Path) -> Volume:
    """A CD-style export: a DICOMDIR at ``root``, the series' files in ``root/DICOM/...`` with 8-character names.
    Returns the volume written."""
    from pydicom.fileset import FileSet

    vol = phantom(n=6)
    staging = root.parent / f"{root.name}_staging"
    paths = write_series(vol, staging)
    fs = FileSet()
    for path in paths:
        ds = pydicom.dcmread(str(path))
        ds.PatientID, ds.StudyDate, ds.StudyTime, ds.StudyID = "CD1", "20240105", "101500", "1"  # records need them
        fs.add(ds)
    root.mkdir(parents=True, exist_ok=True)
    fs.write(str(root))
    shutil.rmtree(staging)
    return vol


def segmentation_object(path: Path, frames: int = 4) -> None:
    """A DICOM SEG (binary segmentation, geometry per frame) of 16 x 16 frames."""
    ds = _new_object(pydicom.uid.SegmentationStorage)
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "SEG", 300, "lung mask"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit, ds.PixelRepresentation, ds.NumberOfFrames = 0, 0, frames
    ds.PixelData = bytes(16 * 16 * frames // 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)


def exam_summary(folder: Path, pages: int = 2) -> None:
    """Philips-style dose screens ("Exam Summary"): secondary-capture images, Modality CT, no patient geometry."""
    folder.mkdir(parents=True, exist_ok=True)
    series = pydicom.uid.generate_uid()
    for page in range(pages):
        ds = _new_object(pydicom.uid.SecondaryCaptureImageStorage)
        ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber = series, "CT", 999
        ds.SeriesDescription, ds.ImageType = "Exam Summary", ["DERIVED", "SECONDARY", "SCREEN SAVE"]
        ds.PatientID, ds.InstanceNumber = "P1", page + 1
        _pixel_module(ds, np.zeros((32, 32), np.uint16))
        ds.save_as(str(folder / f"DOSE{page:02d}.dcm"), enforce_file_format=True)


def fractional_slope_series(folder: Path, slope: float = 0.001) -> np.ndarray:
    """A CT series (Modality CT, e.g. a parametric map saved as CT) whose stored integers 0..20000 mean
    0..20 in steps of ``slope``; returns the true values (numpy order)."""
    vol = phantom(n=6)
    stored = np.rint((vol.array - vol.array.min()) / (vol.array.max() - vol.array.min()) * 20000).astype(np.int16)
    paths = write_series(vol, folder)

    def rescale(ds, index):
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", "0"
        ds.PixelData = np.ascontiguousarray(stored[index]).astype("<i2").tobytes()

    edit_headers(paths, rescale)
    return stored.astype(np.float64) * slope


def series_with_window(folder: Path, center: str = "40", width: str = "80", modality: str = "CT",
                       **extra: object) -> list[Path]:
    """A series whose WindowCenter/WindowWidth are ``center``/``width`` (a head CT's 40/80), Modality ``modality``
    (MR or PT for the non-CT cases; ``extra`` e.g. Units='BQML')."""
    paths = write_series(phantom(n=6), folder)

    def change(ds, index):
        ds.WindowCenter, ds.WindowWidth, ds.Modality = center, width, modality
        if modality != "CT":
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = (
                pydicom.uid.MRImageStorage if modality == "MR" else pydicom.uid.PositronEmissionTomographyImageStorage)
        for keyword, value in extra.items():
            setattr(ds, keyword, value)

    edit_headers(paths, change)
    return paths


def huge_series(folder: Path, side: int = 45000, files: int = 16) -> None:
    """``files`` slices whose header says ``side`` x ``side`` pixels, as sparse files of the full length (nothing
    is stored on disk): more than any machine's memory, found from the headers alone."""
    folder.mkdir(parents=True, exist_ok=True)
    series = pydicom.uid.generate_uid()
    for k in range(files):
        ds = _new_object(pydicom.uid.CTImageStorage)
        ds.SeriesInstanceUID, ds.Modality = series, "CT"
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 3.0 * k], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.01, 0.01]
        _pixel_module(ds, np.zeros((2, 2), np.uint16))
        ds.Rows = ds.Columns = side
        ds.PixelData = b""
        path = folder / f"BIG{k:03d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        data = bytearray(path.read_bytes())
        length = side * side * 2
        data[-4:] = struct.pack("<I", length)  # the (empty) PixelData element's length, as it comes last
        path.write_bytes(bytes(data))
        with open(path, "r+b") as fh:
            fh.truncate(len(data) + length)  # sparse: the pixels are holes of zeros
