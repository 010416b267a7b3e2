"""`thinslice prepare`: a LIDC-like DICOM tree or a folder of volumes becomes NIfTI files with a patient split."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from thinslice.cli.main import main
from thinslice.data.phantom import make_chest_phantom
from thinslice.errors import ThinsliceError
from thinslice.io import Volume, read_volume, write_volume
from thinslice.io.dicom import write_dicom_series
from thinslice.io.prepare import prepare_dataset, read_split_file, split_counts


def _series(folder: Path, vol: Volume, patient: str, modality: str = "CT", description: str = "") -> None:
    folder.mkdir(parents=True)
    write_dicom_series(vol, folder, patient_id=patient, modality=modality, series_description=description)


@pytest.fixture(scope="module")
def lidc_tree(tmp_path_factory) -> Path:
    """Three patients in patient/study/series layout, with the kinds of series LIDC-IDRI also holds."""
    root = tmp_path_factory.mktemp("lidc")
    for n in range(3):
        patient = f"LIDC-IDRI-{n + 1:04d}"
        vol = make_chest_phantom(shape=(16, 32, 32), spacing=(1.2, 1.2, 2.5), seed=n)
        _series(root / patient / "study-1" / "3000566", vol, patient, description="chest")
    (root / "LIDC-IDRI-0001" / "study-1" / "3000566" / "069.xml").write_text("<LidcReadMessage/>")
    small = make_chest_phantom(shape=(8, 32, 32), spacing=(1.2, 1.2, 2.5), seed=9)
    x_ray = Volume(small.array[:1], (0.2, 0.2, 1.0))  # a single projection image, as LIDC's DX/CR series
    _series(root / "LIDC-IDRI-0001" / "study-2" / "3000001", x_ray, "LIDC-IDRI-0001", modality="DX",
            description="chest x-ray")
    _series(root / "LIDC-IDRI-0002" / "study-1" / "3000700", small, "LIDC-IDRI-0002", description="scout-like")
    _series(root / "LIDC-IDRI-0002" / "study-1" / "3000800", small, "LIDC-IDRI-0002", modality="SEG")
    thick = make_chest_phantom(shape=(16, 32, 32), spacing=(1.2, 1.2, 5.0), seed=5)
    _series(root / "LIDC-IDRI-0003" / "study-1" / "3000900", thick, "LIDC-IDRI-0003", description="5 mm")
    return root


def _table(out: Path) -> list[dict[str, str]]:
    with open(out / "series.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_prepare_lidc_like_tree(lidc_tree, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(["prepare", str(lidc_tree), str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "converted 3 CT series of 3 patients" in printed

    rows = _table(out)
    assert len(rows) == 7
    assert set(rows[0]) >= {"file", "patient", "series_uid", "modality", "shape", "spacing", "slice_thickness",
                            "status", "reason"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert sorted(r["patient"] for r in ok) == ["LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"]
    assert all(r["shape"] == "32x32x16" and r["spacing"] == "1.2x1.2x2.5" and r["modality"] == "CT" for r in ok)
    reasons = {r["modality"] + ":" + r["reason"] for r in rows if r["status"] != "ok"}
    assert any(x.startswith("DX:modality DX is not CT") for x in reasons)
    assert any(x.startswith("SEG:modality SEG is not CT") for x in reasons)
    assert any("only 8 slices" in x for x in reasons)
    assert any("slice spacing 5 mm" in x for x in reasons)

    for row in ok:
        vol = read_volume(out / row["file"])
        assert row["file"].startswith(f"volumes/{row['patient']}_") and row["file"].endswith(".nii.gz")
        assert vol.shape_ijk == (32, 32, 16) and vol.spacing == pytest.approx((1.2, 1.2, 2.5))
        assert "patient_id" not in vol.metadata

    splits = {name: read_split_file(out / f"{name}.txt") for name in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [1, 1, 1]
    listed = sorted(p.resolve() for paths in splits.values() for p in paths)
    assert listed == sorted((out / r["file"]).resolve() for r in ok)

    # deterministic: the same seed gives the same split
    again = prepare_dataset(lidc_tree, tmp_path / "again", seed=0)
    for name in ("train", "val", "test"):
        assert (tmp_path / "again" / f"{name}.txt").read_text() == (out / f"{name}.txt").read_text()
    assert len(again.converted) == 3


def test_prepare_keeps_patients_in_one_split(tmp_path):
    src = tmp_path / "vols"
    src.mkdir()
    base = make_chest_phantom(shape=(16, 24, 24), spacing=(1.5, 1.5, 2.0), seed=0)
    for n in range(8):
        write_volume(base.with_array(base.array + n), src / f"case{n:02d}.nii.gz")
    write_volume(base.with_slices(base.slices_first()[::2], 4.0, 0.0), src / "thick.nrrd")
    (src / "readme.md").write_text("not a volume")
    report = prepare_dataset(src, tmp_path / "out", min_slices=8, seed=3, split=(0.5, 0.25, 0.25))
    rows = {r.patient: r for r in report.rows}
    assert rows["thick"].status == "skipped" and "slice spacing 4 mm" in rows["thick"].reason
    assert [len(report.splits[n]) for n in ("train", "val", "test")] == [4, 2, 2]
    names = [{p.name for p in report.splits[n]} for n in ("train", "val", "test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert report.splits["train"][0].name.startswith("case") and report.splits["train"][0].exists()
    other = prepare_dataset(src, tmp_path / "out2", seed=4, split=(0.5, 0.25, 0.25))
    assert {p.name for p in other.splits["train"]} != names[0]  # the seed matters


def test_split_counts():
    assert split_counts(3, (0.7, 0.15, 0.15)) == [1, 1, 1]
    assert split_counts(10, (0.7, 0.15, 0.15)) == [7, 2, 1]
    assert split_counts(100, (0.7, 0.15, 0.15)) == [70, 15, 15]
    assert split_counts(2, (0.8, 0.2, 0.0)) == [1, 1, 0]
    assert split_counts(1, (0.7, 0.15, 0.15)) == [1, 0, 0]
    assert sum(split_counts(17, (0.6, 0.3, 0.1))) == 17


def test_prepare_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ThinsliceError, match="no DICOM series"):
        prepare_dataset(empty, tmp_path / "out")
    with pytest.raises(ThinsliceError, match="add up to 1"):
        prepare_dataset(empty, tmp_path / "out", split=(0.5, 0.5, 0.5))
    assert main(["prepare", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "not a folder" in capsys.readouterr().err
    split_file = tmp_path / "train.txt"
    split_file.write_text("# comment\nvolumes/a.nii.gz\n")
    with pytest.raises(ThinsliceError, match="missing"):
        read_split_file(split_file)
    (tmp_path / "volumes").mkdir()
    (tmp_path / "volumes" / "a.nii.gz").write_bytes(b"")
    assert read_split_file(split_file) == [tmp_path / "volumes" / "a.nii.gz"]
