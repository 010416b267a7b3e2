"""``thinslice batch``: discovery in a DICOM tree with the usual clutter, the ledger, re-runs, resume after kill -9,
the manifest, the QC page, and the local pool and Ray runners (all with cubic-dc: fast, no weights)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from thinslice.cli.main import main
from thinslice.cohort import RayOptions, Settings, run_batch
from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade.profiles import degrade
from thinslice.io import read_volume, write_volume
from thinslice.io.volume import Volume


def _thick(seed: int, shape: tuple[int, int, int] = (40, 48, 48), pixel: float = 4.5) -> Volume:
    """A 5 mm phantom stack (10 slices of 48x48 by default): upsampled x4 to 1.25 mm in a fraction of a second."""
    thin = make_chest_phantom(shape=shape, spacing=(pixel, pixel, 1.25), seed=seed)
    return degrade(thin, thickness=5.0, spacing=5.0)


def _dicom(volume: Volume, folder: Path, patient: str, study: str, **tags: object) -> None:
    """``volume`` as a DICOM series in ``folder`` (of ``patient``, ``study``); ``tags`` overwrite header values."""
    volume.metadata.update(patient_id=patient, study_uid=study)
    staging = folder.parent / f".staging-{folder.name}-{len(tags)}"
    write_volume(volume, str(staging) + "/")
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.iterdir()):
        ds = pydicom.dcmread(path)
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.save_as(folder / f"{ds.SeriesInstanceUID[-6:]}_{path.name}")
        path.unlink()
    staging.rmdir()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Two studies (an axial CT each), a single-slice localizer, a coronal reformat, an MR series in the same folder
    as a CT series, a NIfTI folder with two files of the same name in different folders and a truncated file."""
    root = tmp_path_factory.mktemp("cohort") / "archive"
    a, b = _thick(1), _thick(2)
    _dicom(a, root / "P1" / "study1" / "ct", "P1", "1.2.3.1", SeriesNumber=2, SeriesDescription="chest 5mm")
    scout = Volume(a.array[:, :1].copy(), a.spacing, a.origin, a.direction, metadata={})
    _dicom(scout, root / "P1" / "study1" / "scout", "P1", "1.2.3.1", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
           SeriesNumber=1)
    _dicom(b, root / "P2" / "study7" / "series", "P2", "1.2.3.7", SeriesNumber=3, SeriesDescription="thorax")
    _dicom(_thick(3), root / "P2" / "study7" / "series", "P2", "1.2.3.7", Modality="MR", SeriesNumber=4)
    coronal = Volume(b.array, b.spacing, b.origin, np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]), metadata={})
    _dicom(coronal, root / "P2" / "study7" / "reformat", "P2", "1.2.3.7", SeriesNumber=5)
    write_volume(_thick(4), root / "nifti" / "ct1.nii.gz")
    write_volume(_thick(5), root / "nifti" / "more" / "ct1.nii.gz")
    write_volume(_thick(6), root / "nifti" / "broken.nii.gz")
    data = (root / "nifti" / "broken.nii.gz").read_bytes()
    (root / "nifti" / "broken.nii.gz").write_bytes(data[: len(data) // 2])
    (root / "nifti" / "notes.txt").write_text("not an image")
    return root


def _rows(out: Path, tree: Path) -> dict[str, dict]:
    """cases.csv by input (folder or file), with ``#series number`` where a folder holds several series."""
    numbers = {}
    for path in tree.rglob("*"):
        if path.is_file() and "nifti" not in path.parts and path.suffix != ".txt":
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            numbers[ds.SeriesInstanceUID] = f"#{ds.SeriesNumber}" if path.parent.name in ("ct", "series") else ""
    with open(out / "cases.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {Path(r["input"]).relative_to(tree).as_posix() + numbers.get(r["series_uid"], ""): r for r in rows}


def _journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]


def test_tree_ledger_rerun_and_changes(tree):
    """The whole archive in one command: every row of the ledger, the outputs, the skip reasons; a re-run does no
    work but retry the failed case; a repaired and a replaced input are redone, nothing else."""
    out = tree.parent / "out"
    command = ["batch", str(tree), "--out", str(out), "--spacing", "1.25", "--method", "cubic-dc", "-q"]
    assert main(command) == 1  # the truncated file failed; everything else went through
    rows = _rows(out, tree)
    assert sorted(rows) == ["P1/study1/ct#2", "P1/study1/scout", "P2/study7/reformat", "P2/study7/series#3",
                            "P2/study7/series#4", "nifti/broken.nii.gz", "nifti/ct1.nii.gz", "nifti/more/ct1.nii.gz"]
    assert rows["P1/study1/scout"]["status"] == "skipped" and "localizer" in rows["P1/study1/scout"]["reason"]
    assert rows["P2/study7/series#4"]["status"] == "skipped"
    assert rows["P2/study7/series#4"]["reason"] == "modality MR is not CT"
    assert rows["P2/study7/reformat"]["status"] == "skipped" and "not axial" in rows["P2/study7/reformat"]["reason"]
    broken = rows["nifti/broken.nii.gz"]
    assert broken["status"] == "failed" and "truncated" in broken["reason"] and not broken["output"]
    done = {k: r for k, r in rows.items() if r["status"] == "done"}
    assert sorted(done) == ["P1/study1/ct#2", "P2/study7/series#3", "nifti/ct1.nii.gz", "nifti/more/ct1.nii.gz"]
    for row in done.values():
        assert row["method"] == row["requested_method"] == "cubic-dc"
        assert float(row["factor"]) == 4.0 and row["shape_out"] == "48x48x40"
        assert float(row["dc_residual_hu"]) < 0.5 and float(row["seconds"]) > 0 and float(row["peak_memory_mb"]) > 0
        assert int(row["hu_min"]) <= -900 and not row["flags"]
        result = read_volume(row["output"])
        assert result.shape_ijk == (48, 48, 40) and result.spacing[2] == pytest.approx(1.25)
    # Stable readable names; the two ct1.nii.gz do not collide; DICOM stays DICOM, NIfTI stays NIfTI.
    assert Path(done["P1/study1/ct#2"]["output"]).name.startswith("P1_")
    assert Path(done["P1/study1/ct#2"]["output"]).is_dir() and done["P2/study7/series#3"]["series_uid"]
    assert Path(done["nifti/ct1.nii.gz"]["output"]).name == "ct1.nii.gz"
    assert Path(done["nifti/more/ct1.nii.gz"]["output"]).name.startswith("ct1-")
    assert len(done["nifti/ct1.nii.gz"]["input_sha256"]) == 64
    html = (out / "report.html").read_text()
    assert html.count("<img") == 4 and "modality MR is not CT" in html and "<script>" in html
    assert "http" not in html.replace("http-equiv", "")  # self-contained: nothing fetched from anywhere

    # Re-run: no work for the done cases (outputs untouched), the failed case is retried.
    stamps = {k: os.stat(r["output"]).st_mtime_ns for k, r in done.items()}
    lines = len(_journal(out))
    assert main(command) == 1
    assert {k: os.stat(r["output"]).st_mtime_ns for k, r in done.items()} == stamps
    new = _journal(out)[lines:]
    assert [r["name"] for r in new] == ["broken"] and new[0]["status"] == "failed"

    # A repaired input and a replaced one are redone; nothing else is.
    write_volume(_thick(6), tree / "nifti" / "broken.nii.gz")
    write_volume(_thick(9), tree / "nifti" / "ct1.nii.gz")
    lines = len(_journal(out))
    assert main(command) == 0
    new = _journal(out)[lines:]
    assert sorted((r["name"], r["status"]) for r in new) == [("broken", "done"), ("ct1", "done")]
    assert {k: os.stat(r["output"]).st_mtime_ns for k, r in done.items() if "nifti/ct1" not in k} == \
        {k: v for k, v in stamps.items() if "nifti/ct1" not in k}


def test_resume_after_kill_9(tmp_path):
    """SIGKILL in the middle of a cohort: what finished stays done, nothing half-written sits under a final name,
    and the re-run does exactly the rest, each case done once."""
    inputs = tmp_path / "in"
    volume = _thick(1, shape=(80, 96, 96), pixel=3.5)
    for i in range(5):
        write_volume(volume, inputs / f"case{i}.nii.gz")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "thinslice.cli.main", "batch", str(inputs), "--out", str(out), "--spacing",
               "1.25", "--method", "cubic-dc", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "cases.jsonl"
    deadline = time.monotonic() + 60
    while (not journal.exists() or not journal.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed while running, not after finishing
    before = _journal(out)
    assert 1 <= len(before) < 5 and all(r["status"] == "done" for r in before)
    finals = sorted(p.name for p in out.iterdir() if p.name.endswith(".nii.gz"))
    assert finals == sorted(f"{r['name']}.nii.gz" for r in before)  # no partial output under a final name

    assert subprocess.run(command, env=env).returncode == 0
    after = _journal(out)
    assert after[: len(before)] == before
    assert sorted(r["name"] for r in after) == [f"case{i}" for i in range(5)]  # each case done exactly once
    assert not [p for p in out.iterdir() if p.name.startswith(".thinslice-tmp-")]
    for i in range(5):
        assert read_volume(out / f"case{i}.nii.gz").shape_ijk == (96, 96, 80)


def test_manifest_overrides_and_pool(tree, tmp_path):
    """A CSV manifest names outputs, picks a series and sets a per-case spacing and method; two pool workers."""
    manifest = tmp_path / "cohort.csv"
    folder = tree / "P2" / "study7" / "series"
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
    series = next(h.SeriesInstanceUID for h in headers if h.SeriesDescription == "thorax")
    rows = [{"input": str(tree / "nifti" / "ct1.nii.gz"), "output": "first.nii.gz", "spacing": "2.5", "method": "",
             "series": ""},
            {"input": str(tree / "P2" / "study7" / "series"), "output": "thorax", "spacing": "", "method": "cubic",
             "series": series}]
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    result = run_batch([manifest], out, Settings(spacing=1.25, method="cubic-dc", fmt="nii.gz"), workers=2,
                       progress=False)
    assert result.exit_code == 0 and result.ran == 2
    first, thorax = read_volume(out / "first.nii.gz"), read_volume(out / "thorax.nii.gz")
    assert first.spacing[2] == pytest.approx(2.5) and thorax.spacing[2] == pytest.approx(1.25)
    ledger = {r["name"]: r for r in _journal(out)}
    assert ledger["thorax"]["method"] == "cubic" and ledger["first"]["method"] == "cubic-dc"
    assert all(r["worker"].split(":")[1] != str(os.getpid()) for r in ledger.values())  # ran in pool processes


@pytest.mark.slow  # about 10-50 s on 2 cores; `pytest -m 'not slow'` skips it in a quick loop
def test_ray_local_cluster(tmp_path):
    """A cohort on Ray actors (a 2-CPU local cluster on loopback): the same ledger, written by the driver."""
    ray = pytest.importorskip("ray", reason="Ray not installed (pip install 'thinslice[ray]')")
    for seed in (1, 2, 3):
        write_volume(_thick(seed), tmp_path / "in" / f"ct{seed}.nii.gz")
    try:
        result = run_batch([tmp_path / "in"], tmp_path / "out", Settings(spacing=1.25, method="cubic-dc"),
                           ray=RayOptions(init=(("num_cpus", 2), ("_node_ip_address", "127.0.0.1"))),
                           progress=False)
    finally:
        ray.shutdown()
    rows = {r["name"]: r for r in _journal(tmp_path / "out")}
    done = [r for r in rows.values() if r["status"] == "done"]
    assert len(done) == 3 and all(r["worker"].split(":")[1] != str(os.getpid()) for r in done)
    assert all(read_volume(r["output"]).shape_ijk == (48, 48, 40) for r in done)
    assert result.counts["done"] == len(done) and (tmp_path / "out" / "report.html").exists()


def test_one_batch_per_folder_and_users_files_kept(tmp_path):
    """A second batch on the same --out is refused while the first holds it (one ledger, one writer); a file of the
    user's under a case's output name is never replaced."""
    from thinslice.cohort.batch import exclusive
    from thinslice.errors import ThinsliceError

    write_volume(_thick(1), tmp_path / "in" / "ct.nii.gz")
    settings = Settings(spacing=1.25, method="cubic-dc")
    with exclusive(tmp_path / "out"), pytest.raises(ThinsliceError, match="another thinslice batch"):
        run_batch([tmp_path / "in"], tmp_path / "out", settings, progress=False)
    (tmp_path / "out" / "ct.nii.gz").write_bytes(b"the user's own file")
    result = run_batch([tmp_path / "in"], tmp_path / "out", settings, progress=False)
    assert result.exit_code == 1 and "not from this batch" in _journal(tmp_path / "out")[-1]["reason"]
    assert (tmp_path / "out" / "ct.nii.gz").read_bytes() == b"the user's own file"
    (tmp_path / "out" / "ct.nii.gz").unlink()
    assert run_batch([tmp_path / "in"], tmp_path / "out", settings, progress=False).exit_code == 0


def test_uncertainty_maps_in_the_ledger_and_on_the_qc_page(tmp_path):
    """``--uncertainty`` with planes: each case's std map beside its output (same grid), its summary in the ledger
    and its thumbnail under the case's strip on the QC page; a method without a map (cubic-dc) ignores the flag."""
    from thinslice.checkpoints.bundle import save_model
    from thinslice.models.factory import build_planes

    bundle, out = tmp_path / "bundle", tmp_path / "out"
    save_model(build_planes("tiny"), "planes", "tiny", bundle)
    write_volume(_thick(1), tmp_path / "in" / "ct.nii.gz")
    args = ["batch", str(tmp_path / "in"), "--spacing", "1.25", "--checkpoint", str(bundle), "--uncertainty", "-q"]
    assert main([*args, "--out", str(out), "--method", "planes"]) == 0
    row = _journal(out)[-1]
    thin, std = read_volume(out / "ct.nii.gz"), read_volume(out / "ct_std.nii.gz")
    assert std.grid_differences(thin) == [] and np.all(std.array >= 0)
    assert row["std_output"].endswith("ct_std.nii.gz") and "UNCALIBRATED" in row["uncertainty"]
    assert 0.0 <= row["wide_fraction"] <= 1.0
    assert (out / "qc" / "ct_std.png").is_file()
    page = (out / "report.html").read_text()
    assert page.count("data:image/png") == 2 and "alt='std'" in page
    assert main([*args, "--out", str(tmp_path / "dc"), "--method", "cubic-dc"]) == 0
    assert not (tmp_path / "dc" / "ct_std.nii.gz").exists() and _journal(tmp_path / "dc")[-1]["std_output"] == ""
