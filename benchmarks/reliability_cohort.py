"""Reliability cases for ``thinslice batch`` (and the atomic-write temporaries every writer uses): formula-like
cells in the CSV tables, ``--out`` inside an input folder, repeated manifest rows, other people's files under output
names, a driver killed (``kill -9``, SIGTERM) in the middle of ``--workers 2``, temporaries of a live writer whose
process id means nothing here (another container or host), and symlinked folders. Every input is built here."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from reliability_harness import THINSLICE, WORK, Case, run

HERE = WORK / "cohort"
CUBIC = ["--spacing", "1.25", "--method", "cubic-dc", "--no-thumbnails"]


# ------------------------------------------------------------------------------------------------- inputs
def _folder(name: str) -> Path:
    path = HERE / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _thick(seed: int = 1, shape: tuple[int, int, int] = (20, 24, 24), pixel: float = 9.0):
    from thinslice.data.phantom import make_chest_phantom
    from thinslice.degrade.profiles import degrade

    return degrade(make_chest_phantom(shape=shape, spacing=(pixel, pixel, 1.25), seed=seed), thickness=5.0,
                   spacing=5.0)


def _write(path: Path, seed: int = 1, **kwargs: object) -> Path:
    from thinslice.io import write_volume

    return Path(write_volume(_thick(seed, **kwargs), path))


def _dicom(folder: Path, patient: str) -> None:
    from thinslice.io import write_volume

    volume = _thick(3)
    volume.metadata.update(patient_id=patient)
    write_volume(volume, str(folder) + "/")


def _table(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _journal(out: Path) -> list[dict]:
    path = out / "cases.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _volumes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".nii.gz"))


def _manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["input", "output", "spacing", "method"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _spacing(path: str) -> float:
    from thinslice.io import read_volume

    return round(float(read_volume(path).spacing[2]), 3)


def _warnings(err: str, text: str) -> list[str]:
    return [line for line in err.splitlines() if "warning:" in line and text in line]


def _failed_lines(err: str, text: str) -> list[str]:
    """The lines naming a failed case (error lines, so that they show under -q too) that contain ``text``."""
    return [line for line in err.splitlines() if "error: failed" in line and text in line]


# ------------------------------------------------------------------------------------------ formula cells
def formula_cells_case() -> Case:
    def check() -> tuple[bool, str]:
        root = _folder("formula")
        evil = root / "=HYPERLINK(\"http---x\",\"y\")"
        _write(evil / "=cmd|' calc'!A0.nii.gz")
        _dicom(root / "dicom", "=HYPERLINK(\"http://evil\",\"x\")")
        proc = subprocess.run([*THINSLICE, "batch", evil.name, "dicom", "--out", "out", *CUBIC, "-q"], cwd=root,
                              capture_output=True, text=True)
        rows = _table(root / "out" / "cases.csv")
        cells = [v for r in rows for k, v in r.items() if k not in ("hu_min", "hu_max")]
        bad = [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
        quoted = [c for c in cells if c.startswith("'=")]
        ok = proc.returncode == 0 and len(rows) == 2 and not bad and len(quoted) >= 3
        return ok, f"rc {proc.returncode}, {len(rows)} rows, {len(quoted)} cells quoted ('=...), {len(bad)} live"

    return Case("batch: formula-like file, folder and PatientID in cases.csv",
                "thinslice batch '=HYPERLINK(...)' dicom(PatientID =HYPERLINK) --out out",
                "rc 0; every text cell starting with = + - @ TAB CR starts with ' in cases.csv", check)


def prepare_formula_case() -> Case:
    def check() -> tuple[bool, str]:
        root = _folder("prepare_formula")
        src = "=cmd|' /C calc'!A0"
        _dicom(root / src / "s1", "P1")
        proc = subprocess.run([*THINSLICE, "prepare", src, "out", "--min-slices", "2", "--max-slice-spacing", "10",
                               "--no-progress"], cwd=root, capture_output=True, text=True)
        rows = _table(root / "out" / "series.csv")
        cells = [v for r in rows for v in r.values()]
        live = [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
        quoted = [c for c in cells if c.startswith("'=")]
        ok = proc.returncode == 0 and rows and quoted and not live
        return bool(ok), f"rc {proc.returncode}, {len(rows)} row(s), cells quoted {quoted[:2]}, live {live}"

    return Case("prepare: a source folder named like a formula, in series.csv",
                "thinslice prepare \"=cmd|' /C calc'!A0\" out", "rc 0; the source cell starts with '", check)


# ------------------------------------------------------------------------------- --out inside the inputs
def out_in_inputs_case(inside: bool) -> Case:
    def check() -> tuple[bool, str]:
        root = _folder("out_under_input" if inside else "out_is_input")
        for seed in (1, 2):
            _write(root / f"ct{seed}.nii.gz", seed)
        out = root / "thin" if inside else root
        seen = []
        for _ in range(3):
            res = run("batch", root, "--out", out, *CUBIC)
            seen.append((res.rc, len(_journal(out)), len(_volumes(out))))
        expected_files = 2 if inside else 4
        ok = all(s == (0, 2, expected_files) for s in seen) and _spacing(str(root / "ct1.nii.gz")) == 5.0
        return ok, f"(rc, ledger rows, volume files in --out) per run: {seen}; inputs untouched"

    where = "a subfolder of the input folder" if inside else "the input folder itself"
    return Case(f"batch: --out is {where}, run 3 times", f"thinslice batch in --out {'in/thin' if inside else 'in'} "
                "(x3)", "2 cases on every run; outputs never re-ingested, no output over an input", check)


# ---------------------------------------------------------------------------------- repeated manifest rows
def repeated_rows_case(count: int) -> Case:
    def check() -> tuple[bool, str]:
        root = _folder(f"repeat_{count}")
        _write(root / "ct.nii.gz")
        manifest = _manifest(root / "cohort.csv", [{"input": "ct.nii.gz", "spacing": "2.5"}] * count)
        res = run("batch", manifest, "--out", root / "out", *CUBIC)
        lines = _warnings(res.err, "given")
        rows = _journal(root / "out")
        ok = res.rc == 0 and len(rows) == 1 and len(lines) == 1 and f"{count} times" in lines[0]
        return ok, f"rc {res.rc}, {len(rows)} case(s) run; {len(lines)} warning: {(lines or [''])[0][-90:]}"

    return Case(f"batch: manifest with {count:,} identical rows", f"thinslice batch cohort.csv ({count} x ct.nii.gz)",
                "one case, run once; one warning line naming the repeated lines", check)


def different_settings_case() -> Case:
    def check() -> tuple[bool, str]:
        root = _folder("repeat_settings")
        _write(root / "ct.nii.gz")
        manifest = _manifest(root / "cohort.csv", [{"input": "ct.nii.gz", "spacing": s, "method": m}
                                                   for s, m in (("2.5", ""), ("1.25", ""), ("2.5", "cubic"))])
        res = run("batch", manifest, "--out", root / "out", *CUBIC)
        rows = _journal(root / "out")
        got = sorted((_spacing(r["output"]), r["method"]) for r in rows if r["status"] == "done")
        ok = res.rc == 0 and len({r["output"] for r in rows}) == 3 and got == [(1.25, "cubic-dc"), (2.5, "cubic"),
                                                                             (2.5, "cubic-dc")]
        return ok, f"rc {res.rc}, outputs {[Path(r['output']).name for r in rows]}, (spacing, method) {got}"

    return Case("batch: manifest rows with one input, different spacings/methods",
                "thinslice batch cohort.csv (ct.nii.gz at 2.5, 1.25, 2.5 cubic)",
                "three cases, three outputs with distinct names, each at its own spacing and method", check)


# --------------------------------------------------------------------------------- other people's files
def foreign_output_case(overwrite: bool) -> Case:
    def check() -> tuple[bool, str]:
        root = _folder("foreign_overwrite" if overwrite else "foreign")
        for seed in (1, 2):
            _write(root / "in" / f"ct{seed}.nii.gz", seed)
        (root / "out").mkdir()
        for seed in (1, 2):
            (root / "out" / f"ct{seed}.nii.gz").write_bytes(b"the user's own file")
        res = run("batch", root / "in", "--out", root / "out", *CUBIC, *(["--overwrite"] if overwrite else []))
        kept = [(root / "out" / f"ct{s}.nii.gz").read_bytes() == b"the user's own file" for s in (1, 2)]
        lines = _failed_lines(res.err, "not from this batch")
        if overwrite:
            ok = res.rc == 0 and not any(kept) and _spacing(str(root / "out" / "ct1.nii.gz")) == 1.25
            return ok, f"rc {res.rc}, replaced {kept.count(False)} of 2"
        ok = res.rc == 1 and all(kept) and len(lines) == 2 and all("--overwrite" in line for line in lines)
        return ok, f"rc {res.rc}, files kept {kept}; {len(lines)} lines: {(lines or [''])[0][-95:]}"

    if overwrite:
        return Case("batch --overwrite: files of the user's under the output names",
                    "thinslice batch in --out out --overwrite (out/ct1, ct2 exist)", "rc 0; both replaced", check)
    return Case("batch: files of the user's under the output names", "thinslice batch in --out out (out/ct1, ct2 "
                "exist)", "rc 1; both kept byte for byte; one line per case naming --overwrite", check)


# ------------------------------------------------------------------------------ the driver killed mid-run
def kill_case(sig: signal.Signals) -> Case:
    name = "kill -9" if sig == signal.SIGKILL else "SIGTERM"

    def check() -> tuple[bool, str]:
        import psutil

        root = _folder(f"kill_{sig.name.lower()}")
        for i in range(6):
            _write(root / "in" / f"case{i}.nii.gz", 1, shape=(64, 80, 80), pixel=4.0)
        out = root / "out"
        command = [*THINSLICE, "batch", root / "in", "--out", out, *CUBIC, "--workers", "2", "-q"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        driver = subprocess.Popen([str(c) for c in command], env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not _journal(out) and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.01)
        children = psutil.Process(driver.pid).children(recursive=True)
        driver.send_signal(sig)
        rc = driver.wait()
        _, alive = psutil.wait_procs(children, timeout=5)
        rows_then, files_then = len(_journal(out)), len(_volumes(out))
        rerun = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True)
        rows = _journal(out)
        done = [r["name"] for r in rows if r["status"] == "done"]
        once = sorted(done) == [f"case{i}" for i in range(6)] and len(rows) == 6
        ok = (rc == (-9 if sig == signal.SIGKILL else 143) and not alive and 1 <= rows_then < 6
              and rerun.returncode == 0 and once and len(_volumes(out)) == 6)
        return ok, (f"rc {rc}; {len(children)} children, {len(alive)} alive after 5 s; at the kill {rows_then} rows, "
                    f"{files_then} outputs; re-run rc {rerun.returncode}: {len(rows)} rows, {len(done)} done, "
                    f"{len(_volumes(out))} outputs, each case once: {once}")

    return Case(f"batch --workers 2: driver gets {name} mid-run, then re-run",
                f"thinslice batch in(6 cases) --out out --workers 2; {name} after the first row; re-run",
                f"rc {'-9' if sig == signal.SIGKILL else '143'}; no worker alive 5 s later; re-run rc 0, ledger rows = "
                "outputs = 6 cases, each done once", check)


def claimed_output_case() -> Case:
    def check() -> tuple[bool, str]:
        from thinslice.cohort.ledger import Ledger

        root = _folder("claimed")
        source = _write(root / "in" / "ct.nii.gz")
        with Ledger(root / "out") as ledger:  # the killed run claimed the output and a worker renamed it in place
            ledger.claim(str(source.resolve()), "the killed run's signature", [str(root / "out" / "ct.nii.gz")])
        _write(root / "out" / "ct.nii.gz", 2)
        res = run("batch", root / "in", "--out", root / "out", *CUBIC)
        rows = _journal(root / "out")
        ok = res.rc == 0 and [r["status"] for r in rows] == ["done"] and \
            _spacing(str(root / "out" / "ct.nii.gz")) == 1.25
        return ok, f"rc {res.rc}, rows {[(r['name'], r['status'], r['reason'][:40]) for r in rows]}"

    return Case("batch: output of a case in flight when the driver died (claimed, not recorded)",
                "thinslice batch in --out out (out/ct.nii.gz claimed in the ledger, no row)",
                "rc 0; the case is redone, never failed as somebody else's file", check)


def old_ledger_case() -> Case:
    def check() -> tuple[bool, str]:
        root = _folder("old_ledger")
        _write(root / "in" / "ct.nii.gz")
        first = run("batch", root / "in", "--out", root / "out", *CUBIC)
        (root / "out" / "cases.sqlite").unlink()  # as an older version left it: the journal only
        again = run("batch", root / "in", "--out", root / "out", *CUBIC)
        rows = _journal(root / "out")
        ok = first.rc == again.rc == 0 and len(rows) == 1 and "0 run now, 1 already done" in again.out
        return ok, f"rc {first.rc}/{again.rc}; {len(rows)} row; {again.out.strip()[-60:]}"

    return Case("batch: --out of an older version (cases.jsonl, no cases.sqlite)",
                "thinslice batch in --out out (journal only)", "rc 0; imported, nothing redone", check)


# ----------------------------------------------------------------------------------------- temporaries
def foreign_writer_case() -> Case:
    def check() -> tuple[bool, str]:
        root = _folder("foreign_writer")
        source = _write(root / "ct.nii.gz")
        code = ("import sys, time; import thinslice.io.atomic as a; "
                "a.temp_prefix = lambda: a.TEMP_PREFIX + '999999999-'; "
                "ctx = a.make_temp_dir(sys.argv[1]); d = ctx.__enter__(); print(d, flush=True); time.sleep(120)")
        writer = subprocess.Popen([sys.executable, "-c", code, str(root / "shared")], stdout=subprocess.PIPE,
                                  text=True)
        try:
            temp = Path(writer.stdout.readline().strip())
            first = run("degrade", source, root / "shared" / "a.nii.gz", "--factor", "1")
            kept = temp.name.startswith(".thinslice-tmp-999999999-") and temp.is_dir()
        finally:
            writer.kill()
            writer.wait()
        second = run("degrade", source, root / "shared" / "b.nii.gz", "--factor", "1")
        left = [p.name for p in (root / "shared").iterdir() if p.name.startswith(".thinslice-tmp-")]
        ok = first.rc == second.rc == 0 and kept and not left
        return ok, (f"rc {first.rc}: a running write's folder {temp.name} (pid not ours) kept: {kept}; writer killed, "
                    f"rc {second.rc}: left {left}")

    return Case("temporaries: a running write whose PID means nothing here (container, NFS host)",
                "writer in shared/ (name .thinslice-tmp-999999999-...), thinslice degrade ct shared/a.nii.gz",
                "rc 0; the running write's temporary is kept (its lock is held); removed once the writer is gone",
                check)


# ------------------------------------------------------------------------------------- symlinked folders
def symlink_case() -> Case:
    def check() -> tuple[bool, str]:
        root = _folder("symlinks")
        _write(root / "elsewhere" / "linked.nii.gz", 1)
        _write(root / "in" / "real" / "ct.nii.gz", 2)
        (root / "in" / "link").symlink_to(root / "elsewhere", target_is_directory=True)
        res = run("batch", root / "in", "--out", root / "out", *CUBIC)
        ok = res.rc == 0 and _volumes(root / "out") == ["ct.nii.gz", "linked.nii.gz"]
        return ok, f"rc {res.rc}: outputs {_volumes(root / 'out')}"

    return Case("batch: a symlinked subfolder", "thinslice batch in (in/link -> ../elsewhere) --out out",
                "rc 0; the linked folder's volume is a case", check)


def symlink_loop_case() -> Case:
    def check() -> tuple[bool, str]:
        root = _folder("symlink_loop")
        _write(root / "in" / "a" / "ct.nii.gz", 1)
        (root / "in" / "a" / "up").symlink_to(root / "in", target_is_directory=True)  # a loop
        (root / "in" / "again").symlink_to(root / "in" / "a", target_is_directory=True)  # the same folder twice
        res = run("batch", root / "in", "--out", root / "out", *CUBIC, timeout=120)
        rows = _journal(root / "out")
        ok = res.rc == 0 and len(rows) == 1 and _volumes(root / "out") == ["ct.nii.gz"]
        return ok, f"rc {res.rc}: {len(rows)} case(s), outputs {_volumes(root / 'out')}"

    return Case("batch: a symlink loop and two links to one folder",
                "thinslice batch in (in/a/up -> in, in/again -> in/a) --out out",
                "rc 0; ends; the one volume is one case", check)


def cases() -> list[Case]:
    HERE.mkdir(parents=True, exist_ok=True)
    return [formula_cells_case(), prepare_formula_case(), out_in_inputs_case(False), out_in_inputs_case(True),
            repeated_rows_case(3), repeated_rows_case(10_000), different_settings_case(), foreign_output_case(False),
            foreign_output_case(True), kill_case(signal.SIGKILL), kill_case(signal.SIGTERM), claimed_output_case(),
            old_ledger_case(), foreign_writer_case(), symlink_case(), symlink_loop_case()]
