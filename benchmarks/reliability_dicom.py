"""Reliability cases for hostile and damaged DICOM input, and for what a DICOM output keeps of its source.

Inputs are built lazily under ``WORK / "dicom"`` by :mod:`thinslice.data.odd` (the chest phantom with the odd
property). Damaged input must end in rc 2 and one line naming the file and what is wrong; odd but valid input must
give what dcm2niix or pydicom find in the same files.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from functools import cache
from pathlib import Path

import numpy as np
from reliability_harness import WORK, Case, _short, error_case, ok_case, run

D = WORK / "dicom"
_UPSAMPLE = ["--spacing", "1", "--method", "cubic"]
_SPACINGS = {"zero": "0\\0", "negative": "-0.7\\-0.7", "nan": "nan\\nan", "absurd": "1e6\\1e6"}
_DAMAGES = ("truncated", "huge_length", "no_position", "nan_orientation", "nan_position", "duplicate", "same_uid")


@cache
def _inputs() -> dict[str, object]:
    """Every input of this group (built once, on first use)."""
    from thinslice.data import odd

    D.mkdir(parents=True, exist_ok=True)
    truth: dict[str, object] = {}
    for lie in odd.HEADER_LIES:
        odd.lying_header_file(D / f"lie_{lie}.dcm", lie)
    for name, text in _SPACINGS.items():
        odd.series_with_spacing(D / f"spacing_{name}", text)
    for damage in _DAMAGES:
        odd.series_with_bad_file(D / f"bad_{damage}", damage)
    odd.huge_series(D / "huge")
    odd.compressed_series(D / "rle_lie", claimed_frames=3)
    odd.series_with_window(D / "mr", modality="MR")
    odd.series_with_window(D / "pet", modality="PT", Units="BQML")
    truth["slope"] = odd.fractional_slope_series(D / "slope", slope=0.001)
    odd.series_with_window(D / "head", "40", "80")
    odd.acr_nema_series(D / "old" / "P1" / "ct")
    odd.dicomdir_export(D / "cd")
    odd.segmentation_object(D / "seg" / "seg.dcm")
    odd.write_series(odd.phantom(n=6), D / "philips" / "P1" / "study")
    odd.exam_summary(D / "philips" / "P1" / "study")
    return truth


def _lazy(case: Case) -> Case:
    """``case`` with its inputs built before its check runs."""
    check = case.check

    def built() -> tuple[bool, str]:
        _inputs()
        return check()

    return Case(case.name, case.command, case.expected, built)


def _dcm2niix(folder: Path, name: str) -> Path | None:
    """dcm2niix's NIfTI of ``folder`` (None when dcm2niix is not installed)."""
    tool = shutil.which("dcm2niix")
    if tool is None:
        return None
    out = D / f"{name}_dcm2niix"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    subprocess.run([tool, "-z", "n", "-f", "out", "-o", str(out), str(folder)], capture_output=True, check=True)
    return out / "out.nii"


def _world_difference(ours, theirs) -> float:
    """Largest voxel difference with ``theirs`` sampled (nearest) on ``ours``' grid: 0 when both hold the same."""
    import SimpleITK as sitk

    from thinslice.io.writers import volume_to_image

    back = sitk.Resample(volume_to_image(theirs), volume_to_image(ours), sitk.Transform(), sitk.sitkNearestNeighbor,
                         -9e3)
    return float(np.abs(sitk.GetArrayFromImage(back) - ours.array).max())


def _one_line(name: str, args: list[object], expect: str) -> Case:
    """rc 2 and exactly one line on stderr (no warning, no native text such as vnl_svd's before it)."""
    def check() -> tuple[bool, str]:
        res = run(*args)
        lines = res.err.strip().splitlines()
        ok = res.rc == 2 and len(lines) == 1 and expect in lines[0] and "vnl" not in res.err
        return ok, f"rc {res.rc}, {len(lines)} line(s): {res.message[:170]}"

    return Case(name, "thinslice " + " ".join(_short(a) for a in args), f"rc 2, one line: ...{expect}...", check)


# ------------------------------------------------------------------------------------------ correct outputs
def _fractional_slope_case() -> Case:
    """A RescaleSlope of 0.001 (20,000 levels): the default NIfTI output and the DICOM output keep the levels, and our
    read of the input matches dcm2niix's."""
    nifti, folder = D / "slope_out.nii.gz", D / "slope_out"

    def check() -> tuple[bool, str]:
        import pydicom

        from thinslice.io import read_volume

        truth = _inputs()["slope"]
        a = run("upsample", D / "slope", nifti, *_UPSAMPLE)
        b = run("upsample", D / "slope", folder, *_UPSAMPLE)
        if a.rc or b.rc:
            return False, f"rc {a.rc}/{b.rc}: {(a.message or b.message)[:150]}"
        values, back = read_volume(nifti).array, read_volume(folder).array
        fractional = float(np.mean(np.abs(values - np.rint(values)) > 1e-3))  # int16 would make this 0
        dicom_err = float(np.abs(back - values).max())  # RescaleSlope 0.001: within half a step
        slope = float(pydicom.dcmread(sorted(folder.iterdir())[0]).RescaleSlope)
        read_err = float(np.abs(read_volume(D / "slope").array - truth).max())
        reference = _dcm2niix(D / "slope", "slope")
        vs = _world_difference(read_volume(D / "slope"), read_volume(reference)) if reference else 0.0
        said = "float32" in a.err
        ok = fractional > 0.2 and slope == 0.001 and dicom_err < 6e-4 and read_err < 1e-5 and vs < 1e-5 and said
        return ok, (f"NIfTI: {fractional:.0%} of voxels fractional ({'says float32' if said else 'silent'}); DICOM: "
                    f"RescaleSlope {slope:g}, off the NIfTI by {dicom_err:.2g}; input read off by {read_err:.2g}, "
                    f"vs dcm2niix {vs:.2g}")

    return Case("16. RescaleSlope 0.001: NIfTI and DICOM outputs keep 20,000 levels",
                f"thinslice upsample {_short(D / 'slope')} slope_out.nii.gz | slope_out/; dcm2niix",
                "rc 0, fractional values kept (float32 NIfTI, RescaleSlope 0.001), input as dcm2niix reads it", check)


def _window_case() -> Case:
    out = D / "head_out"

    def check() -> tuple[bool, str]:
        import pydicom

        res = run("upsample", D / "head", out, *_UPSAMPLE)
        if res.rc:
            return False, f"rc {res.rc}: {res.message[:150]}"
        ds = pydicom.dcmread(sorted(out.iterdir())[0])
        window = (float(ds.WindowCenter), float(ds.WindowWidth))
        return window == (40.0, 80.0), f"rc 0, WindowCenter/Width {window[0]:g}/{window[1]:g}"

    return Case("18. DICOM output carries the source's display window (head CT 40/80)",
                f"thinslice upsample {_short(D / 'head')} head_out/ ...; pydicom", "rc 0, window 40/80", check)


def _old_files_case() -> Case:
    """Old files without file meta: the DICOM output keeps name, dates, StudyID, description, position and frame of
    reference (pydicom reads the source with force=True)."""
    out = D / "old_out"
    keywords = ("PatientName", "StudyDate", "StudyID", "StudyDescription", "PatientPosition", "StudyInstanceUID",
                "FrameOfReferenceUID")

    def check() -> tuple[bool, str]:
        import pydicom

        source = D / "old" / "P1" / "ct"
        res = run("upsample", source, out, *_UPSAMPLE)
        if res.rc:
            return False, f"rc {res.rc}: {res.message[:150]}"
        src = pydicom.dcmread(sorted(source.iterdir())[0], force=True)
        written = pydicom.dcmread(sorted(out.iterdir())[0])
        lost = [k for k in keywords if str(written.get(k, "")) != str(src.get(k, "")) or not str(src.get(k, ""))]
        hint = "force=True" in res.err
        return not lost and not hint, f"rc 0, lost: {lost or 'nothing'}" + ("; API hint shown" if hint else "")

    return Case("19. old files without file meta (ACR-NEMA style): DICOM output keeps the study",
                "thinslice upsample old/P1/ct old_out/ ...; pydicom", "rc 0, every study attribute kept", check)


def _batch_case(name: str, root: Path, expect_done: int, expect_skip: str) -> Case:
    out = D / f"{root.name}_batch"

    def check() -> tuple[bool, str]:
        res = run("batch", root, "--out", out, *_UPSAMPLE)
        rows = []
        if (out / "cases.csv").is_file():
            with open(out / "cases.csv", newline="") as fh:
                rows = list(csv.DictReader(fh))
        done = [r for r in rows if r["status"] == "done"]
        skipped = [r for r in rows if r["status"] == "skipped"]
        failed = [r for r in rows if r["status"] == "failed"]
        ok = res.rc == 0 and len(done) == expect_done and not failed and (
            not expect_skip or any(expect_skip in r["reason"] for r in skipped))
        reasons = "; ".join(r["reason"][:70] for r in skipped + failed)
        return ok, f"rc {res.rc}: {len(done)} done, {len(skipped)} skipped, {len(failed)} failed ({reasons})"

    return Case(name, f"thinslice batch {_short(root)} --out {_short(out)} ...",
                f"rc 0, {expect_done} done" + (f", skipped: ...{expect_skip}..." if expect_skip else ""), check)


def _duplicate_case() -> Case:
    """The same file twice: read once with a note; the result is dcm2niix's read of the series without the copy."""
    def check() -> tuple[bool, str]:
        from thinslice.io import read_volume

        folder = D / "bad_duplicate"
        res = run("upsample", folder, D / "dup_out.nii.gz", *_UPSAMPLE)
        if res.rc:
            return False, f"rc {res.rc}: {res.message[:150]}"
        clean = D / "dup_clean"
        shutil.rmtree(clean, ignore_errors=True)
        shutil.copytree(folder, clean)
        (clean / "IMG_copy.dcm").unlink()
        reference = _dcm2niix(clean, "dup")
        vs = _world_difference(read_volume(folder), read_volume(reference)) if reference else 0.0
        said = "same instance" in res.err
        return said and vs < 0.05, f"rc 0, {'note' if said else 'no note'}; vs dcm2niix without the copy {vs:.3g} HU"

    return Case("26. the same file twice in a series: read once, with a note",
                "thinslice upsample bad_duplicate dup_out.nii.gz ...; dcm2niix", "rc 0, note, dcm2niix's voxels",
                check)


def _dicomdir_case(target: str) -> Case:
    def check() -> tuple[bool, str]:
        from thinslice.io import read_volume

        source = D / "cd" if target == "folder" else D / "cd" / "DICOMDIR"
        res = run("upsample", source, D / f"cd_{target}.nii.gz", *_UPSAMPLE)
        if res.rc:
            return False, f"rc {res.rc}: {res.message[:150]}"
        reference = _dcm2niix(D / "cd", f"cd_{target}")
        vs = _world_difference(read_volume(source), read_volume(reference)) if reference else 0.0
        return vs < 0.05, f"rc 0; our read vs dcm2niix {vs:.3g} HU"

    shown = "cd" if target == "folder" else "cd/DICOMDIR"
    return Case(f"27. a DICOMDIR export is followed (the {target})", f"thinslice upsample {shown} ...",
                "rc 0, dcm2niix's voxels", check)


# ------------------------------------------------------------------------------------------------- the cases
def cases() -> list[Case]:
    found: list[Case] = []
    for lie, what in (("frames", "NumberOfFrames 4 on one frame"), ("rows", "Rows/Columns 128 on 64 x 64"),
                      ("bits", "BitsAllocated 32 on 16-bit data"), ("huge_frames", "NumberOfFrames 100000, 9 KB")):
        found.append(error_case(f"8. pixel data shorter than its header ({what})",
                                ["upsample", D / f"lie_{lie}.dcm", D / f"lie_{lie}.nii.gz", *_UPSAMPLE],
                                f"lie_{lie}.dcm: pixel data holds 8192 bytes but its header"))
    found.append(error_case("8. compressed (RLE) pixel data with fewer frames than NumberOfFrames",
                            ["upsample", D / "rle_lie", D / "rle.nii.gz", *_UPSAMPLE],
                            "IMG0002.dcm: its compressed pixel data holds 1 frame(s)"))
    for name, text in _SPACINGS.items():
        found.append(error_case(f"9. PixelSpacing {text}", ["upsample", D / f"spacing_{name}", D / "sp.nii.gz",
                                                             *_UPSAMPLE], "IMG0000.dcm: PixelSpacing"))
    found += [
        error_case("15. DICOM output from an MR series", ["upsample", D / "mr", D / "mr_out", *_UPSAMPLE],
                   "the input is MR (Modality MR), and thinslice writes DICOM output only as CT"),
        error_case("15. DICOM output from a PET series", ["upsample", D / "pet", D / "pet_out", *_UPSAMPLE],
                   "the input is PT (Modality PT)"),
        ok_case("15. NIfTI output from an MR series is allowed, with a warning",
                ["upsample", D / "mr", D / "mr_out.nii.gz", *_UPSAMPLE], "Modality MR, not CT",
                D / "mr_out.nii.gz"),
        _fractional_slope_case(),
        _window_case(),
        _old_files_case(),
        _batch_case("19. batch reads old files without file meta as upsample does", D / "old", 1, ""),
        _batch_case("22. a dose screen (Exam Summary) is skipped by batch, not failed", D / "philips", 1,
                    "secondary capture"),
        error_case("23. DICOM Rows = Columns = 45000 (sparse files): memory from the headers",
                   ["upsample", D / "huge", D / "huge.nii.gz", *_UPSAMPLE], "GB to read"),
        error_case("26. a truncated slice in a series", ["upsample", D / "bad_truncated", D / "b.nii.gz", *_UPSAMPLE],
                   "IMG0003.dcm: pixel data is cut short"),
        error_case("26. an element length past the end of a file",
                   ["upsample", D / "bad_huge_length", D / "b.nii.gz", *_UPSAMPLE],
                   "IMG0003.dcm (element (0008,2111) claims 65535 bytes"),
        error_case("26. one file without ImagePositionPatient",
                   ["upsample", D / "bad_no_position", D / "b.nii.gz", *_UPSAMPLE],
                   "IMG0003.dcm: no ImagePositionPatient, unlike the other files"),
        _one_line("26. NaN in one file's ImageOrientationPatient",
                  ["upsample", D / "bad_nan_orientation", D / "b.nii.gz", *_UPSAMPLE],
                  "IMG0003.dcm: ImageOrientationPatient holds NaN"),
        _one_line("26. NaN in one file's ImagePositionPatient",
                  ["upsample", D / "bad_nan_position", D / "b.nii.gz", *_UPSAMPLE],
                  "IMG0003.dcm: ImagePositionPatient holds NaN"),
        error_case("26. two slices with one SOPInstanceUID", ["upsample", D / "bad_same_uid", D / "b.nii.gz",
                                                              *_UPSAMPLE], "IMG0003.dcm and IMG0005.dcm: the same"),
        _duplicate_case(),
        _dicomdir_case("folder"),
        _dicomdir_case("DICOMDIR file"),
        error_case("27. a SEG object", ["upsample", D / "seg" / "seg.dcm", D / "seg.nii.gz", *_UPSAMPLE],
                   "is a segmentation object (SEG), not an image series"),
    ]
    return [_lazy(case) for case in found]
