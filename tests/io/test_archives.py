"""Real-archive oddities (issue 18, items 1-11): geometry is right or refused, every odd file is one line.

The inputs come from :mod:`thinslice.data.odd` (the chest phantom written with the odd property); where dcm2niix is
installed, the geometry is also compared with its conversion of the same files.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from thinslice.cli.main import main
from thinslice.data import odd
from thinslice.errors import ThinsliceError
from thinslice.io import list_dicom_series, read_volume, write_volume

DCM2NIIX = shutil.which("dcm2niix")
needs_dcm2niix = pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix is not installed (apt-get install dcm2niix)")


def _marker_world(vol):
    return odd.world(vol, odd.marker_index(vol))


def _orthonormal(vol) -> bool:
    return bool(np.allclose(vol.direction.T @ vol.direction, np.eye(3), atol=1e-9))


@pytest.mark.parametrize("qform", [True, False])
def test_a_sheared_nifti_is_resampled_onto_its_true_geometry(tmp_path, qform, caplog):
    expected = odd.sheared_nifti(tmp_path / "tilt.nii", qform=qform)
    with caplog.at_level("WARNING", logger="thinslice"):
        vol = read_volume(tmp_path / "tilt.nii")
    assert "sheared by 15.0 degrees" in caplog.text and _orthonormal(vol)
    np.testing.assert_allclose(_marker_world(vol), expected, atol=1e-3)
    out = read_volume(write_volume(vol, tmp_path / "out.nii.gz", dtype="float32"))  # an orthogonal file now
    np.testing.assert_allclose(_marker_world(out), expected, atol=1e-3)


def test_a_tilted_dicom_series_keeps_every_world_position(tmp_path):
    expected = odd.tilted_series(tmp_path / "tilt")
    vol = read_volume(tmp_path / "tilt")
    assert _orthonormal(vol) and vol.slice_axis == 2 and float(vol.metadata["gantry_tilt_deg"]) == pytest.approx(15)
    np.testing.assert_allclose(_marker_world(vol), expected, atol=1e-3)


def _dcm2niix(folder, out):
    out.mkdir()
    subprocess.run([DCM2NIIX, "-z", "n", "-f", "out", "-o", str(out), str(folder)], capture_output=True, check=True)
    return out


def _same_world_voxels(a, b) -> float:
    """Largest difference between ``a`` and ``b`` sampled (nearest) on ``a``'s grid: 0 when the grids coincide."""
    import SimpleITK as sitk

    from thinslice.io.writers import volume_to_image

    ref, moving = volume_to_image(a), volume_to_image(b)
    resampled = sitk.GetArrayFromImage(sitk.Resample(moving, ref, sitk.Transform(), sitk.sitkNearestNeighbor, -9e3))
    return float(np.abs(resampled - a.array).max())


@needs_dcm2niix
def test_tilt_and_sagittal_geometry_agree_with_dcm2niix(tmp_path):
    odd.tilted_series(tmp_path / "tilt")
    converted = _dcm2niix(tmp_path / "tilt", tmp_path / "tilt_nii")
    ours = read_volume(tmp_path / "tilt")
    # dcm2niix's uncorrected output stores the tilt as a sheared sform; read through it, the voxels coincide.
    assert _same_world_voxels(ours, read_volume(converted / "out.nii")) < 0.05  # HU; dcm2niix stores float32
    written = odd.sagittal_series(tmp_path / "sag")
    sag = read_volume(tmp_path / "sag")
    assert _same_world_voxels(sag, read_volume(_dcm2niix(tmp_path / "sag", tmp_path / "sag_nii") / "out.nii")) == 0
    assert _same_world_voxels(sag, written) <= 0.5  # int16 rounding of the written phantom


def test_a_sagittal_series_is_cut_along_its_stacking_axis(tmp_path):
    odd.sagittal_series(tmp_path / "sag")
    vol = read_volume(tmp_path / "sag")
    assert vol.slice_axis == 2 and vol.num_slices == 14 and vol.slice_spacing == pytest.approx(1.1)
    assert np.argmax(np.abs(vol.direction[:, 2])) == 0  # left-right
    back = read_volume(write_volume(vol, tmp_path / "sag.mha"))  # recorded for NRRD/MHA round trips
    assert back.slice_axis == 2


@pytest.mark.parametrize("kind", ["radiographs", "enhanced"])
def test_dicom_without_a_slice_geometry_is_refused_in_one_line(tmp_path, kind, capsys):
    folder = tmp_path / kind
    if kind == "radiographs":
        odd.radiographs(folder)
    else:
        folder.mkdir()
        odd.enhanced_multiframe(folder / "mr.dcm")
    expected = "no patient geometry" if kind == "radiographs" else "dcm2niix"
    with pytest.raises(ThinsliceError, match=expected):
        read_volume(folder)
    assert main(["info", str(folder)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_unreadable_files_are_skipped_with_a_note_naming_them(tmp_path, capfd):
    folder = tmp_path / "mixed"
    odd.write_series(odd.phantom(), folder)
    odd.overlay_object(folder / "ot.dcm")
    odd.damaged_file(folder / "broken.dcm")
    assert main(["info", str(folder), "--series", "1"]) == 0
    err = capfd.readouterr().err
    assert err.strip().splitlines() == [f"thinslice info: warning: {folder}: skipped 1 file(s) that are not readable "
                                        "DICOM: broken.dcm"]  # pydicom's and ITK's own messages: debug log only
    assert main(["info", str(folder), "--series", "99"]) == 2  # the OT object: one line, not a traceback
    assert "no patient geometry" in capfd.readouterr().err


def test_a_topogram_with_the_series_uid_is_split_off_by_orientation(tmp_path, caplog):
    odd.series_with_topogram(tmp_path / "topo")
    series = list_dicom_series(tmp_path / "topo")
    assert sorted(s.orientation for s in series) == ["axial", "coronal"]
    assert {s.label.rsplit(":", 1)[1] for s in series} == {"axial", "coronal"}
    with caplog.at_level("INFO", logger="thinslice"):
        vol = read_volume(tmp_path / "topo")
    assert vol.num_slices == 10 and "2 coronal image(s) of another orientation" in caplog.text


def test_mixed_image_sizes_and_sparse_stacks(tmp_path, capsys):
    odd.mixed_size_series(tmp_path / "mixed")
    with pytest.raises(ThinsliceError, match=r"mixes image sizes 32x32 \(8 files\), 24x24 \(2 files\)"):
        read_volume(tmp_path / "mixed")
    odd.sparse_series(tmp_path / "sparse")
    assert main(["upsample", str(tmp_path / "sparse"), str(tmp_path / "o.nii.gz"), "--spacing", "5", "--method",
                 "cubic"]) == 0
    assert "sparse stack (2 slices 45 mm apart" in capsys.readouterr().err


@pytest.fixture(scope="module")
def thick5(tmp_path_factory):
    """Eight 5 mm slices of 24 x 24 pixels."""
    path = tmp_path_factory.mktemp("thick") / "thick5.nii.gz"
    return write_volume(odd.phantom(n=8, size=24, spacing=(1.0, 1.0, 5.0)), path)


def test_a_spacing_near_a_divisor_is_snapped_and_the_suggestion_is_accepted(thick5):
    from thinslice.infer.upsample import upsample

    thick = read_volume(thick5)
    for request in (1.667, 1.6667, 1.67):
        out = upsample(thick, request, method="cubic")
        assert out.num_slices == 24 and out.slice_spacing == pytest.approx(5 / 3, abs=1e-12)
    with pytest.raises(ThinsliceError, match=r"use --spacing 1.25 \(the nearest finer one\)"):
        upsample(thick, 1.5, method="planes")
    assert upsample(thick, 1.667, method="planes").num_slices == 24  # the request that crashed


@pytest.mark.parametrize("value", ["0", "-0", "nan", "inf"])
def test_zero_nan_and_infinite_spacing_or_thickness_are_one_line(thick5, tmp_path, value, capsys):
    out = str(tmp_path / "o.nii.gz")
    assert main(["upsample", str(thick5), out, "--spacing", value]) == 2
    assert main(["upsample", str(thick5), out, "--spacing", "2.5", "--thickness", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"thinslice upsample: error: --spacing must be a positive number of mm, got {float(value):g}",
                   f"thinslice upsample: error: --thickness must be a positive number of mm, got {float(value):g}"]


@pytest.mark.parametrize("output", ["o.xyz", "o.dcm", "full/", "/dev/stdout", "-", "/dev/null"])
def test_bad_output_paths_are_refused_before_the_input_is_read(tmp_path, output, monkeypatch, capsys):
    import thinslice.io as io

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(io, "read_volume", lambda *a, **k: pytest.fail("the input was read"))
    assert main(["upsample", str(tmp_path / "in.nii.gz"), output, "--spacing", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0]
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not (tmp_path / "-").exists()


def test_the_listing_is_one_line_per_series_sorted_by_number_with_headers_read_once(tmp_path, monkeypatch, capsys):
    import thinslice.io.discovery as discovery

    odd.many_series(tmp_path / "study", series=5, slices=3, size=16)
    files = len(list((tmp_path / "study").iterdir()))
    calls = []
    real = discovery.pydicom.dcmread
    monkeypatch.setattr(discovery.pydicom, "dcmread", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert main(["info", str(tmp_path / "study")]) == 0
    assert len(calls) == files  # every header once
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 5 + 1
    numbers = [int(line.split()[0][1:]) for line in lines[1:6]]
    assert numbers == [1, 2, 3, 4, 5] and all("CT   axial" in line and "3 images  3 mm" in line for line in lines[1:6])
    assert lines[-1] == "also 1 single or scout image(s) (CT 1) and 1 non-image object(s) (RTSTRUCT 1): not volumes"
    with pytest.raises(ThinsliceError, match="holds 5 image series; pick one with --series") as err:
        read_volume(tmp_path / "study")
    assert len(err.value.details) == 6
    assert read_volume(tmp_path / "study", series_uid="4").metadata["series_description"] == "series 4 SOFT"


def test_an_in_plane_shear_is_refused_in_one_line(tmp_path):
    import struct

    odd.sheared_nifti(tmp_path / "tilt.nii")
    header = bytearray((tmp_path / "tilt.nii").read_bytes())
    header[284:288] = struct.pack("<f", 0.3)  # srow_x[1]: the j axis leans into i as well
    (tmp_path / "skew.nii").write_bytes(bytes(header))
    with pytest.raises(ThinsliceError, match="in-plane axes of the image are not perpendicular"):
        read_volume(tmp_path / "skew.nii")
