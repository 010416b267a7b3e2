"""Small hostile input files (crafted NIfTI/NRRD/MHA headers, detached data paths, DICOM objects whose header and
pixel data disagree, memory bombs, bad geometry) and a judge of what a reader did with them.

A CT tool is handed files it did not write: exports from old scanners, files damaged in transfer, files made by
other tools with their own idea of the format, and now and then a file crafted to hurt. The rule for every one of
them is the same: a correct volume, or one :class:`~thinslice.errors.ThinsliceError` line that names the file;
never a traceback, a hang, a memory blow-up, or a plausible-looking wrong volume. The tests and the reliability
and fuzz runs build the files here, so nothing is downloaded, and judge each read in a child process
(:func:`probe`) so that a reader that hangs on a FIFO or allocates what a header claims cannot take the test
process down.

Headers are packed by hand (``struct``) rather than with nibabel, pynrrd or SimpleITK: those libraries refuse to
write most of these fields, which is the point. Everything is small (well under 1 MB per file) and the same for
the same seed, except the UIDs the DICOM series writer makes new on every build.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import numpy as np

from thinslice.data.odd import _new_object, _pixel_module, edit_headers, phantom, write_series
from thinslice.io.lazy import lazy_import

if TYPE_CHECKING:  # the real modules for the type checker; at run time they load on first use
    import pydicom
else:
    pydicom = lazy_import("pydicom")

REFUSE = "refuse"  # the reader must end in a ThinsliceError
EITHER = "either"  # a correct volume (see Hostile.shape) or a ThinsliceError


@dataclass(frozen=True)
class Hostile:
    """One hostile input: ``path`` (a file, or a folder for a DICOM series) and what a correct reader does."""

    path: Path
    description: str
    kind: str  # "nifti", "nrrd", "mha" or "dicom"
    expect: str = REFUSE
    shape: tuple[int, int, int] | None = None  # (i, j, k) a read must give, where one is acceptable
    # Bytes of memory the header claims the volume needs (0: small); a correct reader refuses a volume larger
    # than the memory it has before allocating it.
    claims: int = 0


# ------------------------------------------------------------------------------------------------------ NIfTI
NIFTI_DTYPES = {2: (8, "u1"), 4: (16, "i2"), 8: (32, "i4"), 16: (32, "f4"), 64: (64, "f8"), 256: (8, "i1"),
                512: (16, "u2"), 768: (32, "u4"), 1024: (64, "i8"), 1280: (64, "u8")}


@dataclass
class NiftiHeader:
    """The fields of a NIfTI-1 or NIfTI-2 header that readers act on; anything may be set to a hostile value."""

    version: int = 1
    dims: tuple[int, ...] = (3, 8, 8, 6, 1, 1, 1, 1)
    datatype: int = 4
    bitpix: int = 16
    pixdim: tuple[float, ...] = (1.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0)
    vox_offset: float = 352.0
    scl_slope: float = 1.0
    scl_inter: float = 0.0
    qform_code: int = 1
    sform_code: int = 1
    quatern: tuple[float, ...] = (0.0, 0.0, 0.0, -4.0, -4.0, 0.0)  # b, c, d, qoffset x, y, z
    srow: tuple[float, ...] = (1.0, 0.0, 0.0, -4.0, 0.0, 1.0, 0.0, -4.0, 0.0, 0.0, 3.0, 0.0)
    extension: bytes = b""  # raw bytes after the 4-byte extension flag (flag set when non-empty)
    endian: Literal["<", ">"] = "<"

    def pack(self) -> bytes:
        """The header, the extension flag and the extension bytes (pad to vox_offset with :func:`nifti_file`)."""
        e = self.endian
        if self.version == 1:
            head = bytearray(348)
            struct.pack_into(e + "i", head, 0, 348)
            struct.pack_into(e + "8h", head, 40, *(_clip(v, 2**15) for v in self.dims))
            struct.pack_into(e + "hh", head, 70, _clip(self.datatype, 2**15), _clip(self.bitpix, 2**15))
            struct.pack_into(e + "8f", head, 76, *(_f32(v) for v in self.pixdim))
            struct.pack_into(e + "3f", head, 108, _f32(self.vox_offset), _f32(self.scl_slope), _f32(self.scl_inter))
            struct.pack_into(e + "B", head, 123, 2)  # xyzt_units: mm
            struct.pack_into(e + "hh", head, 252, _clip(self.qform_code, 2**15), _clip(self.sform_code, 2**15))
            struct.pack_into(e + "6f", head, 256, *(_f32(v) for v in self.quatern))
            struct.pack_into(e + "12f", head, 280, *(_f32(v) for v in self.srow))
            head[344:348] = b"n+1\0"
        else:
            head = bytearray(540)
            struct.pack_into(e + "i", head, 0, 540)
            head[4:12] = b"n+2\0\r\n\x1a\n"
            struct.pack_into(e + "hh", head, 12, _clip(self.datatype, 2**15), _clip(self.bitpix, 2**15))
            struct.pack_into(e + "8q", head, 16, *(_clip(v, 2**63) for v in self.dims))
            struct.pack_into(e + "8d", head, 104, *self.pixdim)
            struct.pack_into(e + "q", head, 168, _clip(_int_or(self.vox_offset, 0), 2**63))
            struct.pack_into(e + "2d", head, 176, self.scl_slope, self.scl_inter)
            struct.pack_into(e + "ii", head, 344, _clip(self.qform_code, 2**31), _clip(self.sform_code, 2**31))
            struct.pack_into(e + "6d", head, 352, *self.quatern)
            struct.pack_into(e + "12d", head, 400, *self.srow)
            struct.pack_into(e + "i", head, 500, 2)  # xyzt_units: mm
        flag = b"\x01\0\0\0" if self.extension else b"\0\0\0\0"
        return bytes(head) + flag + self.extension

    @property
    def data_start(self) -> int:
        """Where the voxels start in the file, as a reader that trusts vox_offset sees it (at least the header)."""
        return max(_int_or(self.vox_offset, 0), 352 if self.version == 1 else 544)

    def voxels(self) -> int:
        ndim = self.dims[0]
        if not 1 <= ndim <= 7:
            return 0
        return int(np.prod([max(1, int(d)) for d in self.dims[1:ndim + 1]], dtype=object))

    def claimed_bytes(self) -> int:
        return self.voxels() * max(0, self.bitpix) // 8


def _f32(value: float) -> float:
    """``value`` as float32 can hold it (inf beyond its range), so that struct never refuses a hostile value."""
    return float(np.float32(value)) if math.isfinite(value) and abs(value) < 3.4e38 else value


def _clip(value: int, limit: int) -> int:
    return int(max(-limit, min(limit - 1, int(value))))


def _int_or(value: float, default: int) -> int:
    return int(value) if math.isfinite(value) and abs(value) < 2**62 else default


def nifti_file(path: Path, header: NiftiHeader, data: bytes | None = None, gz: bool | None = None) -> Path:
    """Write ``header`` then ``data`` (default: the voxels the header promises, a small ramp of HU) at its
    vox_offset; gzip-compressed when the name ends with .gz (or ``gz``)."""
    if data is None:
        data = default_voxels(header)
    body = header.pack()
    start = header.data_start
    raw = body + b"\0" * max(0, start - len(body)) + data if start < (1 << 20) else body + data
    gz = path.name.endswith(".gz") if gz is None else gz
    path.write_bytes(gzip.compress(raw, compresslevel=6, mtime=0) if gz else raw)
    return path


def default_voxels(header: NiftiHeader, seed: int = 0) -> bytes:
    """Voxels of the datatype the header names, as many as it promises (capped at 256 KB): a CT-like ramp."""
    bits, code = NIFTI_DTYPES.get(header.datatype, (16, "i2"))
    count = min(header.voxels(), (1 << 18) // max(1, bits // 8))
    rng = np.random.default_rng(seed)
    values = np.linspace(-1000.0, 1000.0, max(count, 1))[:count] + rng.normal(0.0, 5.0, count)
    if code[0] == "u":
        values = values + 1024.0
    dtype = np.dtype(code).newbyteorder(header.endian)
    info = np.iinfo(dtype) if dtype.kind in "iu" else None
    if info is not None:
        values = np.clip(np.round(values), info.min, info.max)
    return values.astype(dtype).tobytes()


def nifti_files(folder: Path, seed: int = 0) -> list[Hostile]:
    """NIfTI-1 and NIfTI-2 files with edge and hostile header fields."""
    folder.mkdir(parents=True, exist_ok=True)
    base = NiftiHeader()
    out: list[Hostile] = []

    def add(name: str, header: NiftiHeader, description: str, expect: str = REFUSE, data: bytes | None = None,
            shape: tuple[int, int, int] | None = None, claims: int = 0) -> None:
        out.append(Hostile(nifti_file(folder / name, header, data), description, "nifti", expect, shape, claims))

    good = (8, 8, 6)
    add("control.nii", base, "a valid small NIfTI-1 (control)", EITHER, shape=good)
    add("control2.nii.gz", replace(base, version=2, vox_offset=544), "a valid small NIfTI-2 (control)", EITHER,
        shape=good)
    add("bigendian.nii", replace(base, endian=">"), "a valid big-endian NIfTI-1", EITHER, shape=good)
    add("dims_negative.nii", replace(base, dims=(3, -8, 8, 6, 1, 1, 1, 1)), "dim[1] = -8")
    add("dims_zero.nii", replace(base, dims=(3, 8, 0, 6, 1, 1, 1, 1)), "dim[2] = 0")
    add("ndim_9.nii", replace(base, dims=(9, 8, 8, 6, 1, 1, 1, 1)), "dim[0] = 9 (more than 7 dimensions)")
    add("ndim_0.nii", replace(base, dims=(0, 8, 8, 6, 1, 1, 1, 1)), "dim[0] = 0")
    big = (3, 32767, 32767, 32767, 1, 1, 1, 1)
    small = default_voxels(base)
    add("dims_huge.nii", replace(base, dims=big), "dims 32767^3 (70 TB) with 768 bytes of data", data=small,
        claims=replace(base, dims=big).claimed_bytes())
    big2 = (3, 2**31, 2**31, 2**20, 1, 1, 1, 1)
    add("dims_huge2.nii", replace(base, version=2, vox_offset=544, dims=big2), "NIfTI-2 dims 2^31 x 2^31 x 2^20",
        data=small, claims=replace(base, version=2, dims=big2).claimed_bytes())
    add("dims_4d.nii", replace(base, dims=(4, 8, 8, 6, 3, 1, 1, 1)), "a 4D file (3 time points)",
        data=default_voxels(replace(base, dims=(4, 8, 8, 6, 3, 1, 1, 1))))
    add("bitpix_mismatch.nii", replace(base, bitpix=8), "datatype int16 with bitpix 8", EITHER,
        data=default_voxels(base), shape=good)
    add("bitpix_wide.nii", replace(base, bitpix=64), "datatype int16 with bitpix 64 (data is int16)", EITHER,
        shape=good)
    add("datatype_unknown.nii", replace(base, datatype=77), "datatype 77 (no such code)")
    add("datatype_rgb.nii", replace(base, datatype=128, bitpix=24), "RGB24 voxels", data=b"\x10" * 8 * 8 * 6 * 3)
    add("datatype_complex.nii", replace(base, datatype=32, bitpix=64), "complex64 voxels",
        data=b"\0" * 8 * 8 * 6 * 8)
    for label, values in (("zero", (1.0, 0.0, 1.0, 3.0)), ("negative", (1.0, -1.0, 1.0, 3.0)),
                          ("nan", (1.0, math.nan, 1.0, 3.0)), ("tiny", (1.0, 1e-9, 1.0, 3.0)),
                          ("hugeval", (1.0, 1e9, 1.0, 3.0)), ("inf", (1.0, 1.0, math.inf, 3.0))):
        pixdim = (*values, 1.0, 1.0, 1.0, 1.0)
        for codes, suffix in (((1, 1), ""), ((0, 0), "_nocodes")):
            add(f"pixdim_{label}{suffix}.nii", replace(base, pixdim=pixdim, qform_code=codes[0], sform_code=codes[1]),
                f"pixdim {values[1:]} (qform/sform codes {codes})", EITHER, shape=good)
    add("vox_offset_huge.nii", replace(base, vox_offset=3e9), "vox_offset 3e9 in a 1 KB file")
    add("vox_offset_inside.nii", replace(base, vox_offset=100.0), "vox_offset 100 (inside the header)", EITHER,
        shape=good)
    add("vox_offset_nan.nii", replace(base, vox_offset=math.nan), "vox_offset NaN", EITHER, shape=good)
    add("vox_offset_negative.nii", replace(base, vox_offset=-4096.0), "vox_offset -4096", EITHER, shape=good)
    nan6 = (math.nan,) * 6
    add("quatern_nan.nii", replace(base, sform_code=0, quatern=nan6), "qform quaternion and offsets NaN (sform off)")
    add("quatern_big.nii", replace(base, sform_code=0, quatern=(5.0, 5.0, 5.0, 0.0, 0.0, 0.0)),
        "quaternion b,c,d = 5 (not a unit quaternion; sform off)", EITHER, shape=good)
    add("srow_nan.nii", replace(base, qform_code=0, srow=(math.nan,) * 12), "sform rows NaN (qform off)")
    add("srow_zero.nii", replace(base, qform_code=0, srow=(0.0,) * 12), "sform all zero (qform off)", EITHER,
        shape=good)
    add("srow_singular.nii", replace(base, qform_code=0, srow=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0, 0, 0, 0)),
        "sform with two equal columns (singular, qform off)", EITHER, shape=good)
    add("codes_odd.nii", replace(base, qform_code=-7, sform_code=999), "qform_code -7, sform_code 999", EITHER,
        shape=good)
    add("scl_nan.nii", replace(base, scl_slope=math.nan, scl_inter=math.nan), "scl_slope/scl_inter NaN", EITHER,
        shape=good)
    add("scl_inf.nii", replace(base, scl_slope=1e38, scl_inter=0.0), "scl_slope 1e38 (voxels overflow float32)")
    ext_huge = struct.pack("<ii", 0x7FFFFFF0, 4) + b"\0" * 8
    add("extension_huge.nii", replace(base, extension=ext_huge), "an extension claiming 2 GB", EITHER, shape=good)
    ext_bad = struct.pack("<ii", 7, 4) + b"\0" * 8
    add("extension_unaligned.nii", replace(base, extension=ext_bad), "an extension of size 7 (not a multiple of 16)",
        EITHER, shape=good)
    add("truncated.nii", base, "voxel data cut to half", data=default_voxels(base)[:384])
    add("truncated.nii.gz", base, "gzip of a NIfTI whose voxel data is cut to half", data=default_voxels(base)[:384])
    add("empty.nii", base, "a NIfTI file of 0 bytes")
    (folder / "empty.nii").write_bytes(b"")
    add("header_only.nii", base, "only the first 200 bytes of the header")
    (folder / "header_only.nii").write_bytes(base.pack()[:200])
    add("not_gzip.nii.gz", base, "named .nii.gz but not gzip data")
    (folder / "not_gzip.nii.gz").write_bytes(b"this is not gzip at all" * 20)
    raw = (folder / "control.nii").read_bytes()
    gz = bytearray(gzip.compress(raw, mtime=0))
    gz[len(gz) // 2] ^= 0xFF
    add("gzip_corrupt.nii.gz", base, "gzip with a flipped byte in its stream")
    (folder / "gzip_corrupt.nii.gz").write_bytes(bytes(gz))
    add("gzip_cut.nii.gz", base, "gzip stream cut short")
    (folder / "gzip_cut.nii.gz").write_bytes(gzip.compress(raw, mtime=0)[:-40])
    out.append(gzip_bomb(folder / "bomb.nii.gz"))
    out.append(gzip_bomb(folder / "bomb_lying.nii.gz", lying=True))
    out.append(_fifo(folder / "fifo.nii", "nifti"))
    rng = np.random.default_rng(seed)
    for index in range(6):  # random header fields, each file the valid control with a few of them changed
        header = random_nifti_header(rng)
        out.append(Hostile(nifti_file(folder / f"random{index}.nii", header), f"random header fields {header!r}"[:300],
                           "nifti", EITHER, None, header.claimed_bytes()))
    return out


def random_nifti_header(rng: np.random.Generator) -> NiftiHeader:
    """The control header with two to four fields set to edge values (for seeded corpora; the tests use
    hypothesis instead)."""
    choices: list[Callable[[NiftiHeader], NiftiHeader]] = [
        lambda h: replace(h, dims=(3, int(rng.integers(-2, 40)), *h.dims[2:])),
        lambda h: replace(h, datatype=int(rng.choice(list(NIFTI_DTYPES) + [0, 3, 77]))),
        lambda h: replace(h, bitpix=int(rng.choice([0, 8, 16, 32, 64, 12, -16]))),
        lambda h: replace(h, pixdim=(1.0, float(rng.choice([0.0, -1.0, math.nan, 1e-9, 1e9, 0.5])), 1.0, 3.0,
                                     1.0, 1.0, 1.0, 1.0)),
        lambda h: replace(h, vox_offset=float(rng.choice([0.0, 100.0, 352.0, 353.0, 4096.0, 1e12]))),
        lambda h: replace(h, qform_code=int(rng.integers(-1, 5)), sform_code=int(rng.integers(-1, 5))),
        lambda h: replace(h, quatern=tuple(float(v) for v in rng.normal(0, 2, 6))),
        lambda h: replace(h, srow=tuple(float(v) for v in rng.normal(0, 2, 12))),
        lambda h: replace(h, scl_slope=float(rng.choice([0.0, math.nan, -1.0, 1e-30])),
                          scl_inter=float(rng.choice([0.0, math.inf, -1024.0]))),
    ]
    header = NiftiHeader()
    for index in rng.choice(len(choices), size=int(rng.integers(2, 5)), replace=False):
        header = choices[int(index)](header)
    return header


def gzip_bomb(path: Path, inflated_mb: int = 256, lying: bool = False) -> Hostile:
    """A .nii.gz of about ``inflated_mb`` / 1000 MB that inflates to ``inflated_mb`` MB of zeros. Its header claims
    that many int16 voxels (``lying``: claims a valid 8x8x6 volume and trails the zeros after it)."""
    side = int(round((inflated_mb * 2**20 / 2) ** (1 / 3)))
    header = NiftiHeader(dims=(3, 8, 8, 6, 1, 1, 1, 1) if lying else (3, side, side, side, 1, 1, 1, 1))
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip container
    chunks = [compressor.compress(header.pack() + (default_voxels(header) if lying else b""))]
    zeros = b"\0" * (1 << 20)
    for _ in range(inflated_mb):
        chunks.append(compressor.compress(zeros))
    chunks.append(compressor.flush())
    path.write_bytes(b"".join(chunks))
    if lying:
        return Hostile(path, f"gzip bomb: a valid 8x8x6 NIfTI followed by {inflated_mb} MB of zeros", "nifti",
                       EITHER, (8, 8, 6))
    return Hostile(path, f"gzip bomb: {path.stat().st_size // 1024} KB inflating to {inflated_mb} MB "
                         f"({side}^3 int16 voxels)", "nifti", REFUSE, None, header.claimed_bytes())


def _fifo(path: Path, kind: str) -> Hostile:
    """A named pipe under a volume's name: opening it for reading blocks until someone writes."""
    if path.exists():
        path.unlink()
    os.mkfifo(path)
    return Hostile(path, "a FIFO (named pipe) named like a volume file", kind)


# ---------------------------------------------------------------------------------------------- NRRD and MHA
@dataclass
class NrrdHeader:
    """An NRRD header; ``fields`` are written in order after the magic line, values as given (hostile or not)."""

    fields: dict[str, str] = field(default_factory=lambda: {
        "type": "short", "dimension": "3", "space": "left-posterior-superior", "sizes": "8 8 6",
        "space directions": "(1,0,0) (0,1,0) (0,0,3)", "space origin": "(0,0,0)", "endian": "little",
        "encoding": "raw"})
    extra_lines: tuple[str, ...] = ()  # lines after the fields (e.g. the file names of a ``data file: LIST``)

    def text(self) -> bytes:
        lines = ["NRRD0004", *(f"{k}: {v}" for k, v in self.fields.items()), *self.extra_lines]
        return ("\n".join(lines) + "\n\n").encode()


def nrrd_voxels(count: int = 8 * 8 * 6, dtype: str = "<i2", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return np.clip(np.linspace(-1000, 1000, count) + rng.normal(0, 5, count), -1024, 3000).astype(dtype).tobytes()


def nrrd_file(path: Path, header: NrrdHeader, data: bytes | None = None) -> Path:
    """An attached .nrrd (header then ``data``) or, for a .nhdr, the header alone."""
    body = header.text()
    if path.suffix == ".nrrd":
        body += nrrd_voxels() if data is None else data
    path.write_bytes(body)
    return path


def nrrd_files(folder: Path, seed: int = 0) -> list[Hostile]:
    """NRRD/NHDR files: huge sizes, detached data outside the folder, devices, FIFOs, LIST forms, bad encodings,
    NaN or degenerate geometry."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Hostile] = []
    good = (8, 8, 6)

    def add(name: str, changes: dict[str, str | None], description: str, expect: str = REFUSE,
            data: bytes | None = None, extra: tuple[str, ...] = (), shape: tuple[int, int, int] | None = None,
            claims: int = 0) -> None:
        """``changes``: fields to set, or to remove where the value is None."""
        header = NrrdHeader()
        header.fields.update({k: v for k, v in changes.items() if v is not None})
        for key in [k for k, v in changes.items() if v is None]:
            header.fields.pop(key, None)
        header.extra_lines = extra
        out.append(Hostile(nrrd_file(folder / name, header, data), description, "nrrd", expect, shape, claims))

    add("control.nrrd", {}, "a valid attached NRRD (control)", EITHER, shape=good)
    (folder / "control.raw").write_bytes(nrrd_voxels())
    add("control.nhdr", {"data file": "control.raw"}, "a valid detached NHDR (control)", EITHER, shape=good)
    add("sizes_huge.nrrd", {"sizes": "100000 100000 100000"}, "sizes 1e5^3 with 768 bytes of data",
        claims=2 * 10**15)
    add("sizes_huge_gz.nrrd", {"sizes": "4000 4000 4000", "encoding": "gzip"}, "gzip NRRD claiming 4000^3",
        data=gzip.compress(nrrd_voxels(), mtime=0), claims=2 * 64 * 10**9)
    add("sizes_negative.nrrd", {"sizes": "8 -8 6"}, "a negative size")
    add("sizes_zero.nrrd", {"sizes": "8 0 6"}, "a size of 0")
    add("sizes_text.nrrd", {"sizes": "8 eight 6"}, "a size that is not a number")
    add("truncated.nrrd", {}, "raw data cut to half", data=nrrd_voxels()[:384])
    add("detached_parent.nhdr", {"data file": "../x_does_not_exist.raw"}, "detached data at ../x (missing)")
    add("detached_missing.nhdr", {"data file": "nowhere.raw"}, "detached data file missing")
    add("detached_etc.nhdr", {"data file": "/etc/hostname", "sizes": "2 2 2", "type": "uchar"},
        "detached data at an absolute system path (/etc/hostname)")
    add("detached_devzero.nhdr", {"data file": "/dev/zero"}, "detached data at /dev/zero")
    add("detached_devzero_huge.nhdr", {"data file": "/dev/zero", "sizes": "4000 4000 4000"},
        "detached data at /dev/zero with sizes 4000^3", claims=2 * 64 * 10**9)
    fifo = folder / "pipe.raw"
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    add("detached_fifo.nhdr", {"data file": "pipe.raw"}, "detached data in a FIFO (named pipe)")
    add("detached_self.nhdr", {"data file": "detached_self.nhdr"}, "detached data file is the header itself")
    add("detached_dir.nhdr", {"data file": "."}, "detached data file is a folder")
    for k in range(3):
        (folder / f"slice{k:03d}.raw").write_bytes(nrrd_voxels(64 * 2, seed=k))
    add("list_ok.nhdr", {"data file": "LIST", "sizes": "8 8 6"}, "data file: LIST of 6 slice files (3 of them)",
        extra=tuple(f"slice{k:03d}.raw" for k in range(3)))
    add("list_parent.nhdr", {"data file": "LIST", "sizes": "8 8 2"}, "data file: LIST naming ../ and /dev/zero",
        extra=("../slice000.raw", "/dev/zero"))
    add("format_form.nhdr", {"data file": "slice%03d.raw 0 5 1"}, "data file format form for 6 slices (3 exist)")
    add("encoding_unknown.nrrd", {"encoding": "rot13"}, "encoding rot13")
    # zlib reads bytes without a gzip header as they are, so the right voxels are an acceptable answer
    add("encoding_gzip_not_gzip.nrrd", {"encoding": "gzip"}, "encoding gzip over raw bytes", EITHER, shape=good)
    add("encoding_text_garbage.nrrd", {"encoding": "ascii"}, "encoding ascii over binary bytes", EITHER,
        shape=good)
    add("endian_big.nrrd", {"endian": "big"}, "a valid big-endian NRRD", EITHER, data=nrrd_voxels(dtype=">i2"),
        shape=good)
    add("endian_odd.nrrd", {"endian": "middle"}, "endian: middle")
    add("type_unknown.nrrd", {"type": "quaternion"}, "type quaternion")
    add("type_block.nrrd", {"type": "block", "block size": "3"}, "type block (opaque records)")
    add("dimension_mismatch.nrrd", {"dimension": "5"}, "dimension 5 with 3 sizes")
    for label, value in (("nan", "(nan,0,0) (0,1,0) (0,0,3)"), ("zero", "(0,0,0) (0,1,0) (0,0,3)"),
                         ("parallel", "(1,0,0) (1,0,0) (0,0,3)"), ("none", "none (0,1,0) (0,0,3)"),
                         ("tiny", "(1e-12,0,0) (0,1e-12,0) (0,0,1e-12)"), ("text", "(a,b,c) (0,1,0) (0,0,3)")):
        add(f"directions_{label}.nrrd", {"space directions": value}, f"space directions {value}", EITHER,
            shape=good)
    add("origin_nan.nrrd", {"space origin": "(nan,nan,nan)"}, "space origin NaN", EITHER, shape=good)
    add("spacings_nan.nrrd", {"space directions": None, "space": None, "space origin": None,
                              "spacings": "nan 1 -3"}, "spacings nan 1 -3 (no space)", EITHER, shape=good)
    add("line_huge.nrrd", {"content": "x" * 200_000}, "a 200 KB header line", EITHER, shape=good)
    out.append(_fifo(folder / "fifo.nrrd", "nrrd"))
    rng = np.random.default_rng(seed)
    for index in range(4):
        sizes = " ".join(str(int(v)) for v in rng.integers(-1, 20, 3))
        add(f"random{index}.nrrd", {"sizes": sizes, "type": str(rng.choice(["short", "float", "uchar", "double"]))},
            f"random sizes {sizes}", EITHER)
    return out


def mha_text(fields: dict[str, str]) -> bytes:
    return "".join(f"{k} = {v}\n" for k, v in fields.items()).encode()


MHA_BASE = {"ObjectType": "Image", "NDims": "3", "DimSize": "8 8 6", "ElementType": "MET_SHORT",
            "ElementSpacing": "1 1 3", "Offset": "0 0 0", "TransformMatrix": "1 0 0 0 1 0 0 0 1",
            "BinaryData": "True", "BinaryDataByteOrderMSB": "False", "CompressedData": "False",
            "ElementDataFile": "LOCAL"}


def mha_files(folder: Path, seed: int = 0) -> list[Hostile]:
    """MetaImage (.mha/.mhd) headers with the same kinds of damage as :func:`nrrd_files`."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Hostile] = []
    good = (8, 8, 6)

    def add(name: str, changes: dict[str, str], description: str, expect: str = REFUSE, data: bytes | None = None,
            shape: tuple[int, int, int] | None = None, claims: int = 0) -> None:
        fields = {k: v for k, v in {**MHA_BASE, **changes}.items() if v is not None}
        data_file = fields.pop("ElementDataFile")
        body = mha_text(fields) + f"ElementDataFile = {data_file}\n".encode()
        if name.endswith(".mha") and data_file == "LOCAL":
            body += nrrd_voxels() if data is None else data
        (folder / name).write_bytes(body)
        out.append(Hostile(folder / name, description, "mha", expect, shape, claims))

    add("control.mha", {}, "a valid MetaImage (control)", EITHER, shape=good)
    (folder / "control.raw").write_bytes(nrrd_voxels())
    add("control.mhd", {"ElementDataFile": "control.raw"}, "a valid detached .mhd (control)", EITHER, shape=good)
    add("dims_huge.mha", {"DimSize": "100000 100000 100000"}, "DimSize 1e5^3 with 768 bytes", claims=2 * 10**15)
    add("dims_huge_compressed.mha", {"DimSize": "4000 4000 4000", "CompressedData": "True"},
        "compressed MetaImage claiming 4000^3", data=zlib.compress(nrrd_voxels()), claims=2 * 64 * 10**9)
    add("dims_negative.mha", {"DimSize": "8 -8 6"}, "a negative DimSize")
    add("dims_zero.mha", {"DimSize": "8 0 6"}, "a DimSize of 0")
    add("ndims_9.mha", {"NDims": "9"}, "NDims 9 with 3 sizes")
    add("truncated.mha", {}, "raw data cut to half", data=nrrd_voxels()[:384])
    add("compressed_not.mha", {"CompressedData": "True"}, "CompressedData True over raw bytes")
    add("detached_parent.mhd", {"ElementDataFile": "../x_does_not_exist.raw"}, "detached data at ../x (missing)")
    add("detached_etc.mhd", {"ElementDataFile": "/etc/hostname", "DimSize": "2 2 2", "ElementType": "MET_UCHAR"},
        "detached data at an absolute system path (/etc/hostname)")
    add("detached_devzero.mhd", {"ElementDataFile": "/dev/zero"}, "detached data at /dev/zero")
    add("detached_devzero_huge.mhd", {"ElementDataFile": "/dev/zero", "DimSize": "4000 4000 4000"},
        "detached data at /dev/zero with DimSize 4000^3", claims=2 * 64 * 10**9)
    fifo = folder / "pipe.raw"
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    add("detached_fifo.mhd", {"ElementDataFile": "pipe.raw"}, "detached data in a FIFO (named pipe)")
    for k in range(3):
        (folder / f"slice{k:03d}.raw").write_bytes(nrrd_voxels(64 * 2, seed=k))
    add("list_short.mhd", {"ElementDataFile": "LIST\nslice000.raw\nslice001.raw\nslice002.raw"},
        "ElementDataFile LIST naming 3 files of 2 slices each for 6 slices", EITHER, shape=good)
    add("list_parent.mhd", {"ElementDataFile": "LIST\n../slice000.raw\n/dev/zero\nslice002.raw"},
        "ElementDataFile LIST naming ../ and /dev/zero")
    add("pattern_missing.mhd", {"ElementDataFile": "slice%03d.raw 0 5 1"}, "a file-name pattern for 6 slices "
        "(3 exist)")
    add("type_unknown.mha", {"ElementType": "MET_QUATERNION"}, "ElementType MET_QUATERNION")
    add("type_vector.mha", {"ElementNumberOfChannels": "3"}, "3 channels per voxel",
        data=nrrd_voxels(8 * 8 * 6 * 3))
    add("msb_text.mha", {"BinaryDataByteOrderMSB": "Maybe"}, "BinaryDataByteOrderMSB Maybe", EITHER, shape=good)
    add("big_endian.mha", {"BinaryDataByteOrderMSB": "True"}, "a valid big-endian MetaImage", EITHER,
        data=nrrd_voxels(dtype=">i2"), shape=good)
    add("headersize_huge.mhd", {"ElementDataFile": "control.raw", "HeaderSize": "4000000000"},
        "HeaderSize 4e9 in a 768-byte data file", EITHER, shape=good)
    add("headersize_auto.mhd", {"ElementDataFile": "control.raw", "HeaderSize": "-1"},
        "HeaderSize -1 (data at the end of the file)", EITHER, shape=good)
    for label, changes in (("spacing_nan", {"ElementSpacing": "nan 1 3"}),
                           ("spacing_zero", {"ElementSpacing": "0 1 3"}),
                           ("spacing_negative", {"ElementSpacing": "-1 1 3"}),
                           ("spacing_tiny", {"ElementSpacing": "1e-12 1 3"}),
                           ("matrix_nan", {"TransformMatrix": "nan 0 0 0 1 0 0 0 1"}),
                           ("matrix_zero", {"TransformMatrix": "0 0 0 0 0 0 0 0 0"}),
                           ("matrix_singular", {"TransformMatrix": "1 0 0 1 0 0 0 0 1"}),
                           ("matrix_short", {"TransformMatrix": "1 0"}),
                           ("offset_nan", {"Offset": "nan nan nan"})):
        add(f"{label}.mha", changes, f"{label.replace('_', ' ')}: {changes}", EITHER, shape=good)
    out.append(_fifo(folder / "fifo.mha", "mha"))
    return out


# ---------------------------------------------------------------------------------------------------- DICOM
def dicom_series(folder: Path, n: int = 4, size: int = 16) -> list[Path]:
    """A small valid CT series (the chest phantom) to damage."""
    return write_series(phantom(n=n, size=size), folder)


def _allow_invalid_values() -> None:
    """Let pydicom write values its validation would refuse (NaN in a DS, a 0 pixel spacing)."""
    from pydicom import config

    config.settings.writing_validation_mode = config.IGNORE
    config.settings.reading_validation_mode = config.IGNORE


def dicom_files(folder: Path, seed: int = 0) -> list[Hostile]:
    """DICOM series and files whose header and pixel data disagree, with bad or missing geometry, duplicate
    instances, no file meta, huge element lengths, and non-volume objects (SEG, RTSTRUCT)."""
    _allow_invalid_values()
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Hostile] = []
    n, size = 4, 16

    def series(name: str, change: Callable | None, description: str, expect: str = REFUSE,
               shape: tuple[int, int, int] | None = None, claims: int = 0, only: int | None = None) -> list[Path]:
        paths = dicom_series(folder / name, n, size)
        if change is not None:
            targets = paths if only is None else paths[only:only + 1]
            edit_headers(targets, change)
        out.append(Hostile(folder / name, description, "dicom", expect, shape, claims))
        return paths

    good = (size, size, n)
    series("control", None, "a valid 4-slice CT series (control)", EITHER, shape=good)

    def setter(**values):
        def change(ds, index):
            for key, value in values.items():
                setattr(ds, key, value)
        return change

    series("rows_larger", setter(Rows=64), "Rows 64 with 16 rows of pixel data")
    series("rows_larger_one", setter(Columns=32), "one file with Columns 32 (16 in the data)", only=2)
    series("rows_huge", setter(Rows=60000, Columns=60000), "Rows = Columns = 60000 with 512 bytes of pixels",
           claims=60000 * 60000 * 4 * 2)
    series("bits_32", setter(BitsAllocated=32, BitsStored=32, HighBit=31), "BitsAllocated 32 over 16-bit data")
    series("bits_8", setter(BitsAllocated=8, BitsStored=8, HighBit=7), "BitsAllocated 8 over 16-bit data")
    series("bits_12", setter(BitsAllocated=12, BitsStored=12, HighBit=11), "BitsAllocated 12", EITHER, shape=good)
    series("frames_many", setter(NumberOfFrames=100000), "NumberOfFrames 100000 with one frame of data",
           claims=100000 * size * size * 4 * n)
    series("frames_zero", setter(NumberOfFrames=0), "NumberOfFrames 0", EITHER, shape=good)

    def cut_pixels(ds, index):
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]

    series("pixels_short", cut_pixels, "PixelData half as long as Rows x Columns")
    series("pixels_short_one", cut_pixels, "one file's PixelData half as long", only=1)

    def odd_pixels(ds, index):
        ds.PixelData = ds.PixelData + b"\0\0"

    series("pixels_long", odd_pixels, "PixelData 2 bytes longer than Rows x Columns", EITHER, shape=good)
    for label, value in (("zero", ["0", "0"]), ("nan", ["NaN", "NaN"]), ("negative", ["-1", "1"])):
        series(f"spacing_{label}", setter(PixelSpacing=value), f"PixelSpacing {value} (no voxel size)")
    series("spacing_one", setter(PixelSpacing=["1"]), "PixelSpacing of one value", EITHER, shape=good)
    for path in series("spacing_text", setter(PixelSpacing=["1.234567", "1"]), "PixelSpacing 'abc.xyz!\\1'",
                       EITHER, shape=good):
        path.write_bytes(path.read_bytes().replace(b"1.234567", b"abc.xyz!"))  # pydicom refuses to write it

    def drop(*keywords, only_first: bool = False):
        def change(ds, index):
            for keyword in keywords:
                if keyword in ds and (index == 0 or not only_first):
                    delattr(ds, keyword)
        return change

    series("ipp_missing", drop("ImagePositionPatient"), "no ImagePositionPatient in any file")
    series("ipp_missing_one", drop("ImagePositionPatient", only_first=True), "no ImagePositionPatient in one file",
           EITHER, shape=good)
    series("iop_missing", drop("ImageOrientationPatient"), "no ImageOrientationPatient")
    series("ipp_nan", setter(ImagePositionPatient=["NaN", "NaN", "NaN"]), "ImagePositionPatient NaN")
    series("ipp_nan_one", setter(ImagePositionPatient=["0", "NaN", "1e400"]), "one file's position NaN/overflow",
           only=1)
    series("iop_nan", setter(ImageOrientationPatient=["NaN"] * 6), "ImageOrientationPatient NaN")
    series("iop_zero", setter(ImageOrientationPatient=["0"] * 6), "ImageOrientationPatient all zero")
    series("iop_parallel", setter(ImageOrientationPatient=["1", "0", "0", "1", "0", "0"]),
           "row and column directions equal")
    series("iop_short", setter(ImageOrientationPatient=["1", "0", "0"]), "ImageOrientationPatient of 3 values")
    series("ipp_same", setter(ImagePositionPatient=["0", "0", "0"]), "all slices at the same position")

    def same_sop(ds, index):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"

    series("sop_duplicate", same_sop, "all files share one SOPInstanceUID", EITHER, shape=good)
    # GDCM reads these as slope 1, which is what the phantom was written with: a right answer, or a refusal
    series("slope_nan", setter(RescaleSlope="NaN"), "RescaleSlope NaN", EITHER, shape=good)
    series("slope_zero", setter(RescaleSlope="0"), "RescaleSlope 0", EITHER, shape=good)
    series("modality_mr", setter(Modality="MR"), "a non-CT modality (MR) series", EITHER, shape=good)
    for path in series("transfer_lie", None, "transfer syntax RLE Lossless over raw pixel data", EITHER, shape=good):
        # patched in the bytes: pydicom refuses to write raw pixels under a compressed transfer syntax
        path.write_bytes(path.read_bytes().replace(b"1.2.840.10008.1.2.1\0", b"1.2.840.10008.1.2.5\0", 1))
    out.extend(_dicom_objects(folder))
    return out


def _dicom_objects(folder: Path) -> list[Hostile]:
    """Single DICOM files: no file meta, a huge element length, a segmentation, a structure set."""
    out: list[Hostile] = []
    target = folder / "no_meta"
    paths = dicom_series(target)
    for path in paths:  # the bare dataset: no preamble, no 'DICM', no file meta group
        ds = pydicom.dcmread(str(path))
        del ds.file_meta
        ds.save_as(str(path), enforce_file_format=False, implicit_vr=True, little_endian=True)
    out.append(Hostile(target, "a series of files without preamble or file meta", "dicom", EITHER, (16, 16, 4)))
    huge = folder / "huge_length"
    paths = dicom_series(huge)
    raw = bytearray(paths[1].read_bytes())
    at = raw.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData, explicit VR: tag, VR, 2 reserved, 4-byte length
    struct.pack_into("<I", raw, at + 8, 0xFFFFFFF0)
    paths[1].write_bytes(bytes(raw))
    out.append(Hostile(huge, "one file's PixelData element claims 4 GB", "dicom"))
    seg_folder = folder / "seg"
    seg_folder.mkdir(exist_ok=True)
    seg = _new_object("1.2.840.10008.5.1.4.1.1.66.4")  # Segmentation Storage
    seg.Modality, seg.SeriesNumber = "SEG", 300
    _pixel_module(seg, np.zeros((4, 16, 16), np.uint16))
    seg.BitsAllocated = seg.BitsStored = 1
    seg.HighBit = 0
    seg.PixelData = b"\x0f" * (4 * 16 * 16 // 8)
    seg.NumberOfFrames = 4
    seg.save_as(str(seg_folder / "seg.dcm"), enforce_file_format=True)
    out.append(Hostile(seg_folder / "seg.dcm", "a DICOM segmentation object (SEG)", "dicom"))
    rt_folder = folder / "rtstruct"
    rt_folder.mkdir(exist_ok=True)
    rt = _new_object(pydicom.uid.RTStructureSetStorage)
    rt.Modality, rt.SeriesNumber = "RTSTRUCT", 1000
    rt.save_as(str(rt_folder / "rt.dcm"), enforce_file_format=True)
    out.append(Hostile(rt_folder / "rt.dcm", "a structure set (RTSTRUCT)", "dicom"))
    single = folder / "single_frames_lie"
    single.mkdir(exist_ok=True)
    ds = _new_object(pydicom.uid.CTImageStorage)
    ds.Modality = "CT"
    _pixel_module(ds, np.zeros((16, 16), np.uint16))
    ds.NumberOfFrames = 50
    ds.PixelSpacing, ds.ImagePositionPatient = [1, 1], [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.save_as(str(single / "ct.dcm"), enforce_file_format=True)
    out.append(Hostile(single / "ct.dcm", "one CT file with NumberOfFrames 50 and one frame of data", "dicom"))
    return out


# ------------------------------------------------------------------------------------------------------ all
def corpus(folder: Path, seed: int = 0) -> list[Hostile]:
    """Every hostile file of this module, under ``folder`` (nifti/, nrrd/, mha/, dicom/)."""
    folder = Path(folder)
    return (nifti_files(folder / "nifti", seed) + nrrd_files(folder / "nrrd", seed) + mha_files(folder / "mha", seed)
            + dicom_files(folder / "dicom", seed))


# ----------------------------------------------------------------------------------------------- judging reads
# Memory a probed reader is told it has (``thinslice.io.limits.available_memory``): a header claiming more must be
# refused before its voxels are allocated. Reads may grow the process by that much plus SLACK_BYTES (libraries
# warming up); the address space is capped a little above, so that a reader that does allocate what a header claims
# fails in the child instead of taking the machine's memory.
PROBE_AVAILABLE = 256 * 2**20
SLACK_BYTES = 160 * 2**20
ADDRESS_SPACE_HEADROOM = 3 * 2**30
PROBE_TIMEOUT_S = 15.0


@dataclass
class Outcome:
    """What one read did: ``status`` "volume", "error" (a ThinsliceError), "exception" (any other), "timeout" or
    "crash"; ``problems``: what was wrong with a volume it returned."""

    status: str
    message: str = ""
    error_type: str = ""
    shape: tuple[int, int, int] | None = None
    problems: list[str] = field(default_factory=list)
    growth: int = 0  # peak resident memory growth of the reading process, bytes
    seconds: float = 0.0


def probe(path: Path, timeout: float = PROBE_TIMEOUT_S, available: int = PROBE_AVAILABLE) -> Outcome:
    """Read ``path`` with :func:`thinslice.io.read_volume` in a child process, with ``available`` bytes of memory
    as far as the readers' limit check knows, and judge the volume it returns. A child that does not answer in
    ``timeout`` seconds is killed (a hang)."""
    global _SERVER
    if _SERVER is None or _SERVER.poll() is not None:
        _SERVER = _start_server()
    stdin, stdout = _pipes(_SERVER)
    stdin.write(json.dumps([str(path), float(timeout), int(available)]).encode() + b"\n")
    stdin.flush()
    return _outcome_from_json(stdout.readline())


def _pipes(server: subprocess.Popen) -> tuple[IO[bytes], IO[bytes]]:
    """The read server's stdin and stdout (it is started with both piped)."""
    if server.stdin is None or server.stdout is None:
        raise RuntimeError("the read server was started without pipes")
    return server.stdin, server.stdout


def _outcome_to_json(outcome: Outcome) -> bytes:
    """One line of JSON (the read server's answers: plain data, never pickle, like everything the package reads)."""
    return json.dumps(asdict(outcome)).encode() + b"\n"


def _outcome_from_json(line: bytes) -> Outcome:
    data = json.loads(line)
    if data.get("shape") is not None:
        data["shape"] = tuple(data["shape"])
    return Outcome(**data)


_SERVER: subprocess.Popen | None = None


def _start_server() -> subprocess.Popen:
    """A process that has the readers loaded and forks one child per read: cheap, and unlike forking the caller
    (whose SimpleITK thread pool or test runner threads a fork would copy in an unknown state) its children start
    from a process that never ran a reader."""
    import atexit

    server = subprocess.Popen([sys.executable, "-c", "from thinslice.data.hostile import _serve; _serve()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    atexit.register(_stop_server, server)
    return server


def _stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        _pipes(server)[0].close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def _serve() -> None:
    """The read server: requests (path, timeout, available) in on stdin, :class:`Outcome` objects out."""
    import logging

    logging.disable(logging.CRITICAL)  # the warm-up's warnings are not the caller's
    _warm_up()
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints must not mix with the answers
    requests = sys.stdin.buffer
    while True:
        line = requests.readline()
        if not line:
            return
        path, timeout, available = json.loads(line)
        answers.write(_outcome_to_json(_fork_read(path, timeout, available)))
        answers.flush()


def _warm_up() -> None:
    """Read one small file of each format once, so that every child inherits loaded libraries and registered
    image readers instead of paying for them on each read (ITK's thread pool is made safe across fork by ITK)."""
    import contextlib
    import tempfile

    from thinslice.io import read_volume

    with contextlib.suppress(ImportError):
        import nibabel  # noqa: F401 - used by the NIfTI checks of every child
    with tempfile.TemporaryDirectory(prefix="thinslice-warm-") as tmp:
        folder = Path(tmp)
        nifti_file(folder / "warm.nii", NiftiHeader())
        nrrd_file(folder / "warm.nrrd", NrrdHeader())
        dicom_series(folder / "series", n=2, size=8)
        for path in (folder / "warm.nii", folder / "warm.nrrd", folder / "series"):
            with contextlib.suppress(Exception):
                read_volume(path)


def _fork_read(path: str, timeout: float, available: int) -> Outcome:
    import select
    import signal
    import time

    start = time.perf_counter()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: read, judge, answer, and leave without running any exit handler
        os.close(read_end)
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            os.write(write_end, _outcome_to_json(_child_outcome(path, available)))
        finally:
            os._exit(0)
    os.close(write_end)
    chunks, deadline, timed_out = [], start + timeout, False
    while True:
        left = deadline - time.perf_counter()
        if left <= 0 or not select.select([read_end], [], [], left)[0]:
            timed_out = True
            break
        chunk = os.read(read_end, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    seconds = time.perf_counter() - start
    if timed_out:
        return Outcome("timeout", f"no answer in {timeout:.0f} s (a hang)", seconds=seconds)
    if not chunks:
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit code {os.WEXITSTATUS(status)}"
        return Outcome("crash", f"the reading process died ({how})", seconds=seconds)
    outcome = _outcome_from_json(b"".join(chunks))
    outcome.seconds = seconds
    return outcome


def _child_outcome(path: str, available: int) -> Outcome:
    import logging

    from thinslice.memory import current_rss, process_peak_rss

    logging.disable(logging.CRITICAL)
    _limit_memory(available)
    rss0 = current_rss()
    try:
        outcome = _read_and_check(Path(path))
    except BaseException as exc:  # noqa: BLE001 - everything a reader may raise is what is being judged
        outcome = Outcome("exception", _first_line(exc), type(exc).__name__)
    peak = process_peak_rss()
    outcome.growth = max(0, peak - rss0)
    return outcome


def _limit_memory(available: int) -> None:
    """Tell the readers' memory check that ``available`` bytes are free, and cap the address space."""
    import resource
    import sys

    import thinslice.io.limits as limits

    original = limits.available_memory
    module: Any  # any module of the package that imported the check by name
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("thinslice") and \
                getattr(module, "available_memory", None) is original:
            module.available_memory = lambda: available
    with open("/proc/self/statm") as fh:
        vms = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vms + ADDRESS_SPACE_HEADROOM, resource.RLIM_INFINITY))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:300] + (" [...more lines]" if "\n" in text else "")


def _read_and_check(path: Path) -> Outcome:
    from thinslice.errors import ThinsliceError
    from thinslice.io import read_volume
    from thinslice.io.formats import NIFTI, file_extension, format_for_suffix

    try:
        volume = read_volume(path)
    except ThinsliceError as exc:
        return Outcome("error", str(exc), "ThinsliceError")
    problems = volume_problems(volume)
    if format_for_suffix(file_extension(path)) is NIFTI:
        problems += nibabel_problems(volume, path)
    return Outcome("volume", repr(volume)[:200], shape=volume.shape_ijk, problems=problems)


def volume_problems(volume) -> list[str]:
    """What is wrong with a Volume a reader returned: voxels not finite float32, spacing not positive and finite,
    direction not orthonormal, origin not finite."""
    problems = []
    array = volume.array
    if array.dtype != np.float32:
        problems.append(f"voxels are {array.dtype}, not float32")
    if not np.all(np.isfinite(array)):
        problems.append(f"{int(np.size(array) - np.count_nonzero(np.isfinite(array)))} voxels are NaN or infinite")
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        problems.append(f"spacing {tuple(spacing)} is not positive and finite")
    direction = np.asarray(volume.direction, dtype=np.float64)
    if not np.all(np.isfinite(direction)) or not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        problems.append(f"direction is not orthonormal ({np.round(direction, 4).tolist()})")
    if not np.all(np.isfinite(np.asarray(volume.origin, dtype=np.float64))):
        problems.append(f"origin {volume.origin} is not finite")
    return problems


def nibabel_problems(volume, path: Path) -> list[str]:
    """Where nibabel reads the NIfTI ``path`` with a coded (qform or sform) affine, the world positions of the
    grid's corners and the voxel values must agree with ``volume``'s. Skipped where nibabel cannot read the file,
    and for volumes thinslice resampled on purpose (a sheared sform)."""
    try:
        import nibabel
    except ImportError:
        return []
    if "geometry" in volume.metadata:
        return []
    try:
        image: Any = nibabel.load(str(path))  # a NIfTI image here; anything else fails below and is skipped
        header = image.header
        codes = (int(header["sform_code"]), int(header["qform_code"]))
        # Codes outside 0..4 are invalid, and nibabel and ITK read them differently: no reference there.
        coded = max(codes) > 0 and min(codes) >= 0 and max(codes) <= 4
        affine = np.asarray(image.affine, dtype=np.float64)
        data = np.asarray(image.dataobj, dtype=np.float64)
    except Exception:  # noqa: BLE001 - nibabel refusing a hostile file is not thinslice's problem
        return []
    problems = []
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if coded and np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) > 1e-12:
        corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64)
        corners *= np.array(volume.shape_ijk, dtype=np.float64) - 1
        ours = np.asarray(volume.origin) + (volume.direction @ (np.asarray(volume.spacing) * corners).T).T
        theirs = (np.diag([-1.0, -1.0, 1.0]) @ (affine[:3, :3] @ corners.T + affine[:3, 3:4])).T
        scale = max(1.0, float(np.abs(theirs).max()))
        if not np.allclose(ours, theirs, atol=1e-3 * scale):
            worst = float(np.abs(ours - theirs).max())
            problems.append(f"grid corners differ from nibabel's affine by up to {worst:.4g} mm")
    offset, header_size = _raw_vox_offset(path)  # nibabel's header object may have "fixed" it on loading
    if not offset >= header_size + 4:
        return problems  # nibabel reads voxels from inside the header where vox_offset points there
    if data.shape != tuple(volume.shape_ijk):
        problems.append(f"shape (i,j,k) {volume.shape_ijk} but nibabel reads {data.shape}")
    else:
        ours = np.transpose(volume.array, (2, 1, 0)).astype(np.float64)
        keep = np.isfinite(data) & (data > -2000)  # below: CT padding, replaced by air on purpose
        if np.any(keep) and not np.allclose(ours[keep], data[keep], rtol=1e-4, atol=1e-2):
            problems.append(f"voxel values differ from nibabel's (max difference "
                            f"{float(np.abs(ours[keep] - data[keep]).max()):.4g})")
    return problems


def _raw_vox_offset(path: Path) -> tuple[float, int]:
    """(vox_offset, header size) as written in the file (NaN, 0 when it is not a NIfTI-1/2 header)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        head = fh.read(540)
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0] if len(head) >= 4 else 0
        if size == 348 and len(head) >= 348:
            return struct.unpack(endian + "f", head[108:112])[0], 348
        if size == 540 and len(head) >= 540:
            return float(struct.unpack(endian + "q", head[168:176])[0]), 540
    return math.nan, 0


def judge(item: Hostile, outcome: Outcome) -> list[str]:
    """Why ``outcome`` is not what a correct reader does with ``item`` (empty when it is)."""
    problems: list[str] = []
    if outcome.status in ("timeout", "crash"):
        return [outcome.message]
    if outcome.status == "exception":
        return [f"{outcome.error_type} instead of a ThinsliceError: {outcome.message}"]
    if outcome.status == "error":
        if item.claims > PROBE_AVAILABLE and "allocat" in outcome.message.lower():
            problems.append("refused only after trying to allocate what the header claims")
        if "\n" in outcome.message.strip():
            problems.append(f"message has {len(outcome.message.strip().splitlines())} lines")
        if not names_file(outcome.message, item.path):
            problems.append("message does not name the file")
    else:
        if item.expect == REFUSE:
            problems.append(f"read as {outcome.message} but must be refused")
        problems += outcome.problems
        if item.shape is not None and outcome.shape != item.shape:
            problems.append(f"shape (i,j,k) {outcome.shape}, expected {item.shape}")
    if outcome.growth > PROBE_AVAILABLE + SLACK_BYTES:
        problems.append(f"the read grew memory by {outcome.growth / 2**20:.0f} MB with "
                        f"{PROBE_AVAILABLE / 2**20:.0f} MB available")
    return problems


def names_file(message: str, path: Path) -> bool:
    """True when ``message`` names ``path`` (or, for a DICOM folder, one of its files)."""
    names = [path.name]
    if path.is_dir():
        names += [p.name for p in path.iterdir()]
    return any(name and name in message for name in names)
