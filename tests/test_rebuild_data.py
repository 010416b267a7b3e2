"""benchmarks/rebuild_data.py: a manifest entry is rebuilt from a git mirror, cropped and checked by checksum."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from thinslice.io import read_volume, write_volume

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module():
    spec = importlib.util.spec_from_file_location("rebuild_data", BENCH / "rebuild_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["rebuild_data"] = module
    spec.loader.exec_module(module)
    return module


def _world(volume, ijk) -> np.ndarray:
    return np.asarray(volume.origin) + np.asarray(volume.direction) @ (np.asarray(volume.spacing) * np.asarray(ijk))


def test_crop_keeps_every_voxel_where_it_was(thin_phantom) -> None:
    rb = _module()
    box = {"i": [5, 50], "j": [3, 60], "k": [2, 40]}
    cropped = rb.crop(thin_phantom, box)
    np.testing.assert_array_equal(cropped.array, thin_phantom.array[2:40, 3:60, 5:50])
    np.testing.assert_allclose(_world(cropped, (0, 0, 0)), _world(thin_phantom, (5, 3, 2)))
    np.testing.assert_allclose(_world(cropped, (10, 7, 4)), _world(thin_phantom, (15, 10, 6)))
    assert cropped.spacing == thin_phantom.spacing and rb.crop(thin_phantom, None) is thin_phantom


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def mirrored_series(tmp_path, thin_phantom):
    """A DICOM series committed to a repository laid out as the mirror folder holds it, and its manifest entry."""
    repo = tmp_path / "mirrors" / "someone+ct-data"
    write_volume(thin_phantom, repo / "scans" / "chest" / "", dtype="int16")
    (repo / "README.md").write_text("not part of the series\n")
    _git(repo.parent, "init", "-q", repo.name)
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "data")
    files = sorted((repo / "scans" / "chest").glob("*.dcm"))
    rb = _module()
    box = {"i": [4, 60], "j": [6, 58], "k": [0, thin_phantom.num_slices]}
    expected = rb.crop(read_volume(repo / "scans" / "chest"), box)
    entry = {"name": "tcx_test", "crop": box, "shape": list(expected.shape_ijk),
             "sha256_voxels": rb.voxel_sha256(expected),
             "source": {"kind": "github", "repo": "someone/ct-data", "commit": _git(repo, "rev-parse", "HEAD"),
                        "folder": "scans/chest", "pattern": "*.dcm", "files": len(files)}}
    return rb, entry, tmp_path / "mirrors"


def test_rebuild_matches_the_manifest_and_is_reproducible(mirrored_series, tmp_path) -> None:
    rb, entry, mirrors = mirrored_series
    assert rb.missing_reason(entry["source"], mirrors, None) is None
    assert rb.rebuild_one(entry, mirrors, None, tmp_path / "out") == []
    written = tmp_path / "out" / "tcx_test.nii.gz"
    entry["sha256_nifti"] = rb.file_sha256(written)
    assert rb.rebuild_one(entry, mirrors, None, tmp_path / "again") == []  # the same bytes a second time
    back = read_volume(written)
    assert list(back.shape_ijk) == entry["shape"] and back.array.min() >= -1024


def test_rebuild_reports_changed_sources_and_missing_ones(mirrored_series, tmp_path) -> None:
    rb, entry, mirrors = mirrored_series
    changed = dict(entry, sha256_voxels="0" * 64)
    assert any("voxel checksum" in p for p in rb.rebuild_one(changed, mirrors, None, tmp_path / "out"))
    fewer = dict(entry, source=dict(entry["source"], files=entry["source"]["files"] + 1))
    assert any("files extracted" in p for p in rb.rebuild_one(fewer, mirrors, None, tmp_path / "out"))
    absent = dict(entry["source"], repo="nobody/none")
    assert "fetch github:nobody/none" in rb.missing_reason(absent, mirrors, None)
    assert "lacks commit" in rb.missing_reason(dict(entry["source"], commit="1" * 40), mirrors, None)
    wheel = {"kind": "pypi", "package": "pkg", "version": "1.0", "wheel": "pkg-1.0-py3-none-any.whl"}
    assert "pip download pkg==1.0" in rb.missing_reason(wheel, mirrors, tmp_path)


ALLOWED_LICENCES = {"CC BY 3.0", "CC BY 4.0", "CC0 1.0", "public domain"}
REQUIRED = {"name", "region", "source", "collection", "licence", "licence_evidence", "patient_id", "vendor", "kernel",
            "slice_thickness_mm", "slice_spacing_mm", "crop", "shape", "spacing_mm", "sha256_voxels", "sha256_nifti"}


def test_manifest_lists_only_thin_scans_that_may_train_shipped_weights() -> None:
    rb = _module()
    manifest = rb.load_manifest(rb.ROOT / "configs" / "data" / "thin_ct.json", None)
    assert manifest, "the manifest lists no volume"
    for entry in manifest:
        assert entry.keys() >= REQUIRED, f"{entry['name']} lacks {sorted(REQUIRED - entry.keys())}"
        assert entry["licence"] in ALLOWED_LICENCES, f"{entry['name']}: {entry['licence']} is not allowed"
        assert entry["slice_spacing_mm"] <= 1.25 and entry["spacing_mm"][2] == pytest.approx(entry["slice_spacing_mm"])
        assert [hi - lo for lo, hi in (entry["crop"][a] for a in "ijk")] == entry["shape"]
    names = [e["name"] for e in manifest]
    assert len(set(names)) == len(names) and len({e["sha256_voxels"] for e in manifest}) == len(names)
