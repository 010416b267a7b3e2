"""Check a DICOM series written by ``thinslice upsample`` the way a PACS administrator would: what it keeps from its
DICOM source (patient, study, frame of reference), what is new (series number and description, DERIVED, references to
the source images), whether dciodvfy finds errors, and whether dcm2niix reads back the voxels and world geometry of
the NIfTI output of the same command.

    .venv/bin/python benchmarks/dicom_output_check.py [--method cubic] [--spacing 1] [--keep DIR]

The input is the package's phantom written as a thick DICOM series with a non-ASCII patient name, study attributes,
PatientPosition and LossyImageCompression "01" (as a JPEG-baseline series has); a second run uses a CJK name, a
third a NIfTI input. Prints a table (attribute, input, output, ok) and the tool results. Needs dicom3tools
(dciodvfy) and dcm2niix for those two checks: ``apt-get install -y dicom3tools dcm2niix``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

NAME_LATIN = "Müller^Jörg"
NAME_CJK = "Yamada^Tarou=山田^太郎=やまだ^たろう"
# What the thick input says about patient, study and series (set on every file of the input series).
SOURCE_ATTRIBUTES = {
    "PatientID": "TS-0042", "PatientBirthDate": "19600102", "PatientSex": "M", "PatientAge": "064Y",
    "StudyDate": "20240315", "StudyTime": "101500", "AccessionNumber": "ACC-7781", "StudyID": "7",
    "StudyDescription": "CT Thorax nativ (Übersicht)", "ReferringPhysicianName": "Weiß^Anna",
    "SeriesNumber": 3, "SeriesDescription": "LUNG BASES 5MM", "PatientPosition": "FFS", "BodyPartExamined": "CHEST",
    "KVP": "120", "LossyImageCompression": "01", "LossyImageCompressionRatio": "8.5",
    "LossyImageCompressionMethod": "ISO_10918_1", "Manufacturer": "ACME",
}
KEPT = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID", "StudyDate",
        "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName", "FrameOfReferenceUID",
        "PatientPosition", "BodyPartExamined", "KVP", "LossyImageCompression", "LossyImageCompressionRatio")


def make_dicom_input(folder: Path, patient_name: str = NAME_LATIN, sagittal: bool = False) -> Path:
    """A thick (5 mm) DICOM series of the phantom in ``folder`` with the study of SOURCE_ATTRIBUTES, UTF-8 text."""
    import pydicom

    from thinslice.data.phantom import make_chest_phantom
    from thinslice.io.dicom import write_dicom_series
    from thinslice.io.volume import Volume

    vol = make_chest_phantom(shape=(8, 32, 32), spacing=(1.5, 1.5, 5.0), seed=3)
    if sagittal:  # index axes i -> posterior, j -> feet, k -> left: a stack of sagittal slices
        direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
        vol = Volume(vol.array, vol.spacing, (-20.0, -90.0, 95.0), direction)
    folder.mkdir(parents=True, exist_ok=True)
    study, frame, series = (pydicom.uid.generate_uid() for _ in range(3))
    for path in write_dicom_series(vol, folder):
        ds = pydicom.dcmread(path)
        for keyword in ("DerivationDescription", "SourceImageSequence", "ReferencedSeriesSequence"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = patient_name
        for keyword, value in SOURCE_ATTRIBUTES.items():
            setattr(ds, keyword, value)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "SAGITTAL" if sagittal else "AXIAL"]
        ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.SeriesInstanceUID = study, frame, series
        ds.save_as(path)
    return folder


def thinslice_command() -> list[str]:
    """The installed ``thinslice`` program beside this Python, else the module."""
    script = Path(sys.executable).with_name("thinslice")
    return [str(script)] if script.exists() else [sys.executable, "-m", "thinslice.cli.main"]


def upsample(source: Path, out: Path, method: str, spacing: float) -> None:
    run = subprocess.run([*thinslice_command(), "-q", "upsample", str(source), str(out), "--spacing", str(spacing),
                          "--method", method], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"thinslice upsample {source} {out} failed: {run.stderr.strip()}")


def dciodvfy_errors(path: Path) -> list[str] | None:
    """dciodvfy's Error lines for one file, or None when dciodvfy is not installed."""
    if shutil.which("dciodvfy") is None:
        return None
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True)
    text = (run.stdout + run.stderr).decode("utf-8", "replace")
    return [line for line in text.splitlines() if line.startswith("Error")]


def dcm2niix_differences(folder: Path, nifti: Path, work: Path) -> list[str] | None:
    """How dcm2niix's reading of the DICOM ``folder`` differs from ``nifti`` (voxels and world grid, both put in LPS
    axis order); None when dcm2niix is not installed."""
    import SimpleITK as sitk

    if shutil.which("dcm2niix") is None:
        return None
    work.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(["dcm2niix", "-z", "n", "-f", "series", "-o", str(work), str(folder)], capture_output=True)
    produced = sorted(work.glob("series*.nii"))
    if run.returncode != 0 or len(produced) != 1:
        return [f"dcm2niix rc {run.returncode}, {len(produced)} NIfTI files"]
    theirs = sitk.DICOMOrient(sitk.ReadImage(str(produced[0])), "LPS")
    ours = sitk.DICOMOrient(sitk.ReadImage(str(nifti)), "LPS")
    diffs = []
    if theirs.GetSize() != ours.GetSize():
        return [f"size {theirs.GetSize()} vs {ours.GetSize()}"]
    for name, tol in (("Spacing", 1e-4), ("Origin", 1e-3), ("Direction", 1e-5)):
        a, b = (np.asarray(getattr(img, f"Get{name}")()) for img in (theirs, ours))
        if not np.allclose(a, b, atol=tol):
            diffs.append(f"{name.lower()} {np.round(a, 4).tolist()} vs {np.round(b, 4).tolist()}")
    if not np.array_equal(sitk.GetArrayViewFromImage(theirs), sitk.GetArrayViewFromImage(ours)):
        diffs.append("voxel values differ")
    return diffs


def attribute_rows(source_file: Path, output_file: Path, method: str, spacing: float,
                   orientation: str = "AXIAL") -> list[tuple[str, str, str, bool]]:
    """(attribute, input, output, ok) for the kept and the new attributes of one output slice."""
    import pydicom

    src, out = pydicom.dcmread(source_file), pydicom.dcmread(output_file)
    rows = [(k, _text(src.get(k)), _text(out.get(k)), _same(src.get(k), out.get(k))) for k in KEPT]
    expected_description = f"{src.SeriesDescription} {spacing:.4g} mm thinslice {method}"
    per_slice = [[item.ReferencedSOPInstanceUID for item in pydicom.dcmread(p).get("SourceImageSequence", [])]
                 for p in sorted(output_file.parent.iterdir())]
    refs = [uid for uids in per_slice for uid in uids]
    counts = sorted({len(uids) for uids in per_slice})
    source_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in source_file.parent.iterdir()}
    ref_series = out.get("ReferencedSeriesSequence", [None])[0]
    rows += [
        ("SeriesInstanceUID", "", "new", out.SeriesInstanceUID != src.SeriesInstanceUID),
        ("SeriesNumber", _text(src.SeriesNumber), _text(out.SeriesNumber), out.SeriesNumber == src.SeriesNumber + 1000),
        ("SeriesDescription", src.SeriesDescription, out.SeriesDescription,
         out.SeriesDescription == expected_description),
        ("ImageType", _text(src.ImageType), _text(out.ImageType),
         list(out.ImageType) == ["DERIVED", "SECONDARY", orientation]),
        ("DerivationDescription", "", out.get("DerivationDescription", "")[:60] + "...",
         method in out.get("DerivationDescription", "")),
        ("SourceImageSequence", "", f"{'-'.join(map(str, counts))} source slice(s) per slice",
         counts[0] >= 1 and set(refs) <= source_uids),
        ("ReferencedSeriesSequence", "", "source series" if ref_series else "",
         ref_series is not None and ref_series.SeriesInstanceUID == src.SeriesInstanceUID),
        ("SpecificCharacterSet", _text(src.get("SpecificCharacterSet")), _text(out.get("SpecificCharacterSet")),
         out.get("SpecificCharacterSet") == "ISO_IR 192"),
    ]
    return rows


def _same(before: object, after: object) -> bool:
    """Present in both and equal (decimal strings as numbers: '120' and '120.0' are the same kVp)."""
    if _text(before) == "" or _text(after) == "":
        return False
    try:
        return float(_text(before)) == float(_text(after))
    except ValueError:
        return _text(before) == _text(after)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)  # type: ignore[union-attr]
    return str(value)


def check_case(work: Path, name: str, method: str, spacing: float, sagittal: bool = False) -> list[str]:
    """Run one DICOM-input case end to end; print its attribute table; return its failures."""
    source = make_dicom_input(work / f"{_slug(name)}_in", name, sagittal=sagittal)
    out_dicom, out_nifti = work / f"{_slug(name)}_out", work / f"{_slug(name)}_out.nii.gz"
    upsample(source, out_dicom, method, spacing)
    upsample(source, out_nifti, method, spacing)
    first_in, first_out = sorted(source.iterdir())[0], sorted(out_dicom.iterdir())[0]
    print(f"\n## {'sagittal ' if sagittal else ''}DICOM input, PatientName {name}\n")
    print("| attribute | input | output | ok |\n|---|---|---|---|")
    failures = []
    rows = attribute_rows(first_in, first_out, method, spacing, "SAGITTAL" if sagittal else "AXIAL")
    for attribute, before, after, ok in rows:
        print(f"| {attribute} | {before} | {after} | {'yes' if ok else 'NO'} |")
        failures += [] if ok else [f"{name}: {attribute}"]
    return failures + _tool_checks(name, first_out, out_dicom, out_nifti, work / f"{_slug(name)}_dcm2niix")


def check_nifti_case(work: Path, method: str, spacing: float) -> list[str]:
    """A NIfTI input: type 2 patient and study elements written empty, nothing invented."""
    import pydicom

    from thinslice.data.phantom import make_chest_phantom
    from thinslice.io import write_volume

    source = write_volume(make_chest_phantom(shape=(8, 32, 32), spacing=(1.5, 1.5, 5.0), seed=3), work / "n.nii.gz")
    out_dicom, out_nifti = work / "nifti_out", work / "nifti_out.nii.gz"
    upsample(source, out_dicom, method, spacing)
    upsample(source, out_nifti, method, spacing)
    first_out = sorted(out_dicom.iterdir())[0]
    ds = pydicom.dcmread(first_out)
    empty = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
             "StudyID", "PatientPosition")
    print("\n## NIfTI input\n")
    print("| attribute | output | ok |\n|---|---|---|")
    failures = []
    for keyword in empty:
        ok = keyword in ds and _text(ds.get(keyword)) == ""
        print(f"| {keyword} | {_text(ds.get(keyword))!r} | {'yes' if ok else 'NO'} |")
        failures += [] if ok else [f"NIfTI: {keyword}"]
    return failures + _tool_checks("NIfTI input", first_out, out_dicom, out_nifti, work / "nifti_dcm2niix")


def _tool_checks(name: str, first_out: Path, out_dicom: Path, out_nifti: Path, work: Path) -> list[str]:
    errors = dciodvfy_errors(first_out)
    diffs = dcm2niix_differences(out_dicom, out_nifti, work)
    print(f"\ndciodvfy: {'not installed' if errors is None else (errors or 'no Error line')}")
    print(f"dcm2niix vs NIfTI output: {'not installed' if diffs is None else (diffs or 'same voxels and geometry')}")
    return [f"{name}: dciodvfy {e}" for e in errors or []] + [f"{name}: dcm2niix {d}" for d in diffs or []]


def _slug(text: str) -> str:
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in text)[:20]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="cubic", help="upsampling method (default cubic: fast, no weights)")
    parser.add_argument("--spacing", type=float, default=1.0, help="output slice spacing in mm (default 1)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the series in this folder")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="thinslice-dicom-check-"))
    try:
        failures = check_case(work, NAME_LATIN, args.method, args.spacing)
        failures += check_case(work, NAME_CJK, args.method, args.spacing)
        failures += check_case(work / "sag", NAME_LATIN, args.method, args.spacing, sagittal=True)
        failures += check_nifti_case(work, args.method, args.spacing)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\nall checks passed" if not failures else "\nFAILED: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
