"""Reliability: damaged inputs are refused, failed writes leave the previous output, leftovers are cleaned up."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import SimpleITK as sitk

from thinslice.cli.main import main
from thinslice.data.phantom import make_chest_phantom
from thinslice.errors import ThinsliceError
from thinslice.io import read_volume, write_volume
from thinslice.io.atomic import TEMP_PREFIX


@pytest.fixture(scope="module")
def small():
    return make_chest_phantom(shape=(16, 32, 32), spacing=(2.0, 2.0, 2.0), seed=7)


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii"])
def test_truncated_nifti_is_refused(tmp_path, small, name) -> None:
    path = tmp_path / name
    write_volume(small, path)
    data = path.read_bytes()
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ThinsliceError, match="truncated"):
        read_volume(cut)
    assert main(["info", str(cut)]) == 2


def test_corrupt_gzip_crc_is_refused(tmp_path, small) -> None:
    path = tmp_path / "v.nii.gz"
    write_volume(small, path)
    raw = gzip.decompress(path.read_bytes())
    broken = bytearray(gzip.compress(raw))
    broken[-8] ^= 0xFF  # the CRC32 of the gzip trailer
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(broken))
    with pytest.raises(ThinsliceError, match="corrupt"):
        read_volume(bad)


@pytest.mark.parametrize("name", ["out.nii.gz", "out.nii", "out.mha"])
def test_a_write_that_fails_silently_keeps_the_previous_file(tmp_path, small, monkeypatch, name) -> None:
    """Like ITK's NIfTI writer on a full disk: no exception, a truncated file. The old output must survive."""
    out = tmp_path / name
    write_volume(small, out)
    before = out.read_bytes()
    real_write = sitk.WriteImage

    def truncating_write(image, filename, *args, **kwargs):
        real_write(image, filename, *args, **kwargs)
        with open(filename, "r+b") as fh:
            fh.truncate(os.path.getsize(filename) // 2)

    monkeypatch.setattr(sitk, "WriteImage", truncating_write)
    bigger = make_chest_phantom(shape=(24, 32, 32), spacing=(2.0, 2.0, 2.0), seed=8)
    with pytest.raises(ThinsliceError, match="does not read back|truncated"):
        write_volume(bigger, out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary left behind


def test_os_errors_are_one_line(tmp_path, small, monkeypatch, capsys) -> None:
    import thinslice.io.writers as writers

    src = tmp_path / "thin.nii.gz"
    write_volume(small, src)

    def read_only(parent):
        raise OSError(30, "Read-only file system", str(parent))

    monkeypatch.setattr(writers, "make_temp_dir", read_only)
    assert main(["degrade", str(src), str(tmp_path / "thick.nii.gz"), "--factor", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Read-only file system" in err[0]


def test_stale_temporaries_of_dead_runs_are_removed_on_the_next_write(tmp_path, small) -> None:
    """A temporary goes when its lock can be taken (its writer ended), or, without a lock file (older versions), when
    a day old; one whose lock is held stays, whatever process id its name carries."""
    import fcntl

    dead = tmp_path / f"{TEMP_PREFIX}999999999-abcdefgh"
    dead.mkdir()
    (dead / "half.nii.gz").write_bytes(b"\x00" * 10)
    (tmp_path / f"{dead.name}.lock").write_bytes(b"")
    old_file = tmp_path / f"{TEMP_PREFIX}999999999-out.nii.gz.x.tmp"
    old_file.write_bytes(b"\x00")
    os.utime(old_file, (1e9, 1e9))
    busy = tmp_path / f"{TEMP_PREFIX}999999999-busybusy"  # a live writer's folder is left alone
    busy.mkdir()
    with open(tmp_path / f"{busy.name}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        write_volume(small, tmp_path / "v.nii.gz")
    assert not dead.exists() and not old_file.exists() and busy.exists()


def test_output_values_round_trip_exactly(tmp_path, small) -> None:
    """The read-back check compares exactly; float32 outputs (with NaN-free values) pass it unchanged."""
    write_volume(small, tmp_path / "f.nrrd", dtype="float32")
    np.testing.assert_array_equal(read_volume(tmp_path / "f.nrrd").array, small.array)


def test_implausible_thickness_is_refused_and_a_contradicting_one_reported(small, caplog) -> None:
    from thinslice.degrade.pairs import simulate_pair
    from thinslice.infer.upsample import upsample

    thick, _ = simulate_pair(small, factor=2, profile="gaussian")  # 4 mm slices, recorded thickness 4 mm
    with pytest.raises(ThinsliceError, match="more than 6x the slice spacing.*file records 4 mm"):
        upsample(thick, 2.0, method="cubic-dc", thickness=100.0)
    with caplog.at_level("WARNING", logger="thinslice"):
        upsample(thick, 2.0, method="cubic-dc", thickness=8.0)
    assert "differs from the 4 mm the file records" in caplog.text
    # A slab thinner than the output spacing (gapped acquisitions, e.g. 1 mm every 10 mm) is modelled as a sample.
    out = upsample(thick, 2.0, method="cubic-dc", thickness=0.5)
    assert np.isfinite(out.array).all()


def test_an_output_grid_that_cannot_fit_in_memory_is_refused_before_work(small, monkeypatch) -> None:
    import psutil

    from thinslice.infer.upsample import upsample

    class Tiny:
        available = 1 << 20

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    with pytest.raises(ThinsliceError, match=r"available: choose a coarser --spacing"):
        upsample(small, 0.1, method="cubic")  # 320 slices: 4 MB of work, over 1 MB


def test_the_command_line_parses_without_importing_torch() -> None:
    """Heavy imports (torch, MONAI: 2 of the 3.3 s start-up) happen after argument parsing."""
    import subprocess
    import sys

    code = ("import sys; from thinslice.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'monai', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_values_that_are_not_ct_hu_are_reported(tmp_path, caplog) -> None:
    from thinslice.io.volume import Volume

    mr = Volume(np.random.default_rng(0).uniform(0, 4000, (8, 16, 16)).astype(np.float32), (1.0, 1.0, 2.0))
    write_volume(mr, tmp_path / "mr.nii.gz", dtype="float32")
    with caplog.at_level("WARNING", logger="thinslice"):
        read_volume(tmp_path / "mr.nii.gz")
    assert "does not look like CT in Hounsfield units" in caplog.text


def test_a_nifti_whose_qform_and_sform_disagree_is_read_by_its_sform(tmp_path, small, caplog) -> None:
    """A negative slice voxel size, which ITK takes as a flip of the qform's slice axis (z reversed), is read as
    nibabel does: the sform, with a warning."""
    import struct

    path = tmp_path / "v.nii"
    write_volume(small, path)
    header = bytearray(path.read_bytes())
    header[88:92] = struct.pack("<f", -struct.unpack("<f", header[88:92])[0])  # pixdim[3] < 0
    bad = tmp_path / "conflict.nii"
    bad.write_bytes(bytes(header))
    with caplog.at_level("WARNING", logger="thinslice"):
        vol = read_volume(bad)
    assert "negative voxel size" in caplog.text
    good = read_volume(path)
    np.testing.assert_allclose(vol.direction, good.direction, atol=1e-6)
    np.testing.assert_allclose(vol.origin, good.origin, atol=1e-4)
    np.testing.assert_array_equal(vol.array, good.array)
