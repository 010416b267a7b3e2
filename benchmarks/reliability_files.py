"""Reliability cases for the NIfTI, NRRD and MetaImage readers: detached data files outside the header's folder,
pipes, non-finite and absurd voxels, outputs that would replace an input's data file, NIfTI geometry (checked
against nibabel), resume after a data file changed, headers that ask for more memory than any machine has, NIfTI-2,
wrong compression and damaged header sizes. Every input is built here, in code."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import struct
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
from reliability_harness import WORK, Case, error_case, ok_case, run

HERE = WORK / "files"
logging.getLogger("nibabel.global").disabled = True  # its header fix-up notes, when a check loads an odd input
SHAPE = (12, 10, 8)  # i, j, k
AFFINE = np.array([[-0.7, 0, 0, 10.0], [0, 0.8, 0, 20.0], [0, 0, 2.0, -250.0], [0, 0, 0, 1.0]])


def _voxels() -> np.ndarray:
    """CT-like int16 values that change along every axis (a reversed slice order shows in the correlation)."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    return (-1000 + 40 * i + 25 * j + 90 * k).astype(np.int16)


def _folder(name: str) -> Path:
    path = HERE / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _nhdr(folder: Path, data_line: str, kind: str = "short", sizes: str = "12 10 8") -> Path:
    path = folder / "v.nhdr"
    path.write_text(f"NRRD0004\ntype: {kind}\ndimension: 3\nsizes: {sizes}\nspacings: 0.8 0.8 2\nencoding: raw\n"
                    f"endian: little\n{data_line}\n")
    return path


def _mhd(folder: Path, data_line: str, name: str = "v.mhd") -> Path:
    path = folder / name
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 12 10 8\nElementType = MET_SHORT\n"
                    f"ElementSpacing = 0.8 0.8 2\nElementByteOrderMSB = False\n{data_line}\n")
    return path


def _raw(folder: Path, name: str = "v.raw", array: np.ndarray | None = None) -> Path:
    path = folder / name
    path.write_bytes((_voxels() if array is None else array).tobytes(order="F"))
    return path


def _degrade(source: Path, out: Path) -> list[object]:
    return ["degrade", source, out, "--factor", "1", "--dtype", "float32"]


def _refused(name: str, source: Path, expect: str, unchanged: list[Path] = ()) -> Case:
    return error_case(name, _degrade(source, source.parent / "out.nii.gz"), expect, unchanged=list(unchanged))


# ---------------------------------------------------------------------------------------- detached data files
def detached_cases() -> list[Case]:
    cases = []
    for label, line in [("nhdr: ../../../../etc/passwd", "data file: ../../../../etc/passwd"),
                        ("nhdr: /proc/self/environ", "data file: /proc/self/environ"),
                        ("nhdr: LIST with a ../ entry", "data file: LIST\nv.raw\n../../etc/passwd"),
                        ("nhdr: printf pattern /dev/%s", "datafile: /etc/s%03d.raw 0 7 1")]:
        folder = _folder("detached-" + str(len(cases)))
        _raw(folder)
        cases.append(_refused(f"detached data file, {label}", _nhdr(folder, line), "detached voxel data"))
    for label, line in [("mhd: /etc/shadow", "ElementDataFile = /etc/shadow"),
                        ("mhd: /dev/urandom", "ElementDataFile = /dev/urandom"),
                        ("mhd: pattern ../s%02d.raw", "ElementDataFile = ../s%02d.raw 0 7 1")]:
        folder = _folder("detached-" + str(len(cases)))
        cases.append(_refused(f"detached data file, {label}", _mhd(folder, line), "detached voxel data"))
    folder = _folder("detached-link")
    link = folder / "v.raw"
    if not link.is_symlink():
        link.symlink_to("/etc/passwd")
    cases.append(_refused("detached data file, a link beside the header to /etc/passwd",
                          _nhdr(folder, "data file: v.raw"), "link to a file outside"))
    cases += [_fifo_case("detached data file, a named pipe beside the header", data=True),
              _fifo_case("input is a named pipe called in.nii.gz", data=False), _batch_case()]
    return cases


def _fifo_case(name: str, data: bool) -> Case:
    """A pipe must be refused at once, not read (which would block forever)."""
    folder = _folder("fifo-data" if data else "fifo-input")
    pipe = folder / ("v.raw" if data else "in.nii.gz")
    if not pipe.exists():
        os.mkfifo(pipe)
    source = _nhdr(folder, "data file: v.raw") if data else pipe
    expect = "not a regular file" if data else "is a named pipe"

    def check() -> tuple[bool, str]:
        try:
            res = run(*_degrade(source, folder / "out.nii.gz"), timeout=60)
        except subprocess.TimeoutExpired:
            return False, "still reading the pipe after 60 s"
        return res.rc == 2 and res.clean and expect in res.message, f"rc {res.rc}: {res.message[:150]}"

    return Case(name, f"thinslice degrade {source.name} out.nii.gz --factor 1", f"rc 2 at once: ...{expect}...",
                check)


def _batch_case() -> Case:
    """Through a manifest: the case fails with the reason, and nothing (no output, no QC thumbnail) is made from
    the environment's bytes."""
    folder = _folder("batch-detached")
    header = _nhdr(folder, "data file: /proc/self/environ")
    manifest = folder / "cohort.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([["input"], [header.name]])
    out = folder / "out"

    def check() -> tuple[bool, str]:
        res = run("batch", manifest, "--out", out, "--spacing", "1", "--method", "cubic")
        rows = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()] if (
            out / "cases.jsonl").exists() else []
        reasons = " ".join(str(r.get("reason", "")) for r in rows)
        made = [p.name for p in out.rglob("*") if p.suffix in (".gz", ".png", ".nrrd")]
        ok = res.clean and "detached voxel data" in reasons and not made
        return ok, f"rc {res.rc}: reason {reasons[:120]!r}, files made {made}"

    return Case("batch manifest with an .nhdr whose data file is /proc/self/environ",
                "thinslice batch cohort.csv --out out --spacing 1 --method cubic",
                "the case fails: ...detached voxel data...; no output or thumbnail", check)


# -------------------------------------------------------------------------------------------- voxel values
def _nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE, version: int = 1) -> Path:
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    nib.save(klass(array, affine), str(path))
    return path


def value_cases() -> list[Case]:
    folder = _folder("values")
    cases = []
    for label, bad in [("NaN", np.nan), ("+inf", np.inf)]:
        array = _voxels().astype(np.float32)
        array[3, 4, 5] = bad
        cases.append(_refused(f"NIfTI with one {label} voxel", _nifti(folder / f"{label}.nii.gz", array),
                              "NaN or infinite"))
    array = _voxels().astype(np.float32)
    array[3, 4, 5] = 3e38
    cases.append(_refused("NIfTI with one 3e38 voxel", _nifti(folder / "huge.nii.gz", array),
                          "far outside any CT range"))
    nrrd = _folder("values-nrrd")
    array = _voxels().astype(np.float32)
    array[0, 0, 0] = -np.inf
    _raw(nrrd, array=array)
    cases.append(_refused("NRRD float with one -inf voxel", _nhdr(nrrd, "data file: v.raw", kind="float"),
                          "NaN or infinite"))
    return cases


# ---------------------------------------------------------------------------------------- output vs input
def overwrite_cases() -> list[Case]:
    folder = _folder("overwrite")
    data = _raw(folder, "out.zraw")
    header = _mhd(folder, "ElementDataFile = out.zraw", name="a.mhd")
    return [error_case("output out.mhd would write out.zraw, the input a.mhd's data file",
                       ["degrade", header, folder / "out.mhd", "--factor", "1"], "which is a file the input",
                       unchanged=[data, header])]


# ------------------------------------------------------------------------------------------- NIfTI geometry
def _header_file(path: Path, *, qcode: int, scode: int, qfac: float = 1.0, pixdim=(0.7, 0.8, 2.0),
                 srows=None, endian: str = "<") -> Path:
    """A NIfTI-1 file with the header fields as given (nibabel's writer would normalise them)."""
    header = nib.Nifti1Header(endianness=endian)
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.dtype(endian + "i2"))
    header["qform_code"], header["sform_code"] = qcode, scode
    header["qoffset_x"], header["qoffset_y"], header["qoffset_z"] = 10.0, 20.0, -250.0
    header["pixdim"][0] = qfac
    header["pixdim"][1:4] = pixdim
    header["vox_offset"] = 352
    if srows is not None:
        header["srow_x"], header["srow_y"], header["srow_z"] = srows
    path.write_bytes(header.binaryblock + b"\0" * 4 + _voxels().astype(endian + "i2").tobytes(order="F"))
    return path


def geometry_case(name: str, source: Path, say: str = "") -> Case:
    """rc 0, and the output (same grid: --factor 1) has nibabel's affine of the input and voxels in its order."""
    out = source.parent / (source.name.split(".")[0] + "-out.nii.gz")

    def check() -> tuple[bool, str]:
        res = run(*_degrade(source, out))
        if res.rc != 0 or not out.exists():
            return False, f"rc {res.rc}: {res.message[:150]}"
        want, got = nib.load(str(source)), nib.load(str(out))
        gap = float(np.abs(got.affine - want.affine).max())
        corr = float(np.corrcoef(np.asarray(got.dataobj).ravel(), np.asarray(want.dataobj).ravel())[0, 1])
        ok = res.clean and gap < 1e-3 and corr > 0.99 and say in res.err
        return ok, f"rc 0: affine differs from nibabel's by {gap:.2g} mm, voxel correlation {corr:.3f}" + (
            f", said {say!r}" if say and say in res.err else "")

    return Case(name, f"thinslice degrade {source.name} out.nii.gz --factor 1",
                "rc 0, output affine = nibabel's affine of the input, same voxel order", check)


def geometry_cases() -> list[Case]:
    folder = _folder("geometry")
    sform = AFFINE[:3].copy()
    sform[2, 2] = -2.0  # the sform flips the slice axis: it disagrees with the qform below
    return [
        geometry_case("NIfTI qform only, qfac -1", _header_file(folder / "qfac.nii", qcode=1, scode=0, qfac=-1.0)),
        geometry_case("NIfTI qform only, negative slice pixdim",
                      _header_file(folder / "negpix.nii", qcode=1, scode=0, pixdim=(0.7, 0.8, -2.0)),
                      say="negative voxel size"),
        geometry_case("NIfTI sform only", _header_file(folder / "sform.nii", qcode=0, scode=1, srows=sform)),
        geometry_case("NIfTI qform and sform disagree: sform, with a warning",
                      _header_file(folder / "disagree.nii", qcode=1, scode=1, srows=sform), say="disagree"),
        geometry_case("big-endian NIfTI, qform and sform disagree: warned too",
                      _header_file(folder / "bigend.nii", qcode=1, scode=1, srows=sform, endian=">"), say="disagree"),
        geometry_case("NIfTI-2 (nibabel.Nifti2Image)", _nifti(folder / "v2.nii.gz", _voxels(), version=2)),
    ]


# ------------------------------------------------------------------------------------------ resume (signature)
def resume_case() -> Case:
    """A batch re-run redoes a case whose detached data file changed (the header itself is the same)."""
    folder = _folder("resume")
    header = _nhdr(folder, "data file: v.raw")
    out = folder / "out"

    def check() -> tuple[bool, str]:
        _raw(folder)
        first = run("batch", header, "--out", out, "--spacing", "1", "--method", "cubic")
        outputs = sorted(out.glob("*.nrrd"))
        if first.rc != 0 or not outputs:
            return False, f"first run rc {first.rc}: {first.message[:150]}"
        before = outputs[0].read_bytes()
        _raw(folder, array=(_voxels()[::-1] + 7).astype(np.int16))  # new data, same header
        second = run("batch", header, "--out", out, "--spacing", "1", "--method", "cubic")
        changed = outputs[0].read_bytes() != before
        return second.rc == 0 and changed, f"second run rc {second.rc}: output {'redone' if changed else 'KEPT'}"

    return Case("batch resume after the .nhdr's data file changed", "thinslice batch v.nhdr --out out ... (twice)",
                "the case is redone", check)


# ------------------------------------------------------------------------------------- memory and headers
def header_cases() -> list[Case]:
    folder = _folder("headers")
    _raw(folder)
    nrrd = _nhdr(folder, "data file: v.raw", sizes="20000 20000 1000")
    huge = folder / "huge.nii.gz"  # a header claiming 30000 x 30000 x 1000 int16, voxels never written
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 1000))
    header.set_data_dtype(np.int16)
    header.set_qform(AFFINE, code=1)
    header["vox_offset"] = 352
    huge.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 4096))
    plain = _nifti(folder / "plain.nii", _voxels())
    fake = folder / "fake.nii.gz"
    fake.write_bytes(plain.read_bytes())
    cases = [
        _refused("1 KB NRRD claiming 20000x20000x1000 int16", nrrd, "20000x20000x1000 voxels"),
        _refused("gzip NIfTI claiming 30000x30000x1000 int16", huge, "needs about"),
        _refused(".nii.gz that is a plain .nii", fake, "is not gzip-compressed although its name ends in .gz; "
                 "rename it to fake.nii"),
        _refused("NIfTI with sizeof_hdr 1000", _patched(folder, "size.nii", 0, "<i", 1000), "sizeof_hdr = 1000"),
        _refused("NIfTI with vox_offset 1e12", _patched(folder, "offset.nii", 108, "<f", 1e12),
                 "implausibly large header"),
        _refused("NIfTI with a header extension claiming 2 GB", _extension(folder), "header extension at byte 352"),
        _refused("NIfTI with 1e-9 mm voxels", _nifti(folder / "tiny.nii", _voxels(), np.diag([1e-9, 1e-9, 1e-9, 1])),
                 "outside the 0.01 to 100 mm"),
    ]
    return cases


def _patched(folder: Path, name: str, offset: int, fmt: str, *values) -> Path:
    path = _nifti(folder / name, _voxels())
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, offset, *values)
    path.write_bytes(bytes(raw))
    return path


def _extension(folder: Path) -> Path:
    path = _patched(folder, "ext.nii", 108, "<f", 368.0)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<4bii", raw, 348, 1, 0, 0, 0, 2_000_000_000, 4)
    path.write_bytes(bytes(raw))
    return path


def cases() -> list[Case]:
    return [*detached_cases(), *value_cases(), *overwrite_cases(), *geometry_cases(), resume_case(),
            *header_cases(), ok_case("a NIfTI beside those cases still reads", _degrade(
                _nifti(_folder("plain") / "v.nii.gz", _voxels()), _folder("plain") / "out.nii.gz"))]
