"""Reading CT volumes (NIfTI, NRRD, MetaImage, DICOM series) into :class:`~thinslice.io.volume.Volume`.

SimpleITK does the decoding: it converts every format's geometry to the same LPS convention, applies the DICOM
rescale slope/intercept, and (through GDCM) sorts DICOM slices by their position in the patient. What is added
here are the checks a user needs clear messages for (2D images, one slice, missing spacing, several series,
uneven slice gaps) and CT-specific clean-up of padding values.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from thinslice.errors import ThinsliceError, os_reason
from thinslice.io.atomic import native_messages_to_log
from thinslice.io.detached import check_compressed_data, data_files, regular_file_check
from thinslice.io.dicom import header_text, read_header
from thinslice.io.dicom_study import SOURCE_KEY, capture_source
from thinslice.io.discovery import (
    FolderScan,
    SeriesInfo,
    describe_damage,
    find_dicomdir,
    library_messages_to_debug,
    scan_dicom_folder,
)
from thinslice.io.formats import (
    DICOM_SUFFIXES,
    NIFTI,
    file_extension,
    files_read_beside,
    format_for_suffix,
    input_format,
    readable_text,
)
from thinslice.io.geometry import Stack, describe_tilt, is_sheared, stack_from_offsets
from thinslice.io.gz import GZIP_ERRORS, open_gzip
from thinslice.io.lazy import lazy_import
from thinslice.io.limits import NOT_HU_ABOVE, check_read_size, check_voxel_size, check_voxel_values, voxel_count
from thinslice.io.nifti import read_header as read_nifti_header
from thinslice.io.nifti import read_voxels as read_nifti_voxels
from thinslice.io.volume import ISO_TOL, Volume

if TYPE_CHECKING:  # the real modules for the type checker; at run time they load on first use
    import SimpleITK as sitk
else:
    sitk = lazy_import("SimpleITK")  # loaded when a file is first read or written

log = logging.getLogger(__name__)

# Scanners mark voxels outside the reconstruction circle with values far below air (-2048, -3024, ...).
PADDING_BELOW_HU = -2000.0
AIR_HU = -1024.0
# Relative deviation from the median slice gap above which a DICOM series counts as unevenly spaced.
_GAP_TOLERANCE = 0.1

_DICOM_META_TAGS = {
    "modality": "0008|0060",
    "series_description": "0008|103e",
    "patient_id": "0010|0020",
    "series_uid": "0020|000e",
    "study_uid": "0020|000d",
    "manufacturer": "0008|0070",
    "kernel": "0018|1210",
    "body_part": "0018|0015",
    "window_center": "0028|1050",
    "window_width": "0028|1051",
}
_META_PREFIX = "thinslice_"


def read_volume(path: str | Path, series_uid: str | None = None) -> Volume:
    """Read a CT volume in HU (float32) with its geometry.

    ``path`` is a NIfTI/NRRD/MHA(MHD) file, a folder holding a DICOM series, or one DICOM file (its whole series is
    read from the same folder). ``series_uid`` picks a series when the folder holds several. The format comes from
    :mod:`thinslice.io.formats` (the suffix, else a DICOM header, else any file ITK opens).
    """
    path = Path(path)
    if not path.exists():
        raise ThinsliceError(f"{path} does not exist; check the path")
    if not path.is_dir():
        regular_file_check(path)  # a named pipe or a device would block or never end
    return input_format(path).read(path, series_uid)


def read_dicom_input(path: Path, series_uid: str | None = None) -> Volume:
    """The DICOM row's reader: a series folder, a DICOMDIR (the series it lists) or one file of a series."""
    if path.is_dir():
        return read_dicom_folder(path, series_uid)
    with library_messages_to_debug():
        ds = read_header(path, ["SeriesInstanceUID", "DirectoryRecordSequence"])
    if ds is None:
        raise ThinsliceError(f"{path} is not a readable DICOM file (corrupt or truncated?)")
    if "DirectoryRecordSequence" in ds:  # a DICOMDIR: the series it lists, from its folder
        return read_dicom_folder(path.parent, series_uid)
    own_uid = header_text(ds, "SeriesInstanceUID")
    if series_uid and own_uid and series_uid != own_uid:
        raise ThinsliceError(f"{path} belongs to series {own_uid}, not {series_uid}; pass the folder instead")
    with library_messages_to_debug():
        return _read_dicom_folder(path.parent, own_uid or series_uid, single_file=path)


def files_read(path: str | Path, series_uid: str | None = None) -> list[Path]:
    """Every file a :func:`read_volume` of ``path`` opens: the file with its detached data files (an .nhdr/.mhd
    header names them), or the files of the DICOM series (all series of a folder where none is picked). Used to
    keep an output from replacing any of them and to notice a changed data file when a cohort is resumed; a
    header that names a data file outside its folder is refused here too."""
    path = Path(path)
    if path.is_dir() or file_extension(path) in DICOM_SUFFIXES or (path.is_file() and input_format(path).folder):
        return _dicom_files_read(path, series_uid)
    if not path.is_file() or format_for_suffix(file_extension(path)) is NIFTI:
        return [path]
    return [path, *data_files(path), *files_read_beside(path)]


def _dicom_files_read(path: Path, series_uid: str | None) -> list[Path]:
    folder = path if path.is_dir() else path.parent
    with library_messages_to_debug():
        scan = scan_dicom_folder(folder)
    try:
        chosen = [scan.pick(series_uid, file=None if path.is_dir() else path)]
    except ThinsliceError:
        chosen = scan.series
    return [Path(f) for series in chosen for f in series.files] or [path]


def read_dicom_folder(folder: Path, series_uid: str | None = None, scan: FolderScan | None = None) -> Volume:
    """:func:`read_volume` of a DICOM folder; ``scan``: its headers, when the caller has scanned them already."""
    with library_messages_to_debug():
        return _read_dicom_folder(folder, series_uid, scan=scan)


# ------------------------------------------------------------------------------------------------ one file
def read_itk_file(path: Path, series_uid: str | None = None) -> Volume:
    """The reader of the formats SimpleITK decodes (NRRD, MetaImage, any other 3D file it opens); ``series_uid``
    is unused (the signature of every reader in :mod:`thinslice.io.formats`)."""
    ext = file_extension(path)
    # refuses a detached data file that does not lie beside its header, and "compressed" data that are not
    check_compressed_data(path, data_files(path))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with native_messages_to_log():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        if format_for_suffix(ext) is not None:
            raise ThinsliceError(
                f"cannot read {path}: the file is corrupt or truncated ({_sitk_reason(exc)})") from None
        raise ThinsliceError(
            f"cannot read {path}: unsupported file type {ext or '(no extension)'!r}; use {readable_text()}") from None
    size = reader.GetSize()
    _check_dimensions(path, reader.GetDimension(), size, reader.GetNumberOfComponents())
    check_read_size(path, voxel_count(size), _pixel_bytes(reader.GetPixelID()), "x".join(map(str, size)))
    try:
        with native_messages_to_log():
            image = reader.Execute()
    except RuntimeError as exc:
        raise ThinsliceError(f"cannot read the voxels of {path}: the file is corrupt or truncated "
                             f"({_sitk_reason(exc)})") from None
    if image.GetDimension() == 4:  # a 4D file whose 4th axis has size 1
        image = image[:, :, :, 0]
    check_voxel_values(sitk.GetArrayViewFromImage(image), path)  # before the cast below
    image = sitk.Cast(image, sitk.sitkFloat32)
    check_voxel_size(path, image.GetSpacing())
    metadata = {"source": str(path)}
    for key in reader.GetMetaDataKeys():
        if key.startswith(_META_PREFIX):
            metadata[key[len(_META_PREFIX):]] = reader.GetMetaData(key)
    notes = " ".join(reader.GetMetaData(k) for k in ("ITK_FileNotes", "descrip") if reader.HasMetaDataKey(k))
    return _to_volume(image, path, metadata, _noted_thickness(metadata, notes), padding_hu=None)


def read_nifti_file(path: Path, series_uid: str | None = None) -> Volume:
    """The NIfTI reader (``series_uid`` unused): a NIfTI-1 or NIfTI-2 file, decoded by nibabel after the header
    checks (dimensions, memory, completeness): ITK turns NaN voxels into 0, does not open NIfTI-2, and reads unusual
    qforms differently from the standard."""
    nifti = read_nifti_header(path)
    shape = nifti.shape
    _check_dimensions(path, len(shape), shape, 1)
    check_read_size(path, voxel_count(shape), nifti.bytes_per_voxel, "x".join(map(str, shape)))
    _check_nifti_pixdim(path, nifti.raw)
    array = read_nifti_voxels(path, _nifti_expected_bytes(nifti.raw) or 0)  # native values checked before scaling
    check_voxel_values(array, path)
    image = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
    metadata = {"source": str(path)}
    if nifti.sheared:
        image = _sheared_nifti_image(image, (nifti.matrix, nifti.origin), path, metadata)
    else:
        spacing = np.linalg.norm(nifti.matrix, axis=0)
        image.SetSpacing(tuple(float(s) for s in spacing))
        image.SetDirection(tuple(float(d) for d in (nifti.matrix / spacing).ravel()))
        image.SetOrigin(tuple(float(o) for o in nifti.origin))
    check_voxel_size(path, image.GetSpacing())
    return _to_volume(image, path, metadata, _noted_thickness(metadata, nifti.description), padding_hu=None)


def _noted_thickness(metadata: dict[str, str], notes: str) -> float | None:
    """The slice thickness thinslice recorded when it wrote the file (a metadata key, or a note in descrip)."""
    match = re.search(r"slice_thickness=([0-9.eE+-]+)", notes)
    text = metadata.pop("slice_thickness", None) or (match.group(1) if match else None)
    return _positive_float(text) if text else None


def _pixel_bytes(pixel_id: int) -> int:
    """Bytes per voxel of an ITK pixel type (8 for the 64-bit and any other type)."""
    sizes = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
             sitk.sitkInt32: 4, sitk.sitkFloat32: 4}
    return sizes.get(pixel_id, 8)


def _check_dimensions(path: Path, dim: int, size: tuple[int, ...], components: int) -> None:
    shape = "x".join(str(s) for s in size)
    if components != 1:
        raise ThinsliceError(f"{path} has {components} values per voxel (colour or vector image, {shape}); "
                             "thinslice needs a grey-value CT volume in HU")
    if dim == 2:
        raise ThinsliceError(f"{path} is a 2D image ({shape}); thinslice needs a 3D CT volume (a NIfTI/NRRD/MHA "
                             "file or a folder with a DICOM series)")
    if dim == 4 and size[3] != 1:
        raise ThinsliceError(f"{path} is a 4D image ({shape}); extract one 3D volume (one time point) first")
    if dim not in (3, 4):
        raise ThinsliceError(f"{path} has {dim} dimensions ({shape}); thinslice needs a 3D CT volume")
    if min(size[:3]) < 2:
        raise ThinsliceError(f"{path} holds only one slice ({shape}); thinslice needs a 3D stack of slices "
                             "(pass the whole series or volume)")


def _check_nifti_pixdim(path: Path, header: bytes) -> None:
    """Refuse a NIfTI whose header has no voxel size.

    The NIfTI library inside ITK silently turns a zero pixdim into 1 mm, which would give a plausible-looking but
    wrong geometry, so the raw header is read here.
    """
    if len(header) < 348:
        return
    for endian in ("<", ">"):
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348:
            pixdim = struct.unpack(endian + "8f", header[76:108])
            break
        if sizeof_hdr == 540 and len(header) >= 540:
            pixdim = struct.unpack(endian + "8d", header[104:168])
            break
    else:
        return
    voxel = pixdim[1:4]
    if not all(np.isfinite(v) and v != 0 for v in voxel):
        raise ThinsliceError(
            f"{path} has no voxel size in its header (pixdim = {tuple(float(v) for v in voxel)}); set the spacing "
            "in mm (e.g. nibabel: img.header.set_zooms(...)) or convert from the original DICOM")


def _check_nifti_complete(path: Path) -> bytes:
    """Refuse a NIfTI file with fewer voxel bytes than its header promises, or a gzip stream that is cut short or
    fails its CRC: ITK reads such files without error and fills the missing slices with zeros (0 HU). Returns the
    raw header (first 540 bytes) for the other header checks."""
    opener = open_gzip if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            header = fh.read(540)
            expected = _nifti_expected_bytes(header)
            if expected is None:
                return header
            present = len(header)
            while chunk := fh.read(1 << 22):
                present += len(chunk)
    except GZIP_ERRORS as exc:
        raise ThinsliceError(f"cannot read {path}: the compressed file is truncated or corrupt ({exc}); copy or "
                             "export it again") from None
    except OSError as exc:
        raise ThinsliceError(f"cannot read {path}: {os_reason(exc)}") from None
    if present < expected:
        raise ThinsliceError(f"cannot read {path}: the file is truncated ({present} of {expected} bytes that its "
                             "header promises); copy or export it again")
    return header


def _sheared_nifti_image(image: sitk.Image, shear: tuple[np.ndarray, np.ndarray], path: Path,
                         metadata: dict[str, str]) -> sitk.Image:
    """The voxels of a sheared-sform NIfTI on an orthogonal grid: each slice k at origin + k x (sform column k)."""
    matrix, origin = shear
    spacing = np.linalg.norm(matrix, axis=0)
    array = sitk.GetArrayFromImage(image)
    offsets = np.arange(array.shape[0])[:, None] * matrix[:, 2][None, :]
    stack = stack_from_offsets(array, (spacing[0], spacing[1]), matrix[:, :2] / spacing[:2], origin, offsets,
                               fill=float(array.min()), source=path)
    if stack.tilt_deg > 0:
        metadata["gantry_tilt_deg"] = f"{stack.tilt_deg:.2f}"
        metadata["geometry"] = "sheared sform resampled onto an orthogonal grid"
        log.warning("%s", describe_tilt(stack, path).replace("(gantry tilt)", "(sheared sform, e.g. gantry tilt)"))
    return _stack_image(stack)


def _nifti_expected_bytes(header: bytes) -> int | None:
    """vox_offset + voxels x bytes per voxel from a NIfTI-1/2 header, or None when it is not one."""
    for endian in ("<", ">"):
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", header[16:80])
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            offset = int(struct.unpack(endian + "q", header[168:176])[0])
            break
    else:
        return None
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    voxels = voxel_count(max(1, int(d)) for d in dims[1: ndim + 1])
    return max(offset, 348) + voxels * bitpix // 8


# ---------------------------------------------------------------------------------------------------- DICOM
def _read_dicom_folder(folder: Path, series_uid: str | None, single_file: Path | None = None,
                       scan: FolderScan | None = None) -> Volume:
    scan = scan or scan_dicom_folder(folder)
    if not scan.series and folder.is_dir() and find_dicomdir(folder):
        scan = scan_dicom_folder(folder, follow_dicomdir=True)  # a CD/DVD export: the files its DICOMDIR lists
    if not scan.series:
        subdirs = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        hint = (f"; it has {len(subdirs)} subfolder(s): pass the folder of one series, or use `thinslice prepare` "
                "for a tree of studies") if subdirs else ""
        what = "is empty" if not any(folder.iterdir()) else "holds no DICOM series"
        raise ThinsliceError(f"{folder} {what}{hint}")
    chosen = scan.pick(series_uid, file=single_file)
    source = single_file or folder
    _check_series(chosen, source)
    files = list(chosen.files)
    if len(files) < 2:
        # One file may still hold a whole multi-frame volume.
        return _read_single_dicom_file(Path(files[0]), source)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.SetOutputPixelType(sitk.sitkFloat32)
    reader.SetSpacingWarningRelThreshold(1e9)  # uneven gaps are checked (and explained) below
    try:
        with native_messages_to_log(), library_messages_to_debug():
            image = reader.Execute()
    except RuntimeError as exc:
        raise ThinsliceError(f"cannot read the DICOM series {chosen.uid} in {folder}: {_sitk_reason(exc)}") from None
    _check_dimensions(source, image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel())

    def tag(key: str, index: int = 0) -> str:
        return reader.GetMetaData(index, key).strip() if reader.HasMetaDataKey(index, key) else ""

    try:
        image, notes = _regularise_slice_geometry(image, [tag("0020|0032", i) for i in range(len(files))], source)
    except ThinsliceError as exc:
        raise _with_unreadable(exc, scan) from None
    metadata = {"source": str(source)}
    metadata.update({name: value for name, key in _DICOM_META_TAGS.items() if (value := tag(key))})
    metadata.update(notes)
    metadata.update(_value_step([tag("0028|1053", i) for i in range(len(files))]))
    instances = [(tag("0008|0018", i), tag("0020|0032", i)) for i in range(len(files))]
    if record := capture_source(Path(files[0]), instances):  # kept for a DICOM output (dicom_study)
        metadata[SOURCE_KEY] = record
    thickness = _positive_float(tag("0018|0050"))
    return _to_volume(image, source, metadata, thickness, padding_hu=_padding_hu(tag), stacked=True)


def _with_unreadable(exc: ThinsliceError, scan: FolderScan) -> ThinsliceError:
    """``exc`` (missing or doubled slices) naming the DICOM files beside the series that could not be read: they may
    be the missing slices."""
    if not scan.unreadable:
        return exc
    names = ", ".join(f"{p.name} ({describe_damage(p)})" for p in scan.unreadable[:3])
    return ThinsliceError(f"{exc}; {len(scan.unreadable)} damaged file(s) beside it may be the missing slices: "
                          f"{names}")


def _check_series(series: SeriesInfo, source: Path) -> None:
    """Refuse, in one line and before any pixel is decoded, a series that is not a slice stack with a geometry, or
    one with a damaged file (named): ITK would stack radiographs or multi-frame objects into an invented 1 x 1 x 1 mm
    volume, pad short pixel data with 0 HU, or fail with a message that names no file."""
    name = f"#{series.number}" if series.number is not None else (series.label or series.uid)
    what = f"series {name} ({series.description or 'no description'!r}, {series.modality or '?'})"
    if not series.is_image:
        raise ThinsliceError(f"{source}: {what} holds no images (e.g. a structure set or a report); pick an image "
                             "series with --series")
    if series.object_kind:
        raise ThinsliceError(f"{source}: {what} is {series.object_kind}")
    if series.problems:
        raise ThinsliceError(_problems_text(series))
    if len(series.sizes) > 1:
        sizes = ", ".join(f"{size} ({n} files)" for size, n in series.sizes)
        raise ThinsliceError(f"{source}: {what} mixes image sizes {sizes}, so it is not one volume; move the files "
                             "of the other size(s) to another folder")
    sop_name = _sop_name(series.sop_class)
    if "Enhanced" in sop_name or "Legacy Converted" in sop_name:
        raise ThinsliceError(f"{source}: {what} is an enhanced multi-frame object ({sop_name}) whose geometry is "
                             "stored per frame, which thinslice does not read; convert it with dcm2niix "
                             "(dcm2niix -z y FOLDER) and pass the .nii.gz")
    if not series.has_geometry:
        raise ThinsliceError(f"{source}: {what} has no patient geometry (ImagePositionPatient, "
                             "ImageOrientationPatient or PixelSpacing missing, e.g. radiographs or screen captures); "
                             "thinslice needs a CT slice stack with positions and a voxel size")
    width, height = (series.sizes[0][0].split("x") + ["", ""])[:2]
    check_read_size(source, series.voxels, series.bytes_per_voxel,
                    f"{width}x{height}x{series.count}" if height else "")


def _problems_text(series: SeriesInfo) -> str:
    """One line naming the first damaged file of ``series`` and what is wrong with it, and what to do."""
    count = len(series.problems)
    first = series.folder / series.problems[0]
    if series.num_files == 1:
        return f"{first}; export the file again"
    if count >= series.num_files:
        return f"{first} (and every other file of its series likewise): fix or export the series again"
    more = f" (and {count - 1} more file(s) of its series)" if count > 1 else ""
    if count == 1 and " and " in series.problems[0].split(":")[0]:  # one instance in two files
        return f"{first}; remove the file that does not belong to the series"
    return f"{first}{more}; replace {'them' if count > 1 else 'it'} with an intact copy or export the series again"


def _sop_name(uid: str) -> str:
    import pydicom

    return pydicom.uid.UID(uid).name if uid else ""


def _read_single_dicom_file(path: Path, source: Path) -> Volume:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with native_messages_to_log(), library_messages_to_debug():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ThinsliceError(f"cannot read DICOM file {path}: {_sitk_reason(exc)}") from None
    size = reader.GetSize()
    dim = reader.GetDimension()
    if dim == 2 or (dim == 3 and min(size) < 2):
        raise ThinsliceError(f"{source} holds only one slice ({'x'.join(map(str, size))}); thinslice needs a 3D "
                             "stack of slices (pass the folder with the whole series)")
    _check_dimensions(source, dim, size, reader.GetNumberOfComponents())
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        with native_messages_to_log(), library_messages_to_debug():
            image = reader.Execute()
    except RuntimeError as exc:
        raise ThinsliceError(f"cannot read the voxels of DICOM file {path}: the file is corrupt or truncated "
                             f"({_sitk_reason(exc)})") from None

    def tag(key: str) -> str:
        return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""

    metadata = {"source": str(source)}
    metadata.update({name: value for name, key in _DICOM_META_TAGS.items() if (value := tag(key))})
    metadata.update(_value_step([tag("0028|1053")]))
    if record := capture_source(path, [(tag("0008|0018"), "")]):  # kept for a DICOM output (dicom_study)
        metadata[SOURCE_KEY] = record
    return _to_volume(image, source, metadata, _positive_float(tag("0018|0050")), padding_hu=_padding_hu(tag),
                      stacked=True)


def _value_step(slopes: list[str]) -> dict[str, str]:
    """{"value_step": slope} when the series stores values in steps finer than 1 (a fractional RescaleSlope, e.g.
    0.001): the writers then keep them (float32 files, the slope in a DICOM output) instead of rounding to integers."""
    values = [v for v in (_positive_float(text) for text in slopes) if v is not None]
    step = min(values) if values else 1.0
    return {"value_step": f"{step:.10g}"} if step < 1.0 else {}


def _regularise_slice_geometry(image: sitk.Image, positions_text: list[str], source: Path
                               ) -> tuple[sitk.Image, dict[str, str]]:
    """Check the slice positions of a series and set the slice spacing from all of them.

    ITK derives the slice spacing from the first two files and only warns when gaps differ. Missing slices or
    mixed acquisitions would then silently get a wrong geometry, so they are refused here with an explanation.
    """
    notes: dict[str, str] = {}
    try:
        positions = np.array([[float(v) for v in text.split("\\")] for text in positions_text], dtype=np.float64)
    except ValueError:
        return image, notes  # no usable ImagePositionPatient: keep what ITK derived
    if positions.shape != (len(positions_text), 3):
        return image, notes
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    normal = direction[:, 2]
    along = positions @ normal
    gaps = np.diff(along)
    median = float(np.median(gaps))
    if median <= 1e-6 or np.any(gaps <= 1e-6 * max(1.0, median)):
        dup = int(np.sum(np.abs(gaps) <= 1e-3))
        raise ThinsliceError(f"DICOM series in {source} has {dup} slice(s) at the same position (several "
                             "acquisitions or echoes mixed in one series); split the series before using it")
    deviation = np.abs(gaps - median) / median
    if np.any(deviation > _GAP_TOLERANCE):
        raise ThinsliceError(
            f"DICOM series in {source} has uneven slice gaps ({gaps.min():.3g} to {gaps.max():.3g} mm, median "
            f"{median:.3g} mm): slices are missing or the series mixes several ranges; resample it to a regular grid "
            "or pass a complete series")
    spacing = list(image.GetSpacing())
    spacing[2] = float((along[-1] - along[0]) / (len(along) - 1))
    image.SetSpacing(spacing)
    image.SetOrigin(tuple(positions[0]))
    # Gantry tilt shears the stack (each slice shifted sideways): resampled onto an orthogonal grid.
    return _unshear(image, positions - positions[0], source, notes), notes


def _unshear(image: sitk.Image, offsets: np.ndarray, source: Path, notes: dict[str, str]) -> sitk.Image:
    """``image`` whose slice k lies at origin + offsets[k], on an orthogonal grid (the same image when unsheared)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not is_sheared(image.GetSpacing()[:2], direction[:, :2], offsets):
        return image
    array = sitk.GetArrayFromImage(image)
    stack = stack_from_offsets(array, image.GetSpacing()[:2], direction[:, :2], np.asarray(image.GetOrigin()),
                               offsets, fill=float(array.min()), source=source)
    notes["gantry_tilt_deg"] = f"{stack.tilt_deg:.2f}"
    notes["geometry"] = "gantry tilt resampled onto an orthogonal grid"
    log.warning("%s", describe_tilt(stack, source))
    return _stack_image(stack)


def _stack_image(stack: Stack) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(stack.array, dtype=np.float32))
    image.SetSpacing(tuple(float(s) for s in stack.spacing))
    image.SetOrigin(tuple(float(o) for o in stack.origin))
    image.SetDirection(tuple(float(d) for d in stack.direction.ravel()))
    return image


def _padding_hu(tag: Callable[[str], str]) -> list[tuple[float, float]]:
    """HU range(s) the DICOM header marks as padding (PixelPaddingValue[, PixelPaddingRangeLimit])."""
    pad_text = tag("0028|0120")
    if not pad_text:
        return []
    try:
        pad = float(pad_text.split("\\")[0])
        limit = float(tag("0028|0121").split("\\")[0]) if tag("0028|0121") else pad
        slope = float(tag("0028|1053") or 1.0)
        intercept = float(tag("0028|1052") or 0.0)
    except ValueError:
        return []
    signed = tag("0028|0103") == "1"
    if signed:  # a US-encoded padding value in a signed image means its two's complement
        pad = pad - 65536 if pad > 32767 else pad
        limit = limit - 65536 if limit > 32767 else limit
    lo, hi = sorted((pad * slope + intercept, limit * slope + intercept))
    return [(lo, hi)]


# --------------------------------------------------------------------------------------------------- shared
def _to_volume(image: sitk.Image, source: Path, metadata: dict[str, str], thickness: float | None,
               padding_hu: list[tuple[float, float]] | None, stacked: bool = False) -> Volume:
    """The Volume of ``image``; ``stacked``: a DICOM stack, whose slice axis is its stacking axis k (see
    :func:`_stack_axis`)."""
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if array.dtype.kind == "f":
        not_finite = int(array.size - np.count_nonzero(np.isfinite(array)))
        if not_finite:
            raise ThinsliceError(
                f"{source} holds {not_finite} NaN or infinite voxels; replace them (e.g. by -1024 HU for air) "
                "before using the volume"
            )
    if metadata.get("modality", "CT") == "CT":
        mask = array <= PADDING_BELOW_HU
        for lo, hi in padding_hu or []:
            mask |= (array >= lo - 0.5) & (array <= hi + 0.5)
        count = int(np.count_nonzero(mask))
        if count:
            array[mask] = AIR_HU
            rule = f"<= {PADDING_BELOW_HU:g} HU" + (" or at PixelPaddingValue" if padding_hu else "")
            metadata["padding_replaced"] = f"{count} voxels ({rule}) set to {AIR_HU:g} HU"
    modality = metadata.get("modality", "CT") or "CT"
    if modality.upper() != "CT":
        log.warning("%s: Modality %s, not CT: thinslice's models and defaults assume CT in HU (a DICOM output is "
                    "refused; NIfTI/NRRD/MHA are written)", source, modality)
    else:
        _warn_if_not_hu(array, source)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    axis = _stack_axis(image.GetSpacing()) if stacked else _recorded_axis(metadata)
    if axis is not None:
        metadata["slice_axis"] = "ijk"[axis]
    return Volume(array=array, spacing=tuple(image.GetSpacing()), origin=tuple(image.GetOrigin()),
                  direction=direction, slice_thickness=thickness, metadata=metadata, stack_axis=axis)


def _stack_axis(spacing: tuple[float, ...]) -> int | None:
    """The slice axis of a DICOM stack: k, the axis the images are stacked along, so that a near-isotropic sagittal
    series is not cut along its in-plane head-feet axis. Only where an in-plane spacing clearly exceeds the others
    (a reformatted volume written as images, as thinslice's own DICOM output of such a volume) does the geometry
    decide, as for files."""
    sp = np.asarray(spacing, dtype=np.float64)
    largest = int(np.argmax(sp))
    clearly = sp[largest] > np.delete(sp, largest).max() * (1 + ISO_TOL)
    return None if clearly and largest != 2 else 2


def _recorded_axis(metadata: dict[str, str]) -> int | None:
    """The slice axis an NRRD/MHA file written by thinslice recorded (the metadata key ``slice_axis``)."""
    text = metadata.get("slice_axis", "")
    return "ijk".index(text) if text in ("i", "j", "k") else None


def _warn_if_not_hu(array: np.ndarray, source: Path) -> None:
    """CT in Hounsfield units always holds air (about -1000 HU) around or inside the patient; a volume without any
    value below -500 is MR, PET, a windowed 8-bit export or rescaled data, for which the CT models make no sense."""
    low, high = float(array.min()), float(array.max())
    if low > NOT_HU_ABOVE:
        log.warning("%s: values %.0f..%.0f have no air (about -1000 HU): this does not look like CT in Hounsfield "
                    "units; thinslice's models and defaults assume CT HU", source, low, high)


def _positive_float(text: str | None) -> float | None:
    try:
        value = float(str(text).split("\\")[0])
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _sitk_reason(exc: RuntimeError) -> str:
    """The informative last line of a multi-line ITK exception."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        text = re.sub(r"^.*?(itk::ERROR|ERROR):\s*", "", line)
        text = re.sub(r"^\w+\(0x[0-9a-f]+\):\s*", "", text)
        if text and not text.startswith(("Description", "Location", "File", "Line")):
            return text[:200]
    return (lines[-1] if lines else "unknown error")[:200]
