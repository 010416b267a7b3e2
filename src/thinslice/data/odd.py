"""Small synthetic archives with the odd properties real ones have (gantry tilt, sheared NIfTI, sagittal stacks,
radiographs, multi-frame objects, scouts in a series, damaged files, many series), built from the chest phantom.

The tests and ``benchmarks/reliability.py`` use them, so that every case runs without outside data. Each writer
returns what a correct reader must find (e.g. the world position of a marker), not just the files.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np

from thinslice.data.phantom import make_chest_phantom
from thinslice.io.lazy import lazy_import
from thinslice.io.volume import Volume

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
    """Apply ``change(dataset, index)`` to every file and save it in place."""
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
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
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
