"""Hostile and damaged DICOM input: a header that does not match its pixel data, impossible spacing or geometry, one
bad file in a series, duplicates, old files without file meta, DICOMDIR exports, SEG objects and dose screens; and
what a DICOM output keeps of its source (modality, value steps, display window).

Every damaged input ends in one line that names the file and what is wrong with it; every odd but valid input gives
the values a careful reader (pydicom, dcm2niix) finds. Inputs come from :mod:`thinslice.data.odd`.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from thinslice.cohort.discover import discover
from thinslice.data import odd
from thinslice.errors import ThinsliceError
from thinslice.io import read_volume, write_volume

needs_dcm2niix = pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix is not installed")


def _same_world_voxels(a, b) -> float:
    """Largest difference between ``a`` and ``b`` sampled (nearest) on ``a``'s grid: 0 when the grids coincide."""
    import SimpleITK as sitk

    from thinslice.io.writers import volume_to_image

    ref, moving = volume_to_image(a), volume_to_image(b)
    resampled = sitk.GetArrayFromImage(sitk.Resample(moving, ref, sitk.Transform(), sitk.sitkNearestNeighbor, -9e3))
    return float(np.abs(resampled - a.array).max())


def _refused(path, *texts: str) -> str:
    with pytest.raises(ThinsliceError) as info:
        read_volume(path)
    message = str(info.value)
    assert "\n" not in message and all(text in message for text in texts), message
    return message


# ------------------------------------------------------------------------------- pixel data against the header
@pytest.mark.parametrize("lie", sorted(odd.HEADER_LIES))
def test_pixel_data_that_does_not_match_the_header_is_refused_naming_the_file(tmp_path, lie):
    path = tmp_path / f"{lie}.dcm"
    odd.lying_header_file(path, lie)
    expected = 64 * 64 * 2 * {"frames": 4, "rows": 4, "bits": 2, "huge_frames": 100000}[lie]
    _refused(path, f"{lie}.dcm", "pixel data holds 8192 bytes", f"describes {expected}")


def test_a_truncated_slice_is_named_with_the_bytes_present(tmp_path):
    odd.series_with_bad_file(tmp_path / "s", "truncated")
    _refused(tmp_path / "s", "IMG0003.dcm", "cut short: 1348 of 2048 bytes", "replace it with an intact copy")


def test_compressed_pixel_data_with_fewer_frames_than_the_header_is_refused(tmp_path):
    odd.compressed_series(tmp_path / "ok")
    assert read_volume(tmp_path / "ok").shape_ijk == (32, 32, 6)  # well-formed RLE: no false alarm
    odd.compressed_series(tmp_path / "lie", claimed_frames=3)
    _refused(tmp_path / "lie", "IMG0002.dcm: its compressed pixel data holds 1 frame(s)", "describes 3")


def test_a_header_beyond_any_memory_is_refused_before_decoding(tmp_path):
    odd.huge_series(tmp_path / "big", files=16)
    assert sum(p.stat().st_blocks for p in (tmp_path / "big").iterdir()) * 512 < 10**6  # sparse: nothing stored
    _refused(tmp_path / "big", "45000x45000x16 voxels", "GB to read", "GB of memory is available")


# ---------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("spacing, text", [("0\\0", "PixelSpacing 0\\0 is not a voxel size"),
                                           ("-0.7\\-0.7", "PixelSpacing -0.7\\-0.7"),
                                           ("nan\\nan", "PixelSpacing holds NaN"),
                                           ("1e6\\1e6", "PixelSpacing 1e6\\1e6")])
def test_impossible_pixel_spacing_is_refused_not_taken_as_1_mm(tmp_path, spacing, text):
    odd.series_with_spacing(tmp_path / "s", spacing)
    _refused(tmp_path / "s", "IMG0000.dcm", text, "every other file")


@pytest.mark.parametrize("damage, text", [
    ("no_position", "IMG0003.dcm: no ImagePositionPatient, unlike the other files"),
    ("nan_orientation", "IMG0003.dcm: ImageOrientationPatient holds NaN"),
    ("nan_position", "IMG0003.dcm: ImagePositionPatient holds NaN"),
    ("same_uid", "IMG0003.dcm and IMG0005.dcm: the same instance"),
    ("huge_length", "IMG0003.dcm (element (0008,2111) claims 65535 bytes, past the end"),
])
def test_one_bad_file_in_a_series_is_named_with_what_is_wrong(tmp_path, capfd, damage, text):
    odd.series_with_bad_file(tmp_path / "s", damage)
    _refused(tmp_path / "s", text)
    assert "vnl" not in capfd.readouterr().err  # no native numerical text on the terminal


def test_the_same_file_twice_is_read_once(tmp_path, caplog):
    odd.series_with_bad_file(tmp_path / "s", "duplicate")
    with caplog.at_level("WARNING", logger="thinslice"):
        vol = read_volume(tmp_path / "s")
    assert "IMG_copy.dcm is the same instance as IMG0003.dcm" in caplog.text
    (tmp_path / "s" / "IMG_copy.dcm").unlink()
    np.testing.assert_array_equal(vol.array, read_volume(tmp_path / "s").array)
    assert vol.shape_ijk[2] == 8


# -------------------------------------------------------------------------------------- old and odd archives
def test_old_files_without_file_meta_keep_the_study_in_a_dicom_output(tmp_path):
    paths = odd.acr_nema_series(tmp_path / "old")
    assert paths[0].read_bytes()[128:132] != b"DICM"
    source = pydicom.dcmread(paths[0], force=True)
    write_volume(read_volume(tmp_path / "old"), tmp_path / "out")
    out = pydicom.dcmread(sorted((tmp_path / "out").iterdir())[0])
    for keyword in ("PatientName", "StudyDate", "StudyID", "StudyDescription", "PatientPosition",
                    "StudyInstanceUID", "FrameOfReferenceUID"):
        assert str(out.get(keyword)) == str(source.get(keyword)) != "", keyword


def test_batch_discovery_reads_old_files_as_the_reader_does(tmp_path):
    odd.acr_nema_series(tmp_path / "old")
    found, skipped = discover([tmp_path])
    assert len(found) == 1 and not skipped
    assert found[0].series_uid == str(pydicom.dcmread(sorted((tmp_path / "old").iterdir())[0], force=True)
                                      .SeriesInstanceUID)


def test_a_dicomdir_export_is_followed(tmp_path):
    written = odd.dicomdir_export(tmp_path / "cd")
    assert not any(p.is_file() and p.name != "DICOMDIR" for p in (tmp_path / "cd").iterdir())
    for path in (tmp_path / "cd", tmp_path / "cd" / "DICOMDIR"):
        vol = read_volume(path)
        assert vol.shape_ijk == written.shape_ijk and vol.grid_differences(written) == []
        assert np.abs(vol.array - written.array).max() <= 0.5  # int16 rounding


def test_a_segmentation_is_refused_as_one(tmp_path):
    odd.segmentation_object(tmp_path / "seg.dcm")
    _refused(tmp_path / "seg.dcm", "is a segmentation object (SEG), not an image series")


def test_dose_screens_are_skipped_by_batch_discovery_not_failed(tmp_path):
    odd.write_series(odd.phantom(n=6), tmp_path / "study")
    odd.exam_summary(tmp_path / "study")
    found, skipped = discover([tmp_path])
    assert len(found) == 1
    assert len(skipped) == 1 and "secondary capture" in skipped[0].reason and "dose report" in skipped[0].reason


# ----------------------------------------------------------------------------------------- what output keeps
def test_fractional_rescale_slope_values_survive_nifti_and_dicom_outputs(tmp_path, caplog):
    truth = odd.fractional_slope_series(tmp_path / "in", slope=0.001)
    vol = read_volume(tmp_path / "in")
    assert vol.metadata["value_step"] == "0.001"
    np.testing.assert_allclose(vol.array, truth, atol=1e-5)
    with caplog.at_level("WARNING", logger="thinslice"):
        nifti = write_volume(vol, tmp_path / "out.nii.gz")  # the default int16 would keep 21 levels
    assert "written as float32" in caplog.text
    np.testing.assert_allclose(read_volume(nifti).array, truth, atol=1e-5)
    write_volume(vol, tmp_path / "out")
    assert pydicom.dcmread(sorted((tmp_path / "out").iterdir())[0]).RescaleSlope == pytest.approx(0.001)
    np.testing.assert_allclose(read_volume(tmp_path / "out").array, truth, atol=1e-5)


def test_a_dicom_output_carries_the_source_window(tmp_path):
    odd.series_with_window(tmp_path / "head", "40", "80")
    write_volume(read_volume(tmp_path / "head"), tmp_path / "out")
    out = pydicom.dcmread(sorted((tmp_path / "out").iterdir())[0])
    assert (float(out.WindowCenter), float(out.WindowWidth)) == (40.0, 80.0)
    write_volume(odd.phantom(n=4), tmp_path / "plain")  # no source window: the lung window
    out = pydicom.dcmread(sorted((tmp_path / "plain").iterdir())[0])
    assert (float(out.WindowCenter), float(out.WindowWidth)) == (-600.0, 1500.0)


@pytest.mark.parametrize("modality", ["MR", "PT"])
def test_dicom_output_of_mr_or_pet_is_refused_and_nifti_allowed(tmp_path, modality):
    odd.series_with_window(tmp_path / "in", modality=modality, Units="BQML")
    vol = read_volume(tmp_path / "in")
    with pytest.raises(ThinsliceError, match=f"the input is {modality} .*writes DICOM output only as CT"):
        write_volume(vol, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert write_volume(vol, tmp_path / "out.nii.gz").is_file()


@needs_dcm2niix
def test_fractional_slope_values_agree_with_dcm2niix(tmp_path):
    odd.fractional_slope_series(tmp_path / "in")
    (tmp_path / "nii").mkdir()
    subprocess.run(["dcm2niix", "-z", "n", "-f", "ref", "-o", str(tmp_path / "nii"), str(tmp_path / "in")],
                   capture_output=True, check=True)
    ref = read_volume(tmp_path / "nii" / "ref.nii")
    assert _same_world_voxels(read_volume(tmp_path / "in"), ref) < 1e-5


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy is not installed")
@pytest.mark.parametrize("source", ["slope", "window", "old"])
def test_dciodvfy_finds_no_error_in_outputs_that_carry_slope_window_and_old_studies(tmp_path, source):
    spec = importlib.util.spec_from_file_location(
        "dicom_output_check", Path(__file__).parents[2] / "benchmarks" / "dicom_output_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    build = {"slope": odd.fractional_slope_series, "window": odd.series_with_window, "old": odd.acr_nema_series}
    build[source](tmp_path / "in")
    out = write_volume(read_volume(tmp_path / "in"), tmp_path / "out")
    assert check.dciodvfy_errors(sorted(out.iterdir())[0]) == []
