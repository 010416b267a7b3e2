"""gzip at disk speed: .nii.gz written and read with ISA-L where present, the standard library otherwise."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from thinslice.data.phantom import make_chest_phantom
from thinslice.errors import ThinsliceError
from thinslice.io import gz, read_volume, write_volume


@pytest.fixture(scope="module")
def volume():
    return make_chest_phantom(shape=(24, 48, 48), spacing=(1.0, 1.0, 1.25), seed=4)


@pytest.mark.parametrize("engine", ["isal", "zlib"])
def test_either_engine_writes_a_plain_gzip_stream_that_reads_back(engine, volume, tmp_path, monkeypatch) -> None:
    if engine == "isal" and gz.igzip is None:
        pytest.skip("isal is not installed")
    monkeypatch.setattr(gz, "ENGINE", engine)
    path = write_volume(volume, tmp_path / "ct.nii.gz")
    with gzip.open(path, "rb") as fh:  # the standard library (and so nibabel, ITK, FSL) reads it
        assert len(fh.read()) > volume.array.size * 2
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, np.rint(volume.array))
    assert not list(tmp_path.glob("*.nii"))  # the uncompressed intermediate never reaches the folder


def test_the_level_trades_size_for_time_and_a_bad_level_is_one_line(volume, tmp_path, monkeypatch) -> None:
    sizes = {}
    for level in ("0", "3") if gz.engine() == "isal" else ("1", "9"):
        monkeypatch.setenv(gz.LEVEL_ENV, level)
        sizes[level] = write_volume(volume, tmp_path / f"l{level}.nii.gz").stat().st_size
    low, high = sorted(sizes, key=int)
    assert sizes[low] > sizes[high]
    monkeypatch.setenv(gz.LEVEL_ENV, "fast")
    with pytest.raises(ThinsliceError, match="THINSLICE_GZIP_LEVEL"):
        write_volume(volume, tmp_path / "bad.nii.gz")


def test_a_cut_stream_is_refused_by_either_engine(volume, tmp_path, monkeypatch) -> None:
    path = write_volume(volume, tmp_path / "ct.nii.gz")
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for engine in ("isal", "zlib") if gz.igzip is not None else ("zlib",):
        monkeypatch.setattr(gz, "ENGINE", engine)
        with pytest.raises(ThinsliceError, match="truncated or corrupt"):
            read_volume(cut)
