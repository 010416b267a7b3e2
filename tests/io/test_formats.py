"""The formats table: every row with a writer round-trips a phantom, suffix look-ups agree with the readers and
writers, and an unknown suffix keeps its one-line error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from thinslice.cohort.cases import FORMATS as COHORT_FORMATS
from thinslice.data.phantom import make_chest_phantom
from thinslice.errors import ThinsliceError
from thinslice.io import Volume, read_volume, write_volume
from thinslice.io.formats import (
    DICOM,
    FORMATS,
    METAIMAGE,
    NIFTI,
    NRRD,
    OTHER_ITK,
    VOLUME_SUFFIXES,
    file_extension,
    format_for_suffix,
    input_format,
    output_suffixes,
    single_file_suffix,
    strip_volume_suffix,
)
from thinslice.io.readers import files_read
from thinslice.io.writers import check_file_target, files_written, is_folder_output, volume_to_image


@pytest.fixture(scope="module")
def phantom() -> Volume:
    vol = make_chest_phantom(shape=(6, 12, 12), spacing=(1.5, 1.5, 3.0), seed=3)
    vol.slice_thickness = 3.0
    return vol


# (row, suffix) for every row with a writer: each file suffix, and "" for a row written as a folder (DICOM)
WRITTEN = [(f.name, s) for f in FORMATS if f.writer for s in (("",) if f.folder else f.suffixes)]


@pytest.mark.parametrize(("row", "suffix"), WRITTEN)
def test_every_written_suffix_round_trips_a_phantom(tmp_path, phantom, row, suffix) -> None:
    """Each suffix of a row with a writer (and a DICOM series folder) reads back with the same grid and HU."""
    path = write_volume(phantom, f"{tmp_path / 'vol'}{suffix or '/'}")
    assert input_format(Path(path)).name == row
    back = read_volume(path)
    assert back.shape_ijk == phantom.shape_ijk
    np.testing.assert_allclose(back.spacing, phantom.spacing, atol=1e-4)
    np.testing.assert_allclose(back.origin, phantom.origin, atol=1e-3)
    np.testing.assert_array_equal(back.array, np.rint(phantom.array))
    assert back.slice_thickness == pytest.approx(3.0)
    for extra in files_written(Path(path))[1:]:  # a detached header's data file: one of its names was written
        assert extra.suffix in (".raw", ".zraw", ".gz")
    if suffix in (".mhd", ".nhdr"):
        assert any(p.exists() for p in files_written(Path(path))[1:])


def test_suffix_lookups() -> None:
    assert file_extension("a/CT.NII.GZ") == ".nii.gz" and file_extension("x.tar.gz") == ".gz"
    assert format_for_suffix(".nii") is NIFTI and format_for_suffix(".NHDR") is NRRD
    assert format_for_suffix(".mhd") is METAIMAGE and format_for_suffix(".ima") is DICOM
    assert format_for_suffix(".hdr") is None and format_for_suffix("") is None
    assert VOLUME_SUFFIXES == (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
    assert strip_volume_suffix("ct07.nii.gz") == "ct07" and strip_volume_suffix("ct.MHD") == "ct"
    assert strip_volume_suffix("notes.txt") == "notes.txt" and strip_volume_suffix(".nii") == ".nii"
    assert single_file_suffix(".nhdr") == ".nrrd" and single_file_suffix(".mhd") == ".mha"
    assert single_file_suffix(".nii") == ".nii"


def test_the_cohort_formats_come_from_the_table() -> None:
    assert output_suffixes() == {"nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd", "mha": ".mha", "dicom": ""}
    assert output_suffixes() == COHORT_FORMATS


def test_folder_outputs_and_detached_data_files(tmp_path) -> None:
    assert is_folder_output(tmp_path / "series") and not is_folder_output(tmp_path / "a.mha")
    assert files_written(Path("x/ct.mhd")) == [Path("x/ct.mhd"), Path("x/ct.zraw"), Path("x/ct.raw")]
    assert files_written(Path("ct.nhdr")) == [Path("ct.nhdr"), Path("ct.raw.gz"), Path("ct.raw")]
    assert files_written(Path("ct.nii.gz")) == [Path("ct.nii.gz")]
    assert check_file_target(tmp_path / "a.nrrd") is NRRD


def test_an_unknown_suffix_gets_the_one_line_errors(tmp_path) -> None:
    odd = tmp_path / "scan.xyz"
    odd.write_bytes(b"not an image at all\n" * 10)
    assert input_format(odd) is OTHER_ITK
    with pytest.raises(ThinsliceError, match=r"unsupported file type '\.xyz'; use NIfTI .* DICOM series folder") as e:
        read_volume(odd)
    assert "\n" not in str(e.value)
    with pytest.raises(ThinsliceError, match=r"unknown output format '\.xyz'; use \.nii\.gz, .* or \.mhd, or a folder"):
        check_file_target(odd)
    with pytest.raises(ThinsliceError, match="a DICOM output is a series folder"):
        check_file_target(tmp_path / "slice.dcm")


def test_the_fall_back_row_reads_an_analyze_pair_with_its_data_file(tmp_path, phantom) -> None:
    """A suffix without a row (.hdr) goes to the row ITK reads; its read_beside names the .img a read opens."""
    import SimpleITK as sitk

    header = tmp_path / "pair.hdr"
    sitk.WriteImage(volume_to_image(phantom, "int16"), str(header))
    assert input_format(header) is OTHER_ITK
    assert files_read(header) == [header, tmp_path / "pair.img"]
    np.testing.assert_array_equal(read_volume(header).array, np.rint(phantom.array))
