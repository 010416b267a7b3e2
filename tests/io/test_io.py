"""Reading and writing volumes: geometry and HU survive every format; bad inputs give clear errors."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from thinslice.cli.main import main
from thinslice.data.phantom import make_chest_phantom
from thinslice.errors import ThinsliceError
from thinslice.io import Volume, list_dicom_series, read_volume, write_volume
from thinslice.io.dicom import format_ds, write_dicom_series


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture(scope="module")
def phantom() -> Volume:
    """16 slices of 32x32, oblique, off-centre, with a known slice thickness."""
    vol = make_chest_phantom(shape=(16, 32, 32), spacing=(1.4, 1.4, 2.5), seed=2)
    vol.origin = (-21.123456, 37.654321, -310.5)
    vol.direction = _rotation(0.15, -0.1, 0.3)
    vol.slice_thickness = 3.0
    return vol


def _sagittal_stack() -> Volume:
    """Thick slices along index axis i (not k), and k pointing left-right: a sagittally acquired stack."""
    vol = make_chest_phantom(shape=(12, 20, 24), spacing=(4.0, 0.9, 1.1), seed=4)
    direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # i->P, j->S, k->L
    return Volume(vol.array, vol.spacing, (5.5, -120.25, 40.0), direction @ _rotation(0.05, 0, 0).T)


def _assert_same_grid(a: Volume, b: Volume) -> None:
    assert a.shape_ijk == b.shape_ijk
    np.testing.assert_allclose(a.spacing, b.spacing, atol=1e-4)
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-4)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-6)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_file_round_trip_keeps_values_geometry_and_thickness(tmp_path, phantom, ext):
    path = write_volume(phantom, tmp_path / f"sub/vol{ext}")
    back = read_volume(path)
    _assert_same_grid(phantom, back)
    np.testing.assert_array_equal(back.array, np.rint(phantom.array))  # int16 by default
    assert back.array.dtype == np.float32
    assert back.slice_thickness == pytest.approx(3.0)
    assert not list((tmp_path / "sub").glob(".thinslice-tmp-*"))  # temp folder cleaned up


def test_float32_output_keeps_fractions(tmp_path, phantom):
    vol = phantom.with_array(phantom.array + 0.25)
    back = read_volume(write_volume(vol, tmp_path / "v.nrrd", dtype="float32"))
    np.testing.assert_array_equal(back.array, vol.array)
    with pytest.raises(ThinsliceError, match="dtype"):
        write_volume(vol, tmp_path / "v.nii.gz", dtype="float64")
    with pytest.raises(ThinsliceError, match="int16"):
        write_volume(vol, tmp_path / "dicom_out/", dtype="float32")


def test_values_beyond_int16_are_refused_not_clipped(tmp_path, phantom):
    """Silent clipping at +-32767 would write a wrong volume with success; float32 keeps the values."""
    array = phantom.array.copy()
    array[0, 0, 0], array[0, 0, 1] = 40000.0, -40000.0
    with pytest.raises(ThinsliceError, match="--dtype float32"):
        write_volume(phantom.with_array(array), tmp_path / "v.mha")
    assert not (tmp_path / "v.mha").exists()
    back = read_volume(write_volume(phantom.with_array(array), tmp_path / "v.mha", dtype="float32"))
    assert back.array[0, 0, 0] == 40000.0


@pytest.mark.parametrize("make", ["oblique", "sagittal"])
def test_nifti_dicom_nifti_round_trip(tmp_path, phantom, make):
    vol = phantom if make == "oblique" else _sagittal_stack()
    nifti = read_volume(write_volume(vol, tmp_path / "in.nii.gz"))
    folder = write_volume(nifti, tmp_path / "series/", reference_input=tmp_path / "in.nii.gz")
    from_dicom = read_volume(folder)
    _assert_same_grid(vol, from_dicom)
    np.testing.assert_array_equal(from_dicom.array, np.rint(vol.array))
    assert from_dicom.slice_axis == vol.slice_axis
    assert from_dicom.metadata["modality"] == "CT"
    back = read_volume(write_volume(from_dicom, tmp_path / "out.nii.gz"))
    _assert_same_grid(vol, back)
    np.testing.assert_array_equal(back.array, np.rint(vol.array))
    if make == "oblique":
        assert from_dicom.slice_thickness == pytest.approx(3.0)


def test_dicom_tags_of_written_series(tmp_path, phantom):
    folder = write_volume(phantom, tmp_path / "s")
    files = sorted(folder.iterdir())
    assert len(files) == 16
    ds = pydicom.dcmread(files[3])
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.Modality == "CT" and ds.PixelRepresentation == 1
    assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0
    expected = np.asarray(phantom.origin) + phantom.direction[:, 2] * 2.5 * 3
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], expected, atol=1e-9)
    np.testing.assert_array_equal(ds.pixel_array, np.rint(phantom.array[3]).astype(np.int16))
    assert all(len(format_ds(v)) <= 16 for v in (-123.45678901234567, 1e-7, 3.0, -0.0))


def test_left_handed_grid_is_written_in_reverse_slice_order(tmp_path, phantom):
    flipped_dir = phantom.direction.copy()
    flipped_dir[:, 2] *= -1  # determinant -1
    vol = Volume(phantom.array, phantom.spacing, phantom.origin, flipped_dir)
    back = read_volume(write_volume(vol, tmp_path / "lh"))
    np.testing.assert_allclose(back.direction[:, 2], -flipped_dir[:, 2], atol=1e-6)
    np.testing.assert_array_equal(back.array, np.rint(vol.array[::-1]))
    last = np.asarray(vol.origin) + flipped_dir[:, 2] * 2.5 * 15
    np.testing.assert_allclose(back.origin, last, atol=1e-4)


def test_dicom_sorted_by_position_not_file_name(tmp_path, phantom):
    folder = write_volume(phantom, tmp_path / "s")
    files = sorted(folder.iterdir())
    rng = np.random.default_rng(0)
    new_names = rng.permutation(len(files))
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for path, name, instance in zip(files, new_names, rng.permutation(len(files)), strict=True):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = int(instance) + 1  # scrambled too: only the position can give the order
        ds.save_as(shuffled / f"IMG{name:03d}")
    assert list(np.argsort(new_names)) != list(range(len(files)))  # name order is not slice order
    back = read_volume(shuffled)
    np.testing.assert_array_equal(back.array, np.rint(phantom.array))
    _assert_same_grid(phantom, back)
    # one file of the series stands for the whole series
    one = read_volume(shuffled / "IMG007")
    np.testing.assert_array_equal(one.array, back.array)


def test_rescale_slope_intercept_with_uint16_storage(tmp_path, phantom):
    folder = tmp_path / "u16"
    folder.mkdir()
    write_dicom_series(phantom, folder, unsigned=True, rescale_intercept=-1024.0)
    ds = pydicom.dcmread(sorted(folder.iterdir())[0])
    assert ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) == -1024.0
    assert ds.pixel_array.dtype == np.uint16 and ds.pixel_array.min() >= 0
    back = read_volume(folder)
    np.testing.assert_array_equal(back.array, np.rint(phantom.array))


def test_padding_values_become_air(tmp_path, phantom):
    array = np.rint(phantom.array)
    array[:, :3, :] = -3024.0  # outside the field of view
    array[:, -2:, :] = -1500.0  # marked by PixelPaddingValue only
    vol = phantom.with_array(array)
    folder = tmp_path / "pad"
    folder.mkdir()
    write_dicom_series(vol, folder, pixel_padding_value=-1500)
    back = read_volume(folder)
    assert back.array.min() >= -1024.0
    assert np.all(back.array[:, :3, :] == -1024.0) and np.all(back.array[:, -2:, :] == -1024.0)
    np.testing.assert_array_equal(back.array[:, 3:-2, :], array[:, 3:-2, :])
    assert "padding_replaced" in back.metadata
    # the <= -2000 HU rule also applies to volume files
    array = np.where(array < -2000, -2048.0, np.maximum(array, -1024.0))
    nifti = read_volume(write_volume(phantom.with_array(array), tmp_path / "p.nii"))
    assert nifti.array.min() >= -1024.0 and "padding_replaced" in nifti.metadata
    assert "padding_replaced" not in read_volume(write_volume(phantom, tmp_path / "q.nii")).metadata


def test_several_series_in_one_folder(tmp_path, phantom):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    uids = []
    for n, description in enumerate(["lung", "soft tissue"]):
        part = tmp_path / f"part{n}"
        part.mkdir()
        vol = phantom.with_array(phantom.array + 100 * n)
        write_dicom_series(vol, part, series_description=description, series_number=n + 1)
        uids.append(pydicom.dcmread(next(part.iterdir())).SeriesInstanceUID)
        for f in part.iterdir():
            shutil.move(f, mixed / f"s{n}_{f.name}")
    series = list_dicom_series(mixed)
    assert sorted(s.uid for s in series) == sorted(uids)
    assert {s.description for s in series} == {"lung", "soft tissue"}
    assert all(s.num_files == 16 and s.modality == "CT" for s in series)
    with pytest.raises(ThinsliceError, match="2 image series.*--series") as err:
        read_volume(mixed)
    assert "\n" not in str(err.value)
    assert [uid in line for line, uid in zip(err.value.details, uids, strict=True)] == [True, True]  # by number
    assert read_volume(mixed, series_uid="2").array.max() == np.rint(phantom.array + 100).max()  # SeriesNumber
    picked = read_volume(mixed, series_uid=uids[1])
    np.testing.assert_array_equal(picked.array, np.rint(phantom.array + 100))
    with pytest.raises(ThinsliceError, match="not in"):
        read_volume(mixed, series_uid="1.2.3.4")
    one_file = read_volume(mixed / "s1_slice_00004.dcm")  # a file stands for its own series only
    assert one_file.metadata["series_uid"] == uids[1]


def test_gantry_tilt_is_resampled_onto_an_orthogonal_grid(tmp_path, phantom, caplog):
    folder = write_volume(Volume(phantom.array, phantom.spacing), tmp_path / "tilt")
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.2 * z, z]  # slices shift along y with z: about 11 degrees of tilt
        ds.save_as(path)
    with caplog.at_level("WARNING", logger="thinslice"):
        vol = read_volume(folder)
    assert "gantry tilt" in caplog.text and "resampled onto an orthogonal grid" in caplog.text
    assert float(vol.metadata["gantry_tilt_deg"]) == pytest.approx(11.3, abs=0.1)
    np.testing.assert_allclose(vol.direction, np.eye(3), atol=1e-9)
    assert vol.shape_ijk == (32, 32 + 6, 16)  # slices shifted by up to 15 x 2.5 mm x 0.2 = 5.4 pixels: 6 rows more


def test_missing_slice_is_refused(tmp_path, phantom):
    folder = write_volume(phantom, tmp_path / "s")
    sorted(folder.iterdir())[7].unlink()
    with pytest.raises(ThinsliceError, match="uneven slice gaps"):
        read_volume(folder)


def test_empty_and_non_dicom_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ThinsliceError, match="is empty"):
        read_volume(empty)
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ThinsliceError, match="no DICOM series"):
        read_volume(empty)
    (tmp_path / "tree" / "study" / "series").mkdir(parents=True)
    with pytest.raises(ThinsliceError, match="subfolder"):
        read_volume(tmp_path / "tree")


def test_bad_files(tmp_path):
    with pytest.raises(ThinsliceError, match="does not exist"):
        read_volume(tmp_path / "nope.nii.gz")
    garbage = tmp_path / "x.nii.gz"
    garbage.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(ThinsliceError, match="corrupt") as err:
        read_volume(garbage)
    assert "\n" not in str(err.value)
    other = tmp_path / "x.xyz"
    other.write_bytes(b"hello")
    with pytest.raises(ThinsliceError, match="unsupported file type"):
        read_volume(other)
    fake_dcm = tmp_path / "x.dcm"
    fake_dcm.write_bytes(b"not dicom")
    with pytest.raises(ThinsliceError, match="DICOM"):
        read_volume(fake_dcm)


def test_2d_and_single_slice_inputs(tmp_path, phantom):
    png = tmp_path / "slice.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.uint8)), str(png))
    with pytest.raises(ThinsliceError, match="2D image"):
        read_volume(png)
    nifti2d = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(nifti2d))
    with pytest.raises(ThinsliceError, match="2D image"):
        read_volume(nifti2d)
    one = tmp_path / "one.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 8, 8), np.int16)), str(one))
    with pytest.raises(ThinsliceError, match="only one slice"):
        read_volume(one)
    folder = tmp_path / "single_dicom"
    folder.mkdir()
    write_dicom_series(Volume(phantom.array[:1], phantom.spacing), folder)
    with pytest.raises(ThinsliceError, match="only one slice"):
        read_volume(folder)


def test_nifti_without_voxel_size(tmp_path):
    path = tmp_path / "nospacing.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 8), np.int16)), str(path))
    raw = bytearray(path.read_bytes())
    raw[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)  # pixdim[1..3]; writers refuse to write zeros themselves
    raw[252:256] = struct.pack("<hh", 0, 0)  # no qform/sform either
    path.write_bytes(bytes(raw))
    with pytest.raises(ThinsliceError, match="no voxel size"):
        read_volume(path)


def test_output_safety(tmp_path, phantom):
    src = write_volume(phantom, tmp_path / "in.nii.gz")
    vol = read_volume(src)
    with pytest.raises(ThinsliceError, match="is the input"):
        write_volume(vol, tmp_path / "in.nii.gz", reference_input=src)
    with pytest.raises(ThinsliceError, match="is the input"):
        write_volume(vol, tmp_path / "." / "in.nii.gz", reference_input=src)
    (tmp_path / "adir.nii.gz").mkdir()
    with pytest.raises(ThinsliceError, match="existing folder"):
        write_volume(vol, tmp_path / "adir.nii.gz")
    with pytest.raises(ThinsliceError, match="unknown output format"):
        write_volume(vol, tmp_path / "out.png")
    with pytest.raises(ThinsliceError, match="series folder"):
        write_volume(vol, tmp_path / "out.dcm")
    series = write_volume(vol, tmp_path / "series")
    with pytest.raises(ThinsliceError, match="not empty"):
        write_volume(vol, series)
    with pytest.raises(ThinsliceError, match="is the input"):
        write_volume(vol, series, reference_input=series, overwrite=True)
    write_volume(vol.with_array(vol.array + 1), series, overwrite=True)
    assert len(list(series.iterdir())) == 16
    np.testing.assert_array_equal(read_volume(series).array, np.rint(phantom.array) + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.nii.gz", "in.nii.gz", "series"]


def test_info_command(tmp_path, phantom, capsys):
    path = write_volume(phantom, tmp_path / "v.nii.gz")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "32 x 32 x 16" in out and "slice axis:      k" in out and "slice thickness: 3 mm" in out
    assert main(["info", str(tmp_path / "missing.nii.gz")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_nan_voxels_are_a_clear_error(tmp_path):
    array = np.zeros((8, 8, 8), np.float32)
    array[2, 3, 4] = np.nan
    path = tmp_path / "nan.nrrd"  # (SimpleITK's NIfTI reader already turns NaN into 0; NRRD keeps it)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    with pytest.raises(ThinsliceError, match="1 NaN or infinite voxels"):
        read_volume(path)
    assert main(["upsample", str(path), str(tmp_path / "out.nii.gz"), "--spacing", "0.5"]) == 2
    assert not (tmp_path / "out.nii.gz").exists()


def test_atomic_outputs_get_normal_permissions(tmp_path):
    """mkstemp makes private files; results (text, weights, volumes) must be readable like any other file."""
    import os
    import stat

    from thinslice.io.atomic import atomic_output, current_umask, write_text_atomic

    expected = 0o666 & ~current_umask()
    text = write_text_atomic(tmp_path / "a" / "report.json", "{}")
    assert stat.S_IMODE(text.stat().st_mode) == expected and text.read_text() == "{}"
    target = tmp_path / "b.bin"
    target.write_bytes(b"old")
    try:
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash while writing")
    except RuntimeError:
        pass
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["a", "b.bin"]  # no temp left


def test_simpleitk_is_loaded_only_when_a_file_is_read_or_written(tmp_path) -> None:
    """Importing the package (training and inference on arrays) does not need SimpleITK; reading a file does."""
    import subprocess
    import sys

    code = ("import sys, thinslice.io, thinslice.infer.upsample, thinslice.train.planes\n"
            "assert 'SimpleITK' not in sys.modules, 'imported at package import'\n")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
    from thinslice.io.lazy import lazy_import

    missing = lazy_import("thinslice_no_such_package")
    with pytest.raises(ThinsliceError, match="pip install thinslice_no_such_package"):
        missing.ReadImage("x")
