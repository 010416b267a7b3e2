"""Reliability cases of the command line: existing outputs, the thin grid's extent, very short stacks, symbolic-link
loops, outputs under a file, implausible spacings and the ranges of numeric options.

    PYTHONPATH=src:benchmarks .venv/bin/python -c \
        "import reliability_cli as m; [print(c.name, c.check()) for c in m.cases()]"
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from reliability_harness import WORK, Case, _short, error_case, ok_case, run

W = WORK / "cli"


@functools.cache
def inputs() -> dict[str, Path]:
    """Small synthetic volumes (32 x 32 in-plane) and the odd paths the cases need, made once."""
    from thinslice.data.phantom import make_chest_phantom
    from thinslice.degrade.profiles import degrade
    from thinslice.io import write_volume

    W.mkdir(parents=True, exist_ok=True)
    thin = make_chest_phantom(shape=(64, 32, 32), spacing=(1.0, 1.0, 1.0), seed=5)
    thick = degrade(thin, factor=4)
    p = {"thin": write_volume(thin, W / "thin.nii.gz"), "thick": write_volume(thick, W / "thick.nii.gz")}
    for n, name in ((2, "two"), (3, "three"), (5, "five"), (8, "eight")):
        part = thick.with_slices(thick.slices_first()[:n], thick.slice_spacing, 0.0, thick.slice_thickness)
        p[name] = write_volume(part, W / f"{name}.nii.gz")
    # 4.8 mm slices stored a hair short (float32 4.7999997): the extent is 84 slices of 2 mm, 56 of 3 mm.
    flat = make_chest_phantom(shape=(35, 32, 32), spacing=(1.0, 1.0, 4.7999997), seed=6)
    p["t48"] = write_volume(flat, W / "t48.nii.gz")
    p["t48_11"] = write_volume(flat.with_slices(flat.slices_first()[:11], 4.8, 0.0, 4.8), W / "t48_11.nii.gz")
    (W / "existing.nii.gz").write_bytes(b"a file the user had")
    (W / "fresh_std.nii.gz").write_bytes(b"a std map the user had")
    (W / "afile").write_text("a regular file")
    for a, b in (("loop_a", "loop_b"), ("loop_b", "loop_a")):
        if not os.path.islink(W / a):
            os.symlink(b, W / a)
    (W / "series").mkdir(exist_ok=True)
    (W / "series" / "keep.txt").write_text("a file the user had")
    return p


def _lazy_error(name: str, make_args, expect: str, unchanged=()) -> Case:
    """:func:`error_case` whose arguments (and files to keep) are built when the case runs."""
    def check() -> tuple[bool, str]:
        p = inputs()
        return error_case(name, make_args(p), expect, [W / u for u in unchanged]).check()

    shown = make_args({k: Path(f"cli/{k}.nii.gz") for k in ("thin", "thick", "two", "three", "five", "eight", "t48",
                                                             "t48_11")})
    return Case(name, "thinslice " + " ".join(_short(a) for a in shown), f"rc 2, one line: ...{expect}...", check)


def _lazy_ok(name: str, make_args, expect: str = "") -> Case:
    def check() -> tuple[bool, str]:
        return ok_case(name, make_args(inputs()), expect).check()

    return Case(name, "thinslice " + " ".join(_short(a) for a in make_args({k: Path(k) for k in (
        "thin", "thick", "two", "three", "t48")})), "rc 0" + (f", says ...{expect}..." if expect else ""), check)


# ----------------------------------------------------------------------------------------------- existing outputs
def overwrite_case() -> Case:
    """Refused without --overwrite (the file untouched); replaced, with a note, with it."""
    def check() -> tuple[bool, str]:
        p = inputs()
        out = W / "ow.nii.gz"
        out.write_bytes(b"previous")
        first = run("upsample", p["thick"], out, "--spacing", "1", "--method", "cubic")
        kept = out.read_bytes() == b"previous"
        second = run("upsample", p["thick"], out, "--spacing", "1", "--method", "cubic", "--overwrite")
        ok = (first.rc == 2 and "pass --overwrite" in first.message and kept and second.rc == 0
              and "replaced the existing" in second.err and out.read_bytes() != b"previous")
        return ok, f"without: rc {first.rc}, file kept {kept}; with --overwrite: rc {second.rc}, {second.message[:80]}"

    return Case("upsample onto an existing file, then with --overwrite",
                "thinslice upsample thick.nii.gz ow.nii.gz [--overwrite]",
                "rc 2 'exists; pass --overwrite' (file kept), then rc 0 'replaced the existing'", check)


def demo_rerun_case() -> Case:
    """``make demo`` twice: the demo owns its folder, so the second run replaces its own files and says so."""
    def check() -> tuple[bool, str]:
        out = W / "demo_out"
        args = ("demo", "--out", out, "--method", "linear", "--factor", "2")
        first, second = run(*args), run(*args)
        ok = first.rc == second.rc == 0 and second.clean and "replacing the 6 files of an earlier demo" in second.err
        return ok, f"rc {first.rc}, then rc {second.rc}: {second.err.strip().splitlines()[0][:120]}"

    return Case("demo run twice into one folder", "thinslice demo --out demo_out --method linear --factor 2 (twice)",
                "rc 0 both; the second says it replaces the earlier demo's files", check)


def prepare_case() -> Case:
    def check() -> tuple[bool, str]:
        src, out = W / "prep_src", W / "prep_out"
        src.mkdir(exist_ok=True)
        out.mkdir(exist_ok=True)
        (out / "series.csv").write_text("the user's table")
        res = run("prepare", src, out, "--no-progress")
        ok = res.rc == 2 and res.clean and "pass --overwrite" in res.message
        ok = ok and (out / "series.csv").read_text() == "the user's table"
        return ok, f"rc {res.rc}: {res.message[:140]}"

    return Case("prepare into a folder holding series.csv", "thinslice prepare prep_src prep_out",
                "rc 2, one line, series.csv kept", check)


# --------------------------------------------------------------------------------------------------- thin grid
def grid_case(name: str, key: str, spacing: float, n_expected: int) -> Case:
    """The output has ``n_expected`` slices, centred on the input's extent (equal margins at both ends, each less
    than one output slice), inside it."""
    def check() -> tuple[bool, str]:
        from thinslice.io import read_volume

        p = inputs()
        out = W / f"grid_{key}_{spacing:g}.nii.gz"
        res = run("upsample", p[key], out, "--spacing", spacing, "--method", "cubic", "--overwrite")
        if res.rc != 0:
            return False, f"rc {res.rc}: {res.message[:140]}"
        thick, thin = read_volume(p[key]), read_volume(out)
        c, t = thick.slice_positions_mm(), thin.slice_positions_mm()
        low = (t[0] - spacing / 2) - (c[0] - thick.slice_spacing / 2)
        high = (c[-1] + thick.slice_spacing / 2) - (t[-1] + spacing / 2)
        ok = thin.num_slices == n_expected and abs(low - high) < 1e-3 and -1e-3 < low < spacing
        return ok, (f"{thick.num_slices} -> {thin.num_slices} slices (expected {n_expected}); margins {low:.3f} "
                    f"and {high:.3f} mm; first/last {t[0]:.2f}/{t[-1]:.2f} mm for input {c[0]:.2f}/{c[-1]:.2f}")

    return Case(name, f"thinslice upsample {key}.nii.gz out.nii.gz --spacing {spacing:g} --method cubic",
                f"rc 0, {n_expected} slices centred on the input's extent", check)


def lattice_case() -> Case:
    """degrade at a non-integer factor, upsample back, evaluate --overlap: the grid lands on the thin slices."""
    def check() -> tuple[bool, str]:
        p = inputs()
        thick, up = W / "d25.nii.gz", W / "d25_up.nii.gz"
        a = run("degrade", p["thin"], thick, "--factor", "2.5", "--overwrite")
        b = run("upsample", thick, up, "--spacing", "1", "--method", "cubic", "--overwrite")
        c = run("evaluate", up, p["thin"], "--overlap")
        ok = a.rc == b.rc == c.rc == 0 and "kept 24 of the 25" in a.err and "24 -> 60 slices" in b.out
        return ok, f"degrade rc {a.rc} ({a.message[:70]}); upsample rc {b.rc}; evaluate --overlap rc {c.rc}"

    return Case("degrade --factor 2.5, upsample back, evaluate --overlap",
                "thinslice degrade thin.nii.gz d25.nii.gz --factor 2.5; upsample ... --spacing 1; evaluate --overlap",
                "rc 0 each; degrade keeps 24 of 25 slabs so the grid lies on the thin slices", check)


def memory_case() -> Case:
    """An output grid beyond this machine's memory is refused before any method runs (skipped where it fits)."""
    def check() -> tuple[bool, str]:
        from thinslice.data.phantom import make_chest_phantom
        from thinslice.io import write_volume
        from thinslice.memory import available_memory

        spacing, per_slice = 0.05, 10 / 0.05 * 256 * 256 * 4 * 3  # output bytes of work per 10 mm input slice
        n = int(2 * available_memory() / per_slice) + 1  # twice what there is
        if n > 400:
            return True, f"skipped (this machine's memory would need a {n}-slice input)"
        src = W / f"deep{n}.nii.gz"
        if not src.exists():
            write_volume(make_chest_phantom(shape=(n, 256, 256), spacing=(1.5, 1.5, 10.0), seed=7), src)
        res = run("upsample", src, W / "deep_out.nii.gz", "--spacing", spacing, "--method", "cubic")
        ok = res.rc == 2 and res.clean and "available" in res.message and res.seconds < 60
        return ok, f"rc {res.rc} in {res.seconds:.1f} s: {res.message[:120]}"

    return Case("output grid beyond memory (10 mm slices at 0.05 mm, twice this machine's memory)",
                "thinslice upsample deepN.nii.gz out.nii.gz --spacing 0.05 --method cubic",
                "rc 2, one line saying the memory, before any work", check)


# ---------------------------------------------------------------------------------------------------- the writer
def nonfinite_write_case() -> Case:
    """A NaN volume is not written: the message says why (not 'disk full'), the previous file stays."""
    def check() -> tuple[bool, str]:
        from thinslice.errors import ThinsliceError
        from thinslice.io import write_volume
        from thinslice.io.volume import Volume

        out = W / "nan_out.nii.gz"
        out.write_bytes(b"previous")
        array = np.zeros((4, 8, 8), np.float32)
        array[1, 2, 3] = np.nan
        try:
            write_volume(Volume(array, (1.0, 1.0, 2.0)), out, dtype="float32")
            return False, "written without a word"
        except ThinsliceError as exc:
            ok = "NaN or infinite" in str(exc) and "full" not in str(exc) and out.read_bytes() == b"previous"
            return ok, str(exc)[:150]

    return Case("write_volume of a NaN volume", "write_volume(nan_volume, 'nan_out.nii.gz')",
                "one line naming the non-finite values, previous file unchanged", check)


def cases() -> list[Case]:
    up = ["upsample"]
    return [
        overwrite_case(),
        _lazy_error("degrade onto an existing file", lambda p: ["degrade", p["thin"], W / "existing.nii.gz",
                    "--factor", "4"], "exists; pass --overwrite", unchanged=["existing.nii.gz"]),
        _lazy_error("upsample --uncertainty beside an existing std map", lambda p: [*up, p["thick"], W / "fresh.nii.gz",
                    "--spacing", "1", "--method", "planes", "--uncertainty"],
                    "fresh_std.nii.gz exists; pass --overwrite", unchanged=["fresh_std.nii.gz"]),
        demo_rerun_case(),
        prepare_case(),
        _lazy_error("DICOM output into a non-empty folder (kept)", lambda p: [*up, p["thick"], W / "series/",
                    "--spacing", "1", "--overwrite"], "not empty", unchanged=["series/keep.txt"]),
        grid_case("thin grid: 4.8 mm (stored 4.7999997) -> 2 mm", "t48", 2.0, 84),
        grid_case("thin grid: 4.8 mm -> 3 mm", "t48", 3.0, 56),
        grid_case("thin grid: 11 x 4.8 mm -> 3 mm (17 slices, 1.8 mm left over)", "t48_11", 3.0, 17),
        grid_case("thin grid: 4 mm -> 1 mm (divisor: as before)", "thick", 1.0, 64),
        lattice_case(),
        _lazy_error("2 slices, cubic-dc", lambda p: [*up, p["two"], W / "o2.nii.gz", "--spacing", "1", "--method",
                    "cubic-dc"], "needs at least 3 slices"),
        _lazy_error("2 slices, planes --uncertainty", lambda p: [*up, p["two"], W / "o2.nii.gz", "--spacing", "1",
                    "--method", "planes", "--uncertainty"], "needs at least 3 slices"),
        _lazy_error("2 slices, ldm", lambda p: [*up, p["two"], W / "o2.nii.gz", "--spacing", "1", "--method", "ldm"],
                    "needs at least 3 slices"),
        _lazy_ok("2 slices, auto (falls back to cubic)", lambda p: [*up, p["two"], W / "o2a.nii.gz", "--spacing", "1",
                 "--overwrite"], "2 -> 8 slices"),
        _lazy_ok("3 slices, planes", lambda p: [*up, p["three"], W / "o3.nii.gz", "--spacing", "1", "--method",
                 "planes", "--overwrite"], "3 -> 12 slices"),
        _lazy_error("input is a symbolic-link loop", lambda p: [*up, W / "loop_a", W / "o.nii.gz", "--spacing", "1"],
                    "loops back on itself"),
        _lazy_error("output is a symbolic-link loop", lambda p: [*up, p["thick"], W / "loop_a", "--spacing", "1"],
                    "loops back on itself"),
        _lazy_error("output under a regular file", lambda p: [*up, p["thick"], W / "afile" / "o.nii.gz", "--spacing",
                    "1"], "is a file, not a folder"),
        _lazy_error("--spacing 0.001", lambda p: [*up, p["thick"], W / "o.nii.gz", "--spacing", "0.001"],
                    "not a CT slice spacing"),
        _lazy_error("degrade --thickness 5000", lambda p: ["degrade", p["thin"], W / "d.nii.gz", "--thickness",
                    "5000"], "not a CT slice spacing"),
        memory_case(),
        nonfinite_write_case(),
        _lazy_error("selfcheck on 5 slices", lambda p: ["selfcheck", p["five"]], "needs at least 6"),
        _lazy_error("selfcheck on 8 slices at --factor 4", lambda p: ["selfcheck", p["eight"]],
                    "use --factor 3 or smaller"),
        _lazy_error("--samples 100000000", lambda p: [*up, p["thick"], W / "o.nii.gz", "--spacing", "1", "--samples",
                    "100000000"], "from 1 to 64"),
        _lazy_error("degrade --factor 0", lambda p: ["degrade", p["thin"], W / "d.nii.gz", "--factor", "0"],
                    "from 1 to 64"),
        _lazy_error("--patch-size 0 0 0", lambda p: [*up, p["thick"], W / "o.nii.gz", "--spacing", "1",
                    "--patch-size", "0", "0", "0"], "from 4 to 4096"),
        _lazy_error("evaluate --trim -1", lambda p: ["evaluate", p["thick"], p["thick"], "--trim", "-1"],
                    "from 0 to"),
        _lazy_error("train-planes --max-steps 0", lambda p: ["train-planes", "--data", p["thin"], "--out",
                    W / "run", "--max-steps", "0"], "from 1 to"),
        _lazy_error("selfcheck --factor 1", lambda p: ["selfcheck", p["thick"], "--factor", "1"], "from 2 to 16"),
    ]
