"""A DICOM series written from a DICOM input keeps the patient, study and frame of reference, and is a new derived
series that references its source; from a NIfTI input nothing is invented. Checked with pydicom, and with dciodvfy
and dcm2niix where installed (the same checks as benchmarks/dicom_output_check.py, which the inputs come from)."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from thinslice.cli.main import main
from thinslice.infer.upsample import upsample
from thinslice.io import read_volume, write_volume
from thinslice.io.dicom_study import (
    SOURCE_KEY,
    SourceSeries,
    add_source_references,
    capture_source,
    orientation_word,
    series_description,
)

_spec = importlib.util.spec_from_file_location(
    "dicom_output_check", Path(__file__).parents[2] / "benchmarks" / "dicom_output_check.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None,
                                    reason="dciodvfy not installed (apt-get install dicom3tools)")
needs_dcm2niix = pytest.mark.skipif(shutil.which("dcm2niix") is None,
                                    reason="dcm2niix not installed (apt-get install dcm2niix)")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A thick DICOM input (Müller^Jörg), upsampled to 1 mm by cubic through the CLI to a DICOM folder and NIfTI."""
    work = tmp_path_factory.mktemp("dicom_out")
    source = check.make_dicom_input(work / "in")
    paths = {"in": source, "out": work / "out", "nifti": work / "out.nii.gz", "work": work}
    logger = logging.getLogger("thinslice")
    saved = logger.handlers[:], logger.level, logger.propagate
    try:
        for target in (paths["out"], paths["nifti"]):
            assert main(["-q", "upsample", str(source), str(target), "--spacing", "1", "--method", "cubic"]) == 0
    finally:  # the CLI sets up logging for a process; leave the other tests' logging as it was
        logger.handlers[:], logger.level, logger.propagate = saved
    return paths


def _slices(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


def test_patient_study_and_frame_of_reference_are_kept(run):
    source, out = pydicom.dcmread(sorted(run["in"].iterdir())[0]), _slices(run["out"])[5]
    rows = check.attribute_rows(sorted(run["in"].iterdir())[0], sorted(run["out"].iterdir())[5], "cubic", 1.0)
    assert [row for row in rows if not row[3]] == []
    assert out.PatientName == check.NAME_LATIN and out.ReferringPhysicianName == "Weiß^Anna"
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "StudyDate", "StudyTime", "AccessionNumber",
                    "PatientBirthDate", "PatientSex", "PatientPosition", "LossyImageCompression"):
        assert out[keyword].value == source[keyword].value, keyword


def test_output_is_a_new_derived_series_that_references_its_source(run):
    sources = _slices(run["in"])
    out = _slices(run["out"])
    first = out[0]
    assert first.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert first.SeriesNumber == 1003
    assert first.SeriesDescription == "LUNG BASES 5MM 1 mm thinslice cubic"
    assert list(first.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert "cubic" in first.DerivationDescription and sources[0].SeriesInstanceUID in first.DerivationDescription
    z_source = np.array([float(s.ImagePositionPatient[2]) for s in sources])
    for ds in out:
        z = float(ds.ImagePositionPatient[2])
        refs = [item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence]
        between = np.argsort(np.abs(z_source - z))[: 1 if np.min(np.abs(z_source - z)) < 1e-3 else 2]
        if not z_source.min() <= z <= z_source.max():
            between = between[:1]  # beyond the first or last thick slice centre: the nearest one alone
        assert sorted(refs) == sorted(sources[i].SOPInstanceUID for i in between), z
        series = ds.ReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == sources[0].SeriesInstanceUID
        assert sorted(i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence) == sorted(refs)
    assert max(len(ds.SourceImageSequence) for ds in out) == 2


@pytest.mark.parametrize("name", [check.NAME_LATIN, check.NAME_CJK])
def test_non_ascii_text_is_written_as_utf8(tmp_path, name):
    folder = write_volume(read_volume(check.make_dicom_input(tmp_path / "in", name)), tmp_path / "out")
    path = sorted(folder.iterdir())[0]
    assert pydicom.dcmread(path).SpecificCharacterSet == "ISO_IR 192"
    assert name.encode("utf-8") in path.read_bytes()
    assert str(pydicom.dcmread(path).PatientName) == name


def test_nifti_input_leaves_patient_and_study_empty(tmp_path, run):
    folder = write_volume(read_volume(run["nifti"]), tmp_path / "out")
    ds = _slices(folder)[0]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "AccessionNumber", "StudyID", "ReferringPhysicianName", "PatientPosition"):
        assert keyword in ds and str(ds[keyword].value) == "", keyword
    assert "SpecificCharacterSet" not in ds and "SourceImageSequence" not in ds
    assert ds.SeriesNumber == 1 and ds.FrameOfReferenceUID and ds.StudyInstanceUID
    assert ds.SeriesDescription == "1 mm thinslice"  # a NIfTI does not say how it was made


def test_sagittal_output_says_sagittal_and_method_comes_from_metadata(tmp_path):
    thick = read_volume(check.make_dicom_input(tmp_path / "in", sagittal=True))
    folder = write_volume(upsample(thick, 1.0, "cubic"), tmp_path / "out")  # no method given: from the metadata
    ds = _slices(folder)[0]
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "SAGITTAL"]
    assert ds.SeriesDescription == "LUNG BASES 5MM 1 mm thinslice cubic"
    assert [orientation_word(n) for n in ([0.1, 0.9, 0.3], [0.2, 0.1, -0.97])] == ["CORONAL", "AXIAL"]


def test_jpeg_baseline_source_marks_the_output_lossy(tmp_path, run):
    ds = pydicom.dcmread(sorted(run["in"].iterdir())[0], stop_before_pixels=True)
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        delattr(ds, keyword)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    ds.save_as(tmp_path / "jpeg.dcm")
    volume = read_volume(run["in"])
    volume.metadata[SOURCE_KEY] = capture_source(tmp_path / "jpeg.dcm", [(ds.SOPInstanceUID, "")])
    out = _slices(write_volume(volume, tmp_path / "out"))[0]
    assert out.LossyImageCompression == "01" and out.LossyImageCompressionMethod == "ISO_10918_1"


def test_series_description_fits_dicom_length():
    text = series_description("X" * 80, 1.25, "planes")
    assert len(text) == 64 and text.endswith(" 1.25 mm thinslice planes")
    assert series_description("", 0.625, None) == "0.625 mm thinslice"


def test_file_outputs_do_not_carry_the_dicom_source(tmp_path, run):
    path = write_volume(read_volume(run["in"]), tmp_path / "v.nrrd")
    header = path.read_bytes()[:20000]
    assert b"Thorax" not in header and "Müller".encode() not in header and SOURCE_KEY.encode() not in header
    assert b"NRRD" in header  # the header was searched


@needs_dciodvfy
@pytest.mark.parametrize("case", ["dicom", "nifti"])
def test_dciodvfy_finds_no_error(tmp_path, run, case):
    folder = run["out"] if case == "dicom" else write_volume(read_volume(run["nifti"]), tmp_path / "out")
    for path in sorted(folder.iterdir())[::13]:
        assert check.dciodvfy_errors(path) == []


@needs_dciodvfy
def test_dciodvfy_finds_no_error_for_cjk_and_sagittal(tmp_path):
    cjk = write_volume(read_volume(check.make_dicom_input(tmp_path / "a", check.NAME_CJK)), tmp_path / "a_out")
    sag = write_volume(read_volume(check.make_dicom_input(tmp_path / "b", sagittal=True)), tmp_path / "b_out")
    assert check.dciodvfy_errors(sorted(cjk.iterdir())[0]) == []
    assert check.dciodvfy_errors(sorted(sag.iterdir())[0]) == []


@needs_dcm2niix
def test_dcm2niix_reads_the_voxels_and_geometry_of_the_nifti_output(run):
    assert check.dcm2niix_differences(run["out"], run["nifti"], run["work"] / "dcm2niix") == []


def test_std_map_series_gets_its_own_number(tmp_path, run):
    folder = write_volume(read_volume(run["in"]), tmp_path / "std", method="ldm std", series_number_offset=2000)
    ds = _slices(folder)[0]
    assert ds.SeriesNumber == 2003 and ds.SeriesDescription == "LUNG BASES 5MM 5 mm thinslice ldm std"


def test_unreadable_header_only_loses_the_study_link(tmp_path, caplog):
    (tmp_path / "x.dcm").write_bytes(b"not a DICOM file")
    with caplog.at_level(logging.WARNING, logger="thinslice"):
        assert capture_source(tmp_path / "x.dcm", [("1.2.3", "")]) is None
    assert "cannot be kept" in caplog.text and "force" not in caplog.text  # no advice meant for a programmer


def test_source_slices_of_a_tilted_stack_and_of_a_reformat():
    tilt = np.tan(np.radians(15.0))
    source = SourceSeries(kept={}, series_uid="1.2", series_number=2, description="", sop_class_uid="1.2.840",
                          instance_uids=tuple(f"1.2.{k}" for k in range(5)),
                          positions=tuple((0.0, 5.0 * k * tilt, 5.0 * k) for k in range(5)))
    ds = pydicom.Dataset()
    add_source_references(ds, source, np.array([0.0, 0.0, 7.5]), np.array([0.0, 0.0, 1.0]))
    assert [i.ReferencedSOPInstanceUID for i in ds.SourceImageSequence] == ["1.2.1", "1.2.2"]
    add_source_references(ds, source, np.array([0.0, 0.0, 7.5]), np.array([1.0, 0.0, 0.0]))  # sagittal reformat
    assert len(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 5
