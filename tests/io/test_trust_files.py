"""Hostile NIfTI, NRRD and MetaImage files: detached data outside the header's folder, pipes, NaN and huge voxels,
headers that ask for more memory than there is, unusual NIfTI geometry (checked against nibabel), NIfTI-2, wrong
compression, damaged header sizes, and outputs that would replace an input's data file."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thinslice.errors import ThinsliceError
from thinslice.io import limits
from thinslice.io.readers import files_read, read_volume
from thinslice.io.volume import Volume
from thinslice.io.writers import write_volume

SHAPE = (6, 5, 4)  # i, j, k
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _voxels() -> np.ndarray:
    return (np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) - 1000).astype(np.int16)


def _nhdr(folder: Path, data_line: str, extra: str = "", sizes: str = "6 5 4") -> Path:
    path = folder / "v.nhdr"
    path.write_text(f"NRRD0004\ntype: short\ndimension: 3\nsizes: {sizes}\nspacings: 1 1 2\nencoding: raw\n"
                    f"endian: little\n{extra}{data_line}\n")
    return path


def _mhd(folder: Path, data_line: str, dims: str = "6 5 4") -> Path:
    path = folder / "v.mhd"
    path.write_text(f"ObjectType = Image\nNDims = 3\nDimSize = {dims}\nElementType = MET_SHORT\n"
                    f"ElementSpacing = 1 1 2\nElementByteOrderMSB = False\n{data_line}\n")
    return path


def _raw(folder: Path, name: str = "v.raw") -> Path:
    path = folder / name
    path.write_bytes(_voxels().tobytes(order="F"))
    return path


# ------------------------------------------------------------------------------------- detached data files
@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "/proc/self/environ", "/dev/urandom",
                                  "sub/../../x.raw", "C:\\data\\v.raw"])
@pytest.mark.parametrize("kind", ["nhdr", "mhd"])
def test_a_data_file_outside_the_header_folder_is_refused(tmp_path, name, kind):
    header = _nhdr(tmp_path, f"data file: {name}") if kind == "nhdr" else _mhd(tmp_path, f"ElementDataFile = {name}")
    with pytest.raises(ThinsliceError, match="detached voxel data must be a regular file"):
        read_volume(header)


@pytest.mark.parametrize("line", ["data file: LIST\nok.raw\n../../etc/passwd", "datafile: /etc/%03d 0 3 1",
                                  "data file: ../s%d.raw 1 4 1 2"])
def test_nrrd_list_and_pattern_forms_are_checked(tmp_path, line):
    _raw(tmp_path, "ok.raw")
    with pytest.raises(ThinsliceError, match="its data file"):
        read_volume(_nhdr(tmp_path, line))


@pytest.mark.parametrize("line", ["ElementDataFile = LIST 2D\nok.raw\n/etc/shadow",
                                  "ElementDataFile = ../slice%03d.raw 1 4 1"])
def test_metaimage_list_and_pattern_forms_are_checked(tmp_path, line):
    _raw(tmp_path, "ok.raw")
    with pytest.raises(ThinsliceError, match="its data file"):
        read_volume(_mhd(tmp_path, line))


def test_a_link_to_a_file_outside_and_a_fifo_are_refused(tmp_path):
    (tmp_path / "link.raw").symlink_to("/etc/passwd")
    with pytest.raises(ThinsliceError, match="link to a file outside"):
        read_volume(_mhd(tmp_path, "ElementDataFile = link.raw"))
    os.mkfifo(tmp_path / "pipe.raw")
    with pytest.raises(ThinsliceError, match="not a regular file"):
        read_volume(_nhdr(tmp_path, "data file: pipe.raw"))
    os.mkfifo(tmp_path / "in.nii.gz")
    with pytest.raises(ThinsliceError, match="named pipe"):
        read_volume(tmp_path / "in.nii.gz")


def test_data_files_beside_the_header_are_read_and_listed(tmp_path):
    _raw(tmp_path)
    for header in (_nhdr(tmp_path, "data file: v.raw"), _mhd(tmp_path, "ElementDataFile = v.raw")):
        volume = read_volume(header)
        assert np.array_equal(volume.array, _voxels().transpose(2, 1, 0).astype(np.float32))
        assert files_read(header) == [header, (tmp_path / "v.raw").resolve()]


def test_a_pattern_of_slices_beside_the_header_is_listed(tmp_path):
    slices = _voxels()
    for k in range(SHAPE[2]):
        (tmp_path / f"s{k:02d}.raw").write_bytes(slices[:, :, k].tobytes(order="F"))
    header = _mhd(tmp_path, "ElementDataFile = s%02d.raw 0 3 1")
    assert [p.name for p in files_read(header)[1:]] == ["s00.raw", "s01.raw", "s02.raw", "s03.raw"]
    assert np.array_equal(read_volume(header).array, slices.transpose(2, 1, 0))


# ---------------------------------------------------------------------------------------- output vs input
def test_an_output_that_would_replace_the_input_data_file_is_refused(tmp_path):
    _raw(tmp_path, "out.zraw")
    header = _mhd(tmp_path, "ElementDataFile = out.zraw")
    volume = read_volume(header)
    before = (tmp_path / "out.zraw").read_bytes()
    with pytest.raises(ThinsliceError, match="out.zraw, which is a file the input"):
        write_volume(volume, tmp_path / "out.mhd", reference_input=header)
    with pytest.raises(ThinsliceError, match="out.zraw is a file the input"):
        write_volume(volume, tmp_path / "out.zraw", reference_input=header)
    assert (tmp_path / "out.zraw").read_bytes() == before
    write_volume(volume, tmp_path / "other.mhd", reference_input=header)  # a name of its own is fine


# ------------------------------------------------------------------------------------------ values, memory
def _nifti(path: Path, array: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e38])
def test_non_finite_and_absurd_nifti_voxels_are_refused(tmp_path, bad):
    array = np.full(SHAPE, -1000.0, np.float32)
    array[1, 2, 3] = bad
    with pytest.raises(ThinsliceError, match="NaN or infinite|far outside any CT range"):
        read_volume(_nifti(tmp_path / "v.nii.gz", array))


def test_non_finite_nrrd_voxels_are_refused(tmp_path):
    array = np.full(SHAPE, -1000.0, np.float32)
    array[0, 0, 0] = np.nan
    (tmp_path / "v.raw").write_bytes(array.tobytes(order="F"))
    header = _nhdr(tmp_path, "data file: v.raw")
    header.write_text(header.read_text().replace("type: short", "type: float"))
    with pytest.raises(ThinsliceError, match="1 NaN or infinite"):
        read_volume(header)


def test_a_header_asking_for_more_memory_than_there_is_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "available_memory", lambda: 1000)
    _raw(tmp_path)
    for path in (_nhdr(tmp_path, "data file: v.raw"), _nifti(tmp_path / "v.nii.gz", _voxels())):
        with pytest.raises(ThinsliceError, match="needs about .* GB to read"):
            read_volume(path)


def test_a_huge_nrrd_claim_is_refused_before_reading(tmp_path):
    _raw(tmp_path)
    with pytest.raises(ThinsliceError, match="2000x2000x1000 voxels"):
        read_volume(_nhdr(tmp_path, "data file: v.raw", sizes="2000 2000 1000"))


@pytest.mark.parametrize("zoom", [1e-9, 0.001, 500.0])
def test_implausible_voxel_sizes_are_refused(tmp_path, zoom):
    with pytest.raises(ThinsliceError, match="outside the 0.01 to 100 mm"):
        read_volume(_nifti(tmp_path / "v.nii", _voxels(), np.diag([zoom, 0.8, 2.0, 1.0])))


# ------------------------------------------------------------------------------------------ NIfTI headers
def test_nifti2_is_read_with_nibabel_geometry(tmp_path):
    affine = np.array([[-0.7, 0, 0, 10], [0, 0.8, 0, 20], [0, 0, 2, -250], [0, 0, 0, 1.0]])
    path = tmp_path / "v2.nii.gz"
    nib.save(nib.Nifti2Image(_voxels(), affine), str(path))
    volume = read_volume(path)
    assert np.array_equal(volume.array, _voxels().transpose(2, 1, 0))
    _assert_same_geometry(volume, affine)


def test_compression_that_does_not_match_the_name_is_named(tmp_path):
    plain = _nifti(tmp_path / "v.nii", _voxels())
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(plain.read_bytes())
    with pytest.raises(ThinsliceError, match="not gzip-compressed .* rename it to fake.nii$"):
        read_volume(fake)
    packed = tmp_path / "packed.nii"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(ThinsliceError, match="rename it to packed.nii.gz"):
        read_volume(packed)


def _patched(path: Path, offset: int, fmt: str, *values) -> Path:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    path.write_bytes(bytes(raw))
    return path


def test_damaged_header_sizes_get_precise_messages(tmp_path):
    with pytest.raises(ThinsliceError, match=r"sizeof_hdr = 1000"):
        read_volume(_patched(_nifti(tmp_path / "a.nii", _voxels()), 0, "<i", 1000))
    with pytest.raises(ThinsliceError, match=r"vox_offset\), beyond the end"):
        read_volume(_patched(_nifti(tmp_path / "b.nii", _voxels()), 108, "<f", 1e6))
    with pytest.raises(ThinsliceError, match="implausibly large header"):
        read_volume(_patched(_nifti(tmp_path / "c.nii", _voxels()), 108, "<f", 1e12))
    # an extension flag followed by an extension claiming 2 GB
    path = _patched(_nifti(tmp_path / "d.nii", _voxels()), 108, "<f", 368.0)
    with pytest.raises(ThinsliceError, match="extension at byte 352 claims 2000000000 bytes"):
        read_volume(_patched(path, 348, "<4bii", 1, 0, 0, 0, 2_000_000_000, 4))
    with pytest.raises(ThinsliceError, match=r"vox_offset \(nan\) is not a byte position"):
        read_volume(_patched(path, 108, "<f", float("nan")))


def _world(affine: np.ndarray, index: tuple[int, int, int]) -> np.ndarray:
    return (RAS_TO_LPS @ affine @ np.array([*index, 1.0]))[:3]


def _assert_same_geometry(volume: Volume, affine: np.ndarray, shape: tuple[int, ...] = SHAPE) -> None:
    """The world (LPS) positions of a few voxels (corners and inner ones) agree with those of nibabel's affine."""
    matrix = np.asarray(volume.direction) * np.asarray(volume.spacing)
    last = [n - 1 for n in shape[:3]]
    for index in [(0, 0, 0), (0, 0, last[2]), (last[0], min(2, last[1]), 1), (1, last[1], last[2])]:
        mine = np.asarray(volume.origin) + matrix @ np.asarray(index, dtype=np.float64)
        np.testing.assert_allclose(mine, _world(affine, index), atol=1e-3)


def _raw_header(path: Path, *, qcode: int, scode: int, qfac: float = 1.0, pixdim=(0.7, 0.8, 2.0),
                quaternion=(0.0, 0.0, 0.0), offset=(10.0, 20.0, -250.0), srows=None) -> Path:
    """A NIfTI-1 file with its header fields set as given (nibabel's writer would normalise them)."""
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.int16)
    header["qform_code"], header["sform_code"] = qcode, scode
    header["quatern_b"], header["quatern_c"], header["quatern_d"] = quaternion
    header["qoffset_x"], header["qoffset_y"], header["qoffset_z"] = offset
    header["pixdim"][0] = qfac
    header["pixdim"][1:4] = pixdim
    header["vox_offset"] = 352
    if srows is not None:
        header["srow_x"], header["srow_y"], header["srow_z"] = srows
    path.write_bytes(header.binaryblock + b"\0" * 4 + _voxels().tobytes(order="F"))
    return path


SFORM = np.array([[-0.7, 0, 0, 5.0], [0, 0.8, 0, 6.0], [0, 0, -2.0, 7.0]])


@pytest.mark.parametrize("fields", [
    dict(qcode=1, scode=0, qfac=-1.0),  # qform only, left-handed (qfac -1)
    dict(qcode=1, scode=0, pixdim=(0.7, 0.8, -2.0)),  # qform only, negative slice pixdim
    dict(qcode=1, scode=0, quaternion=(0.0, 0.3826834, 0.0)),  # qform only, rotated 45 degrees
    dict(qcode=0, scode=1, srows=SFORM),  # sform only
    dict(qcode=1, scode=1, offset=(5.0, 6.0, 7.0), qfac=-1.0, pixdim=(0.7, 0.8, 2.0),
         quaternion=(0.0, 0.0, 1.0), srows=SFORM),  # both, agreeing
    dict(qcode=1, scode=2, srows=SFORM),  # both, disagreeing: the sform wins
    dict(qcode=0, scode=0),  # pixdim only
])
def test_nifti_geometry_follows_nibabel(tmp_path, fields):
    path = _raw_header(tmp_path / "g.nii", **fields)
    volume = read_volume(path)
    assert np.array_equal(volume.array, _voxels().transpose(2, 1, 0))
    _assert_same_geometry(volume, nib.load(str(path)).affine)


def test_disagreeing_qform_and_sform_warn_also_big_endian(tmp_path, caplog):
    header = nib.Nifti1Header(endianness=">")
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.dtype(">i2"))
    header.set_qform(np.diag([0.7, 0.8, 2.0, 1.0]), code=1)
    header.set_sform(np.array([*SFORM, [0, 0, 0, 1.0]]), code=1)
    header["vox_offset"] = 352
    path = tmp_path / "be.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + _voxels().astype(">i2").tobytes(order="F"))
    volume = read_volume(path)
    assert "qform and sform disagree" in caplog.text
    assert np.array_equal(volume.array, _voxels().transpose(2, 1, 0))
    _assert_same_geometry(volume, nib.load(str(path)).affine)


# ------------------------------------------------------------------------------------- property: headers
def _mostly(valid, damaged):
    """Values that are valid nine times in ten, so that most examples combine a few damaged fields at most."""
    return st.integers(0, 9).flatmap(lambda n: damaged if n == 7 else valid)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dims=_mostly(st.tuples(*(st.integers(2, 6),) * 3), st.tuples(*(st.integers(-2, 9),) * 3)),
       ndim=_mostly(st.just(3), st.sampled_from([-1, 0, 2, 4, 8])),
       pixdim=_mostly(st.tuples(st.sampled_from([-1.0, 0.0, 1.0]), *(st.sampled_from([0.5, 0.8, 2.0, 5.0]),) * 3),
                      st.tuples(*(st.sampled_from([0.0, -1.5, 1e-9, 2.0, np.nan, np.inf, 1e30]),) * 4)),
       vox_offset=_mostly(st.sampled_from([352.0, 368.0]), st.sampled_from([0.0, 353.0, 1e9, -5.0, np.nan])),
       datatype=_mostly(st.sampled_from([2, 4, 8, 16, 64, 256, 512, 768]),
                        st.sampled_from([0, 7, 128, 1024, 1792, 2304])),
       qcode=_mostly(st.integers(0, 4), st.sampled_from([-1, 5, 300])),
       scode=_mostly(st.integers(0, 4), st.sampled_from([-1, 5, 300])),
       quaternion=_mostly(st.tuples(*(st.sampled_from([0.0, 0.3, -0.5, 0.7]),) * 3),
                          st.tuples(*(st.sampled_from([1.0, 2.0, np.nan, np.inf]),) * 3)))
def test_any_nifti_header_gives_nibabel_geometry_or_one_error(tmp_path, dims, ndim, pixdim, vox_offset, datatype,
                                                                qcode, scode, quaternion):
    header = nib.Nifti1Header()
    header.set_data_shape((4, 3, 3))
    raw = bytearray(header.binaryblock)
    struct.pack_into("<8h", raw, 40, ndim, *dims, 1, 1, 1, 1)
    struct.pack_into("<hh", raw, 70, datatype, 16)
    struct.pack_into("<4f", raw, 76, *pixdim)
    struct.pack_into("<f", raw, 108, vox_offset)
    struct.pack_into("<hh", raw, 252, qcode, scode)
    struct.pack_into("<3f", raw, 256, *quaternion)
    struct.pack_into("<12f", raw, 280, -0.7, 0, 0, 5, 0, 0.8, 0, 6, 0, 0, 2, 7)
    path = tmp_path / "p.nii"
    path.write_bytes(bytes(raw) + b"\0" * 4 + bytes(range(32)) * 256)  # small finite values in any type
    try:
        volume = read_volume(path)
    except ThinsliceError as exc:
        assert "\n" not in str(exc)
        return
    reference = nib.load(str(path))
    assert volume.array.shape == reference.shape[:3][::-1]
    expected = np.asanyarray(reference.dataobj).reshape(reference.shape[:3]).transpose(2, 1, 0)
    np.testing.assert_allclose(volume.array, expected.astype(np.float32), rtol=1e-6)  # as float32, as read
    _assert_same_geometry(volume, reference.affine, reference.shape)


# --------------------------------------------------------------------------------------- cohort resume
def test_the_cohort_signature_and_hash_cover_the_data_file(tmp_path):
    from types import SimpleNamespace

    from thinslice.cohort.cases import files_signature
    from thinslice.cohort.discover import volume_file
    from thinslice.cohort.worker import _sha256

    data = _raw(tmp_path)
    header = _nhdr(tmp_path, "data file: v.raw")
    found = volume_file(header)
    assert str(data.resolve()) in found.files
    signature, digest = files_signature(found.files), _sha256(SimpleNamespace(path=str(header)))
    data.write_bytes(_voxels()[::-1].tobytes(order="F"))  # same size, new content
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    assert files_signature(volume_file(header).files) != signature
    assert _sha256(SimpleNamespace(path=str(header))) != digest


def test_a_complete_gzip_stream_of_a_cut_nifti_is_truncated(tmp_path):
    plain = _nifti(tmp_path / "v.nii", _voxels())
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(plain.read_bytes()[:-100]))  # a valid stream, 100 voxel bytes short
    with pytest.raises(ThinsliceError, match="truncated or corrupt .* header promises"):
        read_volume(cut)


def test_a_nifti_with_a_nan_intercept_is_refused_in_one_line(tmp_path) -> None:
    """nibabel accepts the header but refuses its scaling (a valid slope, a NaN intercept) when the voxels are read:
    that refusal is one ThinsliceError line too, not nibabel's HeaderDataError."""
    from thinslice.data import hostile

    header = hostile.NiftiHeader(dims=(4, 8, 8, 6, 1, 1, 1, 1), datatype=256, bitpix=8, scl_slope=1.0,
                                 scl_inter=float("nan"))
    path = hostile.nifti_file(tmp_path / "nan_inter.nii", header, hostile.default_voxels(header))
    with pytest.raises(ThinsliceError, match=r"nan_inter\.nii: its NIfTI header is damaged \(.*intercept nan\)"):
        read_volume(path)
