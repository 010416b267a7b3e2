"""Re-run the reliability cases of docs/reliability.md as a user would: the real ``thinslice`` program on small
synthetic volumes, each case checked (exit code, one-line message, no traceback, files left as they were).

    .venv/bin/python benchmarks/reliability.py [--out docs/reliability.md]

Cases that need a small or read-only disk mount tmpfs file systems (root only); without root they are reported as
skipped. Prints one line per case and writes the Markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from reliability_harness import THINSLICE, WORK, Case, _short, error_case, ok_case, run  # noqa: E402


# ------------------------------------------------------------------------------------------------- fixtures
def make_inputs() -> dict[str, Path]:
    from thinslice.checkpoints.bundle import save_model
    from thinslice.data.phantom import make_chest_phantom
    from thinslice.degrade.pairs import simulate_pair
    from thinslice.io import write_volume
    from thinslice.io.volume import Volume
    from thinslice.models.factory import build_planes

    thin = make_chest_phantom(shape=(64, 96, 96), spacing=(1.0, 1.0, 2.0), seed=3)
    thick, _ = simulate_pair(thin, factor=4, profile="gaussian")
    p = {"thin": WORK / "thin.nii.gz", "thick": WORK / "thick.nii.gz"}
    write_volume(thin, p["thin"])
    write_volume(thick, p["thick"])
    big = make_chest_phantom(shape=(40, 384, 384), spacing=(0.8, 0.8, 8.0), seed=4)
    p["big"] = write_volume(big, WORK / "big.nii.gz")
    raw = gzip.decompress(p["thin"].read_bytes())
    (WORK / "thin.nii").write_bytes(raw)
    p["cut_gz"] = WORK / "cut.nii.gz"
    p["cut_gz"].write_bytes(p["thin"].read_bytes()[: p["thin"].stat().st_size // 2])
    p["cut_nii"] = WORK / "cut.nii"
    p["cut_nii"].write_bytes(raw[: len(raw) // 2])
    broken = bytearray(gzip.compress(raw))
    broken[-8] ^= 0xFF
    p["crc"] = WORK / "crc.nii.gz"
    p["crc"].write_bytes(bytes(broken))
    nopix = bytearray(raw)
    nopix[80:92] = np.zeros(3, "<f4").tobytes()  # pixdim[1..3] = 0
    p["nopix"] = WORK / "nopix.nii"
    p["nopix"].write_bytes(bytes(nopix))
    conflict = bytearray(raw)
    conflict[88:92] = np.array([-2.0], "<f4").tobytes()  # pixdim[3] < 0: the qform's slice axis flips
    p["conflict"] = WORK / "conflict.nii"
    p["conflict"].write_bytes(bytes(conflict))
    p["garbage"] = WORK / "garbage.nii.gz"
    p["garbage"].write_bytes(os.urandom(4096))
    _write_sitk(np.zeros((64, 64), np.int16), WORK / "slice2d.nii.gz")
    _write_sitk(np.zeros((3, 8, 8, 8), np.int16), WORK / "four_d.nii.gz")
    _write_sitk(np.zeros((1, 64, 64), np.int16), WORK / "one_slice.nii.gz")
    nan = thin.array.copy()
    nan[3, 3, 3] = np.nan
    _write_sitk(nan, WORK / "nan.mha")  # ITK's NIfTI writer would store the NaN as 0
    mr = Volume(np.random.default_rng(0).uniform(0, 4000, (16, 32, 32)).astype(np.float32), (1.0, 1.0, 8.0))
    write_volume(mr, WORK / "mr.nii.gz", dtype="float32")
    hot = thick.with_array(thick.array * 0 + 40000.0)
    write_volume(hot, WORK / "hot.nii.gz", dtype="float32")
    (WORK / "empty_dir").mkdir()
    save_model(build_planes("tiny"), "planes", "tiny", WORK / "tiny_planes")
    weights = (WORK / "tiny_planes" / "planes.safetensors").read_bytes()
    (WORK / "cut_planes").mkdir()
    (WORK / "cut_planes" / "planes.safetensors").write_bytes(weights[: len(weights) // 2])
    thick6, _ = simulate_pair(thin, factor=6, profile="gaussian")
    p["thick6"] = write_volume(thick6, WORK / "thick6.nii.gz")
    (WORK / "series").mkdir()
    (WORK / "series" / "keep.txt").write_text("a file the user had")
    (WORK / "data").mkdir()
    write_volume(thin, WORK / "data" / "ct.nii.gz")
    p["archives"] = make_archives()  # type: ignore[assignment]
    return p


def _write_sitk(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=False), str(path))


# ---------------------------------------------------------------------------------------------- special cases
def mount_tmpfs(path: Path, size: str, read_only: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def disk_full_case(ext: str) -> Case:
    small = WORK / f"small{ext.replace('.', '_')}"

    def check() -> tuple[bool, str]:
        if not mount_tmpfs(small, "3m"):
            return True, "skipped (mounting a tmpfs needs root)"
        out = small / (f"prev{ext}" if ext != "/" else "series/")
        if ext == "/":
            res = run("upsample", WORK / "big.nii.gz", out, "--spacing", "0.5", "--method", "cubic")
            left = sorted(p.name for p in small.iterdir())
            return res.rc == 2 and res.clean and left == [], f"rc {res.rc}: {res.message[:140]}; left: {left}"
        first = run("upsample", WORK / "thick.nii.gz", out, "--spacing", "8", "--method", "cubic")
        before = out.read_bytes()
        res = run("upsample", WORK / "big.nii.gz", out, "--spacing", "0.5", "--method", "cubic", "--dtype", "float32",
                  "--overwrite")
        left = sorted(p.name for p in small.iterdir())
        ok = first.rc == 0 and res.rc == 2 and res.clean and out.read_bytes() == before and left == [out.name]
        return ok, f"rc {res.rc}: {res.message[:140]}; previous file intact: {out.read_bytes() == before}"

    target = f"small/prev{ext}" if ext != "/" else "small/series/"
    return Case(f"disk full while writing {ext if ext != '/' else 'a DICOM series'}",
                f"thinslice upsample big.nii.gz {target} --spacing 0.5 (3 MB disk)",
                "rc 2, one line, previous output untouched, no temporary left", check)


def read_only_case() -> Case:
    ro = WORK / "ro"

    def check() -> tuple[bool, str]:
        if not mount_tmpfs(ro, "1m", read_only=True):
            return True, "skipped (mounting a tmpfs needs root)"
        res = run("upsample", WORK / "thick.nii.gz", ro / "x.nii.gz", "--spacing", "2", "--method", "cubic")
        return res.rc == 2 and res.clean and "Read-only" in res.message, f"rc {res.rc}: {res.message[:140]}"

    return Case("read-only target folder", "thinslice upsample thick.nii.gz ro/x.nii.gz --spacing 2",
                "rc 2, one line", check)


def sigterm_case() -> Case:
    def check() -> tuple[bool, str]:
        out_dir = WORK / "term"
        out_dir.mkdir()
        proc = subprocess.Popen([*THINSLICE, "upsample", str(WORK / "big.nii.gz"), str(out_dir / "x.nii.gz"),
                                 "--spacing", "0.5", "--method", "cubic-dc"], stderr=subprocess.PIPE, text=True)
        time.sleep(6.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        left = sorted(p.name for p in out_dir.iterdir())
        ok = proc.returncode in (143, 0) and "Traceback" not in err and left in ([], ["x.nii.gz"])
        return ok, f"rc {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}; left: {left}"

    return Case("SIGTERM during upsample", "kill -TERM <thinslice upsample big.nii.gz ...> after 6 s",
                "rc 143 (or 0 if it had finished), no temporary left", check)


def stale_temp_case() -> Case:
    def check() -> tuple[bool, str]:
        folder = WORK / "stale"
        folder.mkdir()
        stale = folder / ".thinslice-tmp-999999999-abcd1234"  # a killed writer's folder and its (free) lock file
        stale.mkdir()
        (stale / "half.nii.gz").write_bytes(b"\0" * 100)
        (folder / ".thinslice-tmp-999999999-abcd1234.lock").write_bytes(b"")
        res = run("upsample", WORK / "thick.nii.gz", folder / "x.nii.gz", "--spacing", "2", "--method", "cubic")
        left = sorted(p.name for p in folder.iterdir())
        return res.rc == 0 and left == ["x.nii.gz"], f"rc {res.rc}; left: {left}"

    return Case("leftover of a killed run (kill -9) in the output folder",
                "thinslice upsample thick.nii.gz stale/x.nii.gz (stale/.thinslice-tmp-<pid>-<token>/, its lock unheld)",
                "rc 0, the leftover removed", check)


def broken_pipe_case() -> Case:
    def check() -> tuple[bool, str]:
        cmd = " ".join([*THINSLICE, "info", str(WORK / "thin.nii.gz")]) + " | head -c 20"
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True)
        return "Traceback" not in proc.stderr, f"rc {proc.returncode}, stderr: {proc.stderr.strip()[:100]!r}"

    return Case("reader of the output goes away", "thinslice info thin.nii.gz | head -c 20",
                "no traceback", check)


def resume_damaged_case() -> Case:
    def check() -> tuple[bool, str]:
        run_dir = WORK / "run"
        base = ["train-planes", "--data", WORK / "data", "--preset", "tiny", "--out", run_dir, "--device", "cpu"]
        first = run(*base, "--max-steps", "6")
        ckpts = sorted((run_dir / "checkpoints").iterdir())
        for weights in ckpts[-1].glob("*.safetensors"):
            weights.write_bytes(weights.read_bytes()[:64])
        again = run(*base, "--max-steps", "9", "--resume")
        text = again.err + again.out
        ok = first.rc == 0 and again.rc == 0 and "is damaged" in text and "Traceback" not in again.err
        return ok, f"rc {again.rc}: " + next((line for line in text.splitlines() if "damaged" in line), "")[:140]

    return Case("--resume when the newest checkpoint is damaged", "thinslice train-planes ... --resume",
                "rc 0, one note, continues from the checkpoint before", check)


def overlap_case(thickness: float, spacing: float) -> Case:
    def check() -> tuple[bool, str]:
        thick = WORK / f"ov_{thickness:g}_{spacing:g}.nii.gz"
        run("degrade", WORK / "thin.nii.gz", thick, "--thickness", thickness, "--spacing", spacing)
        scores = {}
        for method in ("cubic", "cubic-dc"):
            out = WORK / f"ov_{thickness:g}_{method}.nii.gz"
            run("upsample", thick, out, "--spacing", "2", "--method", method)
            res = run("evaluate", out, WORK / "thin.nii.gz", "--overlap", "--json")
            import json

            scores[method] = json.loads(res.out)["psnr"]
        ok = scores["cubic-dc"] >= scores["cubic"]
        return ok, f"cubic {scores['cubic']:.2f} dB, cubic-dc {scores['cubic-dc']:.2f} dB"

    return Case(f"overlapping slices: {thickness:g} mm every {spacing:g} mm -> 2 mm",
                f"thinslice degrade thin.nii.gz ov.nii.gz --thickness {thickness:g} --spacing {spacing:g}; upsample "
                "--method cubic / cubic-dc; evaluate --overlap", "cubic-dc >= cubic", check)


def startup_case() -> Case:
    def check() -> tuple[bool, str]:
        res = run("--version")
        return res.rc == 0 and res.seconds < 2.0, f"{res.seconds:.2f} s"

    return Case("start-up", "thinslice --version", "under 1 s on an idle machine", check)


# --------------------------------------------------------------------------------- real-archive oddities (issue 18)
_NATIVE_NOISE = ("Traceback", "UserWarning", "SimpleITK-build", "WARNING: In ")


def make_archives() -> dict[str, object]:
    """The odd archives of :mod:`thinslice.data.odd` (phantom-based), and what a correct reader must find."""
    from thinslice.data import odd
    from thinslice.io import write_volume

    A = WORK / "archives"  # noqa: N806
    A.mkdir()
    logging.getLogger("thinslice").setLevel(logging.ERROR)  # this process reads some of them: keep its notes quiet
    truth = {"tilt": odd.tilted_series(A / "tilt"), "shear": odd.sheared_nifti(A / "shear.nii"),
             "shear_sform_only": odd.sheared_nifti(A / "shear_sform_only.nii", qform=False)}
    odd.sagittal_series(A / "sagittal")
    odd.radiographs(A / "dx")
    (A / "enhanced").mkdir()
    odd.enhanced_multiframe(A / "enhanced" / "mr.dcm")
    odd.write_series(odd.phantom(), A / "damaged")
    odd.overlay_object(A / "damaged" / "ot.dcm")
    odd.damaged_file(A / "damaged" / "broken.dcm")
    odd.series_with_topogram(A / "topogram")
    odd.sparse_series(A / "sparse")
    odd.mixed_size_series(A / "mixed_sizes")
    odd.many_series(A / "study", series=24, slices=35)
    write_volume(odd.phantom(n=8, size=48, spacing=(1.0, 1.0, 5.0)), A / "thick5.nii.gz")
    (A / "full").mkdir()
    (A / "full" / "keep.txt").write_text("a file the user had")
    return truth


def _no_uids(text: str) -> str:
    import re

    return re.sub(r"\b\d+(\.\d+){5,}\b", "<UID>", text)


def one_line_case(name: str, args: list[object], expect_text: str) -> Case:
    """rc 2 and exactly one line on stderr (no warning, no native library text before it)."""
    def check() -> tuple[bool, str]:
        res = run(*args)
        lines = res.err.strip().splitlines()
        ok = res.rc == 2 and len(lines) == 1 and expect_text in lines[0]
        return ok, f"rc {res.rc}, {len(lines)} line(s): {_no_uids(res.message)[:170]}"

    return Case(name, "thinslice " + " ".join(_short(a) for a in args), f"rc 2, one line: ...{expect_text}...",
                check)


def _marker_error(out: Path, expected: np.ndarray) -> tuple[float, float]:
    """(in-plane, through-plane) distance in mm between the marker in ``out`` and where it truly is."""
    from thinslice.data import odd
    from thinslice.io import read_volume

    vol = read_volume(out)
    found = odd.world(vol, odd.marker_index(vol))
    normal = vol.direction[:, vol.slice_axis]
    diff = found - expected
    along = float(np.dot(diff, normal))
    return float(np.linalg.norm(diff - along * normal)), abs(along)


def geometry_case(name: str, source: Path, expected: np.ndarray, spacing: float = 1.0) -> Case:
    """upsample must end rc 0 with the marker where it is in the patient (in-plane exactly, through-plane within a
    quarter of the thin spacing: the upsampling itself blurs the marker along that axis), and no native text."""
    out = WORK / f"{source.name.split('.')[0]}_thin.nii.gz"
    args = ["upsample", source, out, "--spacing", spacing, "--method", "cubic", "--dtype", "float32"]

    def check() -> tuple[bool, str]:
        res = run(*args)
        if res.rc != 0:
            return False, f"rc {res.rc}: {res.message[:150]}"
        inplane, through = _marker_error(out, expected)
        noise = [n for n in _NATIVE_NOISE if n in res.err]
        ok = inplane < 0.01 and through < spacing / 4 and not noise and len(res.err.strip().splitlines()) == 1
        return ok, (f"rc 0, marker off by {inplane:.3f} mm in-plane, {through:.3f} mm through-plane; "
                    f"{res.message[:110]}" + (f"; native text: {noise}" if noise else ""))

    return Case(name, "thinslice " + " ".join(_short(a) for a in args),
                "rc 0, one note, marker at its true world position", check)


def dcm2niix_case(name: str, folder: Path, nifti_name: str = "out.nii") -> Case:
    """Our read of a DICOM folder and our read of dcm2niix's conversion of it hold the same voxels at the same world
    positions (nearest-neighbour resampling of one onto the other changes nothing)."""
    def check() -> tuple[bool, str]:
        import shutil

        tool = shutil.which("dcm2niix")
        if tool is None:
            return True, "skipped (dcm2niix is not installed: apt-get install dcm2niix)"
        import SimpleITK as sitk

        from thinslice.io import read_volume
        from thinslice.io.writers import volume_to_image

        out = WORK / f"{folder.name}_dcm2niix"
        out.mkdir()
        subprocess.run([tool, "-z", "n", "-f", "out", "-o", str(out), str(folder)], capture_output=True, check=True)
        ours, theirs = read_volume(folder), read_volume(out / nifti_name)
        back = sitk.Resample(volume_to_image(theirs), volume_to_image(ours), sitk.Transform(),
                             sitk.sitkNearestNeighbor, -9e3)
        worst = float(np.abs(sitk.GetArrayFromImage(back) - ours.array).max())
        return worst < 0.05, f"largest voxel difference {worst:.3g} HU on our grid ({ours.shape_ijk})"

    return Case(name, f"thinslice info {_short(folder)}; dcm2niix {_short(folder)}", "same voxels, same world "
                "positions (HU within 0.05)", check)


def said_case(name: str, args: list[object], expect_text: str) -> Case:
    """rc 0, no traceback or native text, and the line (stdout or stderr) that says ``expect_text``."""
    def check() -> tuple[bool, str]:
        res = run(*args)
        said = next((line for line in (res.out + res.err).splitlines() if expect_text in line), "")
        noise = [n for n in _NATIVE_NOISE if n in res.err]
        return res.rc == 0 and bool(said) and not noise, f"rc {res.rc}: {_no_uids(said.strip())[:170]}"

    return Case(name, "thinslice " + " ".join(_short(a) for a in args), f"rc 0, says ...{expect_text}...", check)


def quiet_case(name: str, args: list[object]) -> Case:
    def check() -> tuple[bool, str]:
        res = run("-q", *args)
        return res.rc == 0 and not res.err.strip(), f"rc {res.rc}, stderr {res.err.strip()[:120]!r}"

    return Case(name, "thinslice -q " + " ".join(_short(a) for a in args), "rc 0, nothing on stderr", check)


def listing_case(study: Path, series: int) -> Case:
    def check() -> tuple[bool, str]:
        res = run("info", study)
        lines = res.out.strip().splitlines()
        numbers = [int(line.split()[0][1:]) for line in lines[1:-1] if line.startswith("#")]
        ok = res.rc == 0 and numbers == list(range(1, series + 1)) and lines[-1].startswith("also ") \
            and not res.err.strip()
        return ok, f"rc {res.rc}, {len(lines)} lines, {res.seconds:.1f} s; {lines[1][:60] if len(lines) > 1 else ''}"

    files = len(list(study.iterdir())) if study.exists() else 0
    return Case(f"11. listing {series} series / {files} files", f"thinslice info {_short(study)}",
                "rc 0, one line per series sorted by SeriesNumber, then one summary line", check)


def archive_cases(truth: dict[str, object]) -> list[Case]:
    A = WORK / "archives"  # noqa: N806
    out = WORK / "a.nii.gz"
    thick5 = A / "thick5.nii.gz"
    up5 = ["upsample", thick5, out, "--overwrite"]
    return [
        geometry_case("1. NIfTI with a sheared sform (dcm2niix, uncorrected tilt) and a qform", A / "shear.nii",
                      truth["shear"]),
        geometry_case("1. NIfTI with only a sheared sform", A / "shear_sform_only.nii", truth["shear_sform_only"]),
        geometry_case("2. gantry-tilted DICOM series (15 degrees)", A / "tilt", truth["tilt"]),
        quiet_case("2. gantry tilt with -q", ["upsample", A / "tilt", out, "--spacing", "1", "--method", "cubic",
                   "--overwrite"]),
        dcm2niix_case("2. gantry tilt against dcm2niix (its sheared-sform output)", A / "tilt"),
        said_case("3. sagittal DICOM series: slices along its stacking axis", ["info", A / "sagittal"],
                "slice axis:      k (LR), 14 slices every 1.1 mm"),
        dcm2niix_case("3. sagittal series against dcm2niix", A / "sagittal"),
        one_line_case("4. DX radiographs without position or pixel spacing", ["info", A / "dx"],
                      "no patient geometry"),
        one_line_case("4. Enhanced MR multi-frame file", ["info", A / "enhanced"], "convert it with dcm2niix"),
        said_case("5. a damaged file and an OT overlay object beside a series", ["info", A / "damaged", "--series",
                "1"], "skipped 1 file(s) that are not readable DICOM: broken.dcm"),
        error_case("5. picking the OT overlay object (after the note on broken.dcm)", ["info", A / "damaged",
                   "--series", "99"], "no patient geometry"),
        one_line_case("6. planes, 5 mm slices, --spacing 1.5: the suggestion", [*up5, "--spacing", "1.5",
                      "--method", "planes"], "use --spacing 1.25 (the nearest finer one)"),
        said_case("6. planes with the suggested-looking --spacing 1.667", [*up5, "--spacing", "1.667", "--method",
                "planes"], "8 -> 24 slices"),
        said_case("6. default method with --spacing 1.6667", [*up5, "--spacing", "1.6667"], "taken as 1.66667 mm"),
        *[one_line_case(f"7. --spacing {v}", [*up5, "--spacing", v], "must be a positive number of mm")
          for v in ("0", "-0", "nan")],
        said_case("8. topogram with the series' own SeriesInstanceUID", ["upsample", A / "topogram", out,
                "--spacing", "1", "--method", "cubic", "--overwrite"],
                "of another orientation (scout/topogram) left out"),
        *[one_line_case(f"9. output {name} (refused before the input is read)", ["upsample",
          WORK / "never_read.nii.gz", target, "--spacing", "2"], text) for name, target, text in (
            (".xyz", WORK / "o.xyz", "unknown output format"), (".dcm", WORK / "o.dcm", "series folder"),
            ("non-empty folder", str(A / "full") + "/", "not empty"), ("/dev/stdout", "/dev/stdout",
            "not a regular file"), ("-", "-", "not a stream"))],
        said_case("10. two slices 45 mm apart", ["upsample", A / "sparse", out, "--spacing", "5", "--method", "cubic",
                                                 "--overwrite"],
                "sparse stack (2 slices 45 mm apart"),
        one_line_case("10. --thickness 0", [*up5, "--spacing", "2.5", "--thickness", "0"],
                      "--thickness must be a positive number"),
        one_line_case("10. mixed image sizes in one series", ["info", A / "mixed_sizes"], "mixes image sizes"),
        listing_case(A / "study", 24),
    ]


def dicom_output_case(name: str, patient: str | None, sagittal: bool = False) -> Case:
    """12. DICOM out keeps the study: the checks of benchmarks/dicom_output_check.py (pydicom attributes, dciodvfy,
    dcm2niix against the NIfTI output) on one input; ``patient`` None is a NIfTI input."""
    import contextlib
    import io

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import dicom_output_check as dicom_out

    def check() -> tuple[bool, str]:
        work = WORK / f"dicom_out_{'nifti' if patient is None else len(name)}"
        work.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()):
            failures = (dicom_out.check_nifti_case(work, "cubic", 2.5) if patient is None
                        else dicom_out.check_case(work, patient, "cubic", 2.5, sagittal=sagittal))
        return not failures, "; ".join(failures) or "kept/new attributes as listed, dciodvfy and dcm2niix agree"

    return Case(name, "thinslice upsample DICOM_IN OUT_FOLDER/ --spacing 2.5 --method cubic; pydicom, dciodvfy, "
                "dcm2niix", "study kept, new derived series, no dciodvfy Error, dcm2niix = NIfTI output", check)


# ------------------------------------------------------------------------------------------------------- all
def cases(p: dict[str, Path]) -> list[Case]:
    W = WORK  # noqa: N806
    up = ["upsample", p["thick"], W / "o.nii.gz", "--overwrite", "--spacing", "2"]
    return [
        error_case("2D image", ["info", W / "slice2d.nii.gz"], "2D image"),
        error_case("random bytes named .nii.gz", ["info", p["garbage"]], "cannot read"),
        error_case("first half of a .nii.gz", ["info", p["cut_gz"]], "truncated"),
        error_case("first half of a .nii", ["info", p["cut_nii"]], "truncated"),
        error_case("gzip CRC damaged", ["info", p["crc"]], "corrupt"),
        error_case("NIfTI without voxel size", ["info", p["nopix"]], "no voxel size"),
        error_case("NaN voxels", ["info", W / "nan.mha"], "NaN"),
        error_case("4D image", ["info", W / "four_d.nii.gz"], "4D image"),
        error_case("one slice only", ["info", W / "one_slice.nii.gz"], "one slice"),
        error_case("missing input", ["info", W / "nothing.nii.gz"], "does not exist"),
        error_case("empty folder as input", ["info", W / "empty_dir"], "is empty"),
        ok_case("MR-like values (0..4000)", ["info", W / "mr.nii.gz"], "does not look like CT"),
        ok_case("NIfTI whose qform and sform disagree (negative pixdim)", ["info", p["conflict"]],
                "using the sform"),
        error_case("unknown method", [*up, "--method", "bicubic"], "unknown upsampling method"),
        error_case("negative spacing", ["upsample", p["thick"], W / "o.nii.gz", "--spacing", "-1"], "positive"),
        error_case("spacing coarser than the input", ["upsample", p["thick"], W / "o.nii.gz", "--spacing", "20"],
                   "coarser"),
        error_case("implausible spacing 0.0005 mm", ["upsample", p["thick"], W / "o.nii.gz", "--spacing", "0.0005"],
                   "not a CT slice spacing"),
        error_case("implausible --thickness 1000", [*up, "--method", "cubic-dc", "--thickness", "1000"],
                   "more than 6x"),
        ok_case("--thickness 20 on an 8 mm stack (file says 8)", [*up, "--method", "cubic-dc", "--thickness", "20"],
                "differs from the 8 mm"),
        ok_case("--thickness 0.5 (gapped slices)", [*up, "--method", "cubic-dc", "--thickness", "0.5"]),
        error_case("unknown profile", [*up, "--profile", "lorentzian"], "invalid choice"),
        error_case("planes: spacing that does not divide the slices", [*up[:-1], "3", "--method", "planes",
                   "--checkpoint", W / "tiny_planes"], "divides the slice spacing"),
        error_case("planes: factor the weights were not trained for", ["upsample", p["thick6"], W / "o6.nii.gz",
                   "--spacing", "2", "--method", "planes", "--checkpoint", W / "tiny_planes"], "trained for factors"),
        error_case("missing checkpoint folder", [*up, "--method", "planes", "--checkpoint", W / "no_such"],
                   "not found"),
        error_case("checkpoint is an unrelated file", [*up, "--method", "planes", "--checkpoint", p["thin"]],
                   "is a file"),
        error_case("truncated weights file", [*up, "--method", "planes", "--checkpoint", W / "cut_planes"],
                   "not a safetensors"),
        error_case("weights of another preset", [*up, "--method", "planes", "--checkpoint", W / "tiny_planes",
                   "--preset", "small"], "pass --preset tiny"),
        ok_case("a learned-method flag with cubic", [*up, "--method", "cubic", "--precision", "bf16"], "ignored"),
        error_case("output = input", ["upsample", p["thick"], p["thick"], "--spacing", "2"], "is the input",
                   unchanged=[p["thick"]]),
        error_case("output folder holds the input", ["upsample", p["thick"], W, "--spacing", "2"], "contains the input",
                   unchanged=[p["thick"]]),
        error_case("DICOM output into a non-empty folder", ["upsample", p["thick"], W / "series/", "--spacing", "2"],
                   "not empty", unchanged=[W / "series" / "keep.txt"]),
        error_case("values beyond int16", ["upsample", W / "hot.nii.gz", W / "hot_out.nii.gz", "--spacing", "2",
                   "--method", "cubic"], "--dtype float32"),
        disk_full_case(".nii.gz"),
        disk_full_case(".nii"),
        disk_full_case("/"),
        read_only_case(),
        sigterm_case(),
        stale_temp_case(),
        broken_pipe_case(),
        error_case("degrade: spacing finer than the input", ["degrade", p["thin"], W / "d.nii.gz", "--thickness", "5",
                   "--spacing", "1"], "finer than the input"),
        error_case("degrade: a single slab", ["degrade", p["thin"], W / "d.nii.gz", "--thickness", "100",
                   "--spacing", "90"], "only one"),
        error_case("train: --out is an input file", ["train-planes", "--data", W / "data", "--preset", "tiny", "--out",
                   W / "data" / "ct.nii.gz"], "is a file"),
        error_case("train: fp16 on a CPU", ["train-planes", "--data", W / "data", "--preset", "tiny", "--out",
                   W / "fp16", "--device", "cpu", "--mixed-precision", "fp16"], "needs a GPU"),
        resume_damaged_case(),
        error_case("train: existing run without --resume", ["train-planes", "--data", W / "data", "--preset", "tiny",
                   "--out", W / "run", "--device", "cpu"], "--resume"),
        overlap_case(4.0, 2.0),
        overlap_case(6.0, 2.0),
        overlap_case(10.0, 2.0),
        overlap_case(12.0, 4.0),
        startup_case(),
        *archive_cases(p["archives"]),  # type: ignore[arg-type]
        dicom_output_case("12. DICOM out from a DICOM series (non-ASCII patient name)", "Müller^Jörg"),
        dicom_output_case("12. DICOM out from a sagittal DICOM series", "Yamada^Tarou", sagittal=True),
        dicom_output_case("12. DICOM out from a NIfTI input (type 2 empty, nothing invented)", None),
    ]


def group_cases() -> list[Case]:
    """The cases of every ``reliability_<group>.py`` beside this script, in file-name order."""
    import importlib

    found: list[Case] = []
    for module_file in sorted(Path(__file__).parent.glob("reliability_*.py")):
        if module_file.stem != "reliability_harness":
            found.extend(importlib.import_module(module_file.stem).cases())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/reliability.md")
    parser.add_argument("--only", type=int, nargs="+", metavar="N",
                        help="re-run only these rows (1-based) and print them as table rows; the page is not written")
    args = parser.parse_args()
    inputs = make_inputs()
    rows = []
    for index, case in enumerate([*cases(inputs), *group_cases()], 1):
        if args.only and index not in args.only:
            continue
        try:
            ok, observed = case.check()
        except Exception as exc:  # a case that crashes the harness is a failed case, not a crashed report
            ok, observed = False, f"harness error: {type(exc).__name__}: {exc}"
        observed = observed.replace(str(WORK) + "/", "")
        status = "ok" if ok else "FAIL"
        print(f"{index:2d} {status:4s} {case.name}: {observed}", flush=True)
        rows.append(f"| {index} | {case.name} | `{case.command}` | {case.expected} | {status} | "
                    f"{observed.replace('|', '/')} |")
    failed = sum("| FAIL |" in r for r in rows)
    if args.only:
        print("\n".join(rows))
        sys.exit(1 if failed else 0)
    header = ("| # | case | command | expected | result | observed |\n|---|---|---|---|---|---|\n")
    text = Path(args.out).read_text() if Path(args.out).exists() else ""
    marker = "<!-- table -->"
    table = f"{marker}\n{header}" + "\n".join(rows) + f"\n\n{len(rows) - failed} of {len(rows)} cases as expected.\n"
    text = text.split(marker)[0] + table if marker in text else table
    Path(args.out).write_text(text)
    for mount in (WORK / "small_nii_gz", WORK / "small_nii", WORK / "small_", WORK / "ro"):
        subprocess.run(["umount", str(mount)], capture_output=True)
    print(f"{len(rows) - failed} of {len(rows)} cases as expected; wrote {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
