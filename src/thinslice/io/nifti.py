"""NIfTI headers read with nibabel before ITK decodes voxels: precise messages for damaged headers, the geometry of
the NIfTI standard (sform, else qform with qfac, else pixdim), and NIfTI-2 files, which ITK's reader does not open.

ITK's NIfTI reader differs from the standard and from nibabel where headers are unusual (a negative slice pixdim
reverses its slice order, NIfTI-2 is "not a readable file", a huge extension size ends in "Failed to allocate
memory"), so the geometry of every NIfTI is taken from nibabel's reading of the header and ITK only decodes voxels.
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from thinslice.errors import ThinsliceError, os_reason
from thinslice.io.gz import GZIP_ERRORS, open_gzip
from thinslice.io.lazy import lazy_import
from thinslice.io.limits import check_voxel_values

if TYPE_CHECKING:  # the real modules for the type checker; at run time they load on first use
    import nibabel as nib
    from nibabel.arrayproxy import ArrayProxy
else:
    nib = lazy_import("nibabel")
log = logging.getLogger(__name__)

# Header plus extensions read at most: CT files carry a few KB of extensions (dcm2niix, AFNI); a vox_offset beyond
# this is a damaged header, not a volume.
HEADER_BYTES_LIMIT = 16 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
# xyzt_units of the spatial axes, in mm (ITK scales the same way).
_UNIT_MM = {"meter": 1000.0, "micron": 0.001}


@dataclass(frozen=True)
class NiftiHeader:
    """What the reader needs from a NIfTI header: nibabel's header, its version and the geometry in LPS mm."""

    header: nib.Nifti1Header  # or its subclass Nifti2Header
    raw: bytes  # the header as stored, with its extensions
    version: int
    matrix: np.ndarray  # 3x3, columns = the i, j, k steps in mm (LPS)
    origin: np.ndarray  # 3, LPS mm

    @property
    def sheared(self) -> bool:
        """Whether the voxel axes are not perpendicular (an sform written for an uncorrected gantry tilt)."""
        return _is_sheared(self.matrix)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.header.get_data_shape())

    @property
    def description(self) -> str:
        return bytes(self.header["descrip"].item()).decode("latin-1", "replace")

    @property
    def bytes_per_voxel(self) -> int:
        return int(self.header.get_data_dtype().itemsize)


@contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """Keep nibabel's header fix-up notes off stderr (the problems they name are reported here in one line)."""
    logger = logging.getLogger("nibabel.global")
    saved = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = saved


def read_header(path: Path) -> NiftiHeader:
    """The checked header of a .nii/.nii.gz file; a file whose header is damaged is refused in one line."""
    raw = _header_bytes(path)
    version, endian = _version(path, raw)
    _check_extensions(path, raw, version, endian)
    klass = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    try:
        with _quiet_nibabel():
            header = klass.from_fileobj(io.BytesIO(raw), check=True)
    except Exception as exc:  # nibabel raises HeaderDataError, ValueError, struct errors...
        raise ThinsliceError(f"cannot read {path}: its NIfTI header is damaged ({str(exc)[:160]}); export the "
                             "volume again") from None
    matrix, origin = _lps_geometry(path, header, raw, endian)
    return NiftiHeader(header=header, raw=raw, version=version, matrix=matrix, origin=origin)


def _header_bytes(path: Path) -> bytes:
    """The header and its extensions (up to vox_offset), with the compression checked against the name."""
    try:
        with open(path, "rb") as fh:
            start = fh.read(348)
        gz = path.name.lower().endswith(".gz")
        if gz and start[:2] != _GZIP_MAGIC:
            if _vox_offset(start.ljust(540, b"\0")) or start[:4] in (b"\x5c\x01\0\0", b"\0\0\x01\x5c"):
                raise ThinsliceError(f"cannot read {path}: it is not gzip-compressed although its name ends in .gz; "
                                     f"rename it to {path.name[:-3]}")
            raise ThinsliceError(f"cannot read {path}: the file is corrupt or not a NIfTI file (neither gzip-"
                                 "compressed nor a NIfTI header); copy or export it again")
        magic = start[:2]
        if not gz and magic == _GZIP_MAGIC:
            raise ThinsliceError(f"cannot read {path}: it is gzip-compressed although its name ends in .nii; "
                                 f"rename it to {path.name}.gz")
        opener = open_gzip if gz else open
        with opener(path, "rb") as fh:
            raw = fh.read(540)
            offset = _vox_offset(raw)
            if offset > len(raw):
                raw += fh.read(min(offset, HEADER_BYTES_LIMIT) - len(raw))
    except GZIP_ERRORS as exc:
        raise ThinsliceError(f"cannot read {path}: the compressed file is truncated or corrupt ({exc}); copy or "
                             "export it again") from None
    except OSError as exc:
        raise ThinsliceError(f"cannot read {path}: {os_reason(exc)}") from None
    return raw


def _vox_offset(raw: bytes) -> int:
    """vox_offset of a NIfTI-1/2 header (0 when the header is not one; :func:`_version` says why)."""
    for endian in ("<", ">"):
        if len(raw) >= 348 and struct.unpack(endian + "i", raw[:4])[0] == 348:
            value = struct.unpack(endian + "f", raw[108:112])[0]
            return int(value) if np.isfinite(value) and value > 0 else 0
        if len(raw) >= 540 and struct.unpack(endian + "i", raw[:4])[0] == 540:
            return max(0, struct.unpack(endian + "q", raw[168:176])[0])
    return 0


def _version(path: Path, raw: bytes) -> tuple[int, str]:
    """(1 or 2, byte order) from sizeof_hdr, which a NIfTI-1 header sets to 348 and a NIfTI-2 header to 540."""
    if len(raw) < 348:
        raise ThinsliceError(f"cannot read {path}: the file is truncated ({len(raw)} bytes, shorter than a NIfTI "
                             "header of 348 bytes); copy or export it again")
    for endian in ("<", ">"):
        size = struct.unpack(endian + "i", raw[:4])[0]
        if size == 348 or (size == 540 and len(raw) >= 540):
            version = 1 if size == 348 else 2
            stored = struct.unpack(endian + "f", raw[108:112])[0] if version == 1 else 0.0
            if not np.isfinite(stored) or stored < 0:
                raise ThinsliceError(f"cannot read {path}: its header's vox_offset ({stored}) is not a byte position; "
                                     "the header is damaged, export the volume again")
            offset = _vox_offset(raw)
            if offset > HEADER_BYTES_LIMIT:
                raise ThinsliceError(f"cannot read {path}: its header puts the voxels at byte {offset} (vox_offset), "
                                     "an implausibly large header; the header is damaged, export the volume again")
            if offset > len(raw):
                raise ThinsliceError(f"cannot read {path}: its header puts the voxels at byte {offset} (vox_offset), "
                                     f"beyond the end of the file ({len(raw)} bytes); the header is damaged or the "
                                     "file truncated")
            return version, endian
    size = struct.unpack("<i", raw[:4])[0]
    raise ThinsliceError(f"cannot read {path}: not a NIfTI header (sizeof_hdr = {size}; NIfTI-1 has 348, NIfTI-2 "
                         "540); the file is damaged or in another format")


def _check_extensions(path: Path, raw: bytes, version: int, endian: str) -> None:
    """Refuse header extensions whose sizes run past the voxel data (ITK would try to allocate them)."""
    start = 348 if version == 1 else 540
    offset = _vox_offset(raw)
    if len(raw) < start + 4 or raw[start] == 0:
        return
    position = start + 4
    while position + 8 <= offset:
        esize = struct.unpack(endian + "i", raw[position:position + 4])[0]
        if esize < 8 or position + esize > offset:
            raise ThinsliceError(f"cannot read {path}: its header extension at byte {position} claims {esize} bytes, "
                                 f"past the start of the voxels at byte {offset} (vox_offset); the header is "
                                 "damaged, export the volume again")
        position += esize


def _lps_geometry(path: Path, header, raw: bytes, endian: str) -> tuple[np.ndarray, np.ndarray]:
    """(3x3 matrix, origin) in LPS mm of nibabel's affine: the sform if set, else the qform (pixdim made positive,
    the slice direction from qfac = pixdim[0]), else pixdim alone; with a warning where the choice is not obvious."""
    try:
        affine = _best_affine(path, header, _raw_pixdim(raw, endian))
    except Exception as exc:  # nibabel's HeaderDataError / ValueError for quaternions or codes it cannot use
        raise ThinsliceError(f"cannot read {path}: its NIfTI orientation is damaged ({str(exc)[:160]}); export the "
                             "volume again") from None
    affine = affine * _UNIT_MM.get(header.get_xyzt_units()[0], 1.0)
    matrix, origin = _RAS_TO_LPS @ affine[:3, :3], _RAS_TO_LPS @ affine[:3, 3]
    norms = np.linalg.norm(matrix, axis=0)
    finite = bool(np.all(np.isfinite(matrix)) and np.all(np.isfinite(origin)) and np.all(norms > 0))
    # Zero, NaN or parallel axes are no grid; the voxel size is checked on its own (against CT voxel sizes).
    if not finite or abs(np.linalg.det(matrix / norms)) < 1e-6:
        raise ThinsliceError(f"cannot read {path}: its NIfTI orientation (sform/qform) is not a valid grid (zero, "
                             "infinite or NaN entries); fix the header or export the volume again")
    return matrix, origin


def _best_affine(path: Path, header, pixdim: np.ndarray) -> np.ndarray:
    """nibabel's choice of affine (sform, else qform, else pixdim), with a warning where the choice is not obvious."""
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if qcode > 0 and np.any(pixdim < 0):
        how = "using the sform" if scode > 0 else "read as its absolute value, the slice direction from qfac"
        log.warning("%s: the header has a negative voxel size (pixdim %s), which the NIfTI standard does not allow; "
                    "%s, as nibabel does", path, tuple(float(v) for v in pixdim), how)
    sform = header.get_sform()
    # A sheared sform never equals its qform (dcm2niix writes the nearest orthogonal one); the reader says it is
    # sheared instead.
    if qcode > 0 and scode > 0 and not _is_sheared(sform[:3, :3]) and not np.allclose(header.get_qform(), sform,
                                                                                          atol=1e-3):
        log.warning("%s: the header's qform and sform disagree (e.g. a negative voxel size); using the sform, as "
                    "nibabel does (fix the header to silence this)", path)
    if qcode <= 0 and scode <= 0:
        log.warning("%s: the header has no orientation (qform_code = sform_code = 0); the voxel size is used with "
                    "nibabel's default orientation", path)
    return np.asarray(header.get_best_affine(), dtype=np.float64)


def _is_sheared(matrix: np.ndarray) -> bool:
    """Whether the columns (voxel axes) of a 3x3 matrix are not perpendicular."""
    norms = np.linalg.norm(matrix, axis=0)
    if not np.all(np.isfinite(matrix)) or not np.all(norms > 0):
        return False
    unit = matrix / norms
    return float(np.abs(unit.T @ unit - np.eye(3)).max()) > 1e-4


def _raw_pixdim(raw: bytes, endian: str) -> np.ndarray:
    """pixdim[1..3] as stored (nibabel's check replaces negative values by their absolute value)."""
    if struct.unpack(endian + "i", raw[:4])[0] == 348:
        return np.array(struct.unpack(endian + "3f", raw[80:92]), dtype=np.float64)
    return np.array(struct.unpack(endian + "3d", raw[112:136]), dtype=np.float64)


def read_voxels(path: Path, expected_bytes: int) -> np.ndarray:
    """The voxels of a NIfTI file as nibabel reads them (slope and intercept applied where set), in (k, j, i)
    order; the stored values are checked before the scaling casts them.

    One pass over the file: a gzip stream is read to its end, so that its CRC is checked too (ITK and nibabel
    stop after the voxels and would take a damaged or cut stream for a complete one). ``expected_bytes``: the
    header's vox_offset + voxel bytes, for the message when the file is shorter.
    """
    gz = path.name.lower().endswith(".gz")
    present = path.stat().st_size
    if not gz and present < expected_bytes:
        raise ThinsliceError(f"cannot read {path}: the file is truncated ({present} of {expected_bytes} bytes that its "
                             "header promises); copy or export it again")
    try:
        with _quiet_nibabel(), (open_gzip if gz else open)(path, "rb") as fh:
            image = nib.Nifti1Image.from_stream(fh) if _is_nifti1(fh) else nib.Nifti2Image.from_stream(fh)
            proxy = cast("ArrayProxy", image.dataobj)  # an image read from a stream holds a proxy, not an array
            data = np.asanyarray(proxy.get_unscaled())
            while fh.read(1 << 22):  # to the end of a gzip stream, where its CRC is checked
                pass
    except GZIP_ERRORS as exc:
        raise ThinsliceError(f"cannot read {path}: the compressed file is truncated or corrupt ({exc}); copy or "
                             "export it again") from None
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:120]
        raise ThinsliceError(f"cannot read {path}: the file is truncated or corrupt (its header promises "
                             f"{expected_bytes} bytes; {reason}); copy or export it again") from None
    except nib.spatialimages.HeaderDataError as exc:  # e.g. a valid slope with a NaN intercept
        raise ThinsliceError(f"cannot read {path}: its NIfTI header is damaged ({str(exc)[:160]}); export the "
                             "volume again") from None
    if data.dtype.names or data.dtype.kind == "c":
        raise ThinsliceError(f"{path} has {data.dtype} voxels (colour or complex); thinslice needs a grey-value CT "
                             "volume in HU")
    data = np.ascontiguousarray(np.asarray(data).reshape(data.shape[:3]).transpose(2, 1, 0))
    slope, inter = proxy.slope, proxy.inter
    if (slope, inter) != (1.0, 0.0):
        check_voxel_values(data, path)  # before the scaling below casts to float32
        data = data.astype(np.float32) * np.float32(slope) + np.float32(inter)
    return data


def _is_nifti1(fh) -> bool:
    """Whether the open file holds a NIfTI-1 header (sizeof_hdr 348 in either byte order); rewinds it."""
    start = fh.read(4)
    fh.seek(0)
    return start in (struct.pack("<i", 348), struct.pack(">i", 348))
