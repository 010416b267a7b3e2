"""``thinslice batch`` under stress: formula-like cells, --out inside the inputs, repeated manifest rows, other
people's files under output names, kills and SIGTERM mid-run, temporaries of live writers, symlinked folders."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from thinslice.cli.main import main
from thinslice.cohort import Settings, run_batch
from thinslice.cohort.ledger import Ledger
from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade.profiles import degrade
from thinslice.io import read_volume, write_volume
from thinslice.io.volume import Volume

CUBIC = Settings(spacing=1.25, method="cubic-dc", thumbnails=False)


def _thick(seed: int = 1, shape: tuple[int, int, int] = (20, 24, 24), pixel: float = 9.0) -> Volume:
    thin = make_chest_phantom(shape=shape, spacing=(pixel, pixel, 1.25), seed=seed)
    return degrade(thin, thickness=5.0, spacing=5.0)


def _table(out: Path) -> list[dict]:
    with open(out / "cases.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]


def _volumes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".nii.gz"))


# ------------------------------------------------------------------------------------------- formula cells
def test_spreadsheet_safe_cells():
    from thinslice.io.tables import spreadsheet_safe

    for text in ("=HYPERLINK(\"http://x\",\"y\")", "+1", "-cmd", "@SUM(A1)", "\tx", "\rx"):
        assert spreadsheet_safe(text) == "'" + text
    assert spreadsheet_safe("ct1") == "ct1" and spreadsheet_safe(-1000) == -1000 and spreadsheet_safe(2.5) == 2.5


def test_formula_like_names_are_neutralised_in_cases_csv(tmp_path, monkeypatch):
    """An input folder and a file named like formulas: every text cell of cases.csv starting with = + - @ gets a
    quote; negative numbers stay numbers."""
    monkeypatch.chdir(tmp_path)
    evil = Path("=HYPERLINK(\"http---x\",\"y\")")
    write_volume(_thick(), evil / "=cmd|' calc'!A0.nii.gz")
    assert run_batch([evil], tmp_path / "out", CUBIC, progress=False).exit_code == 0
    row = _table(tmp_path / "out")[0]
    assert row["input"].startswith("'=HYPERLINK") and row["label"] == "'=cmd|' calc'!A0.nii.gz"
    assert int(row["hu_min"]) < 0  # numbers are not text
    for value in row.values():
        assert not value.startswith(("=", "+", "@", "\t", "\r")) and not (value.startswith("-") and not
                                                                          value.lstrip("-").replace(".", "").isdigit())


def test_prepare_table_is_formula_safe():
    from thinslice.io.prepare import SeriesRow, _csv_text

    text = _csv_text([SeriesRow(patient="=HYPERLINK(1)", series_uid="1.2", modality="CT", source="@x")])
    row = next(csv.DictReader(text.splitlines()))
    assert row["patient"] == "'=HYPERLINK(1)" and row["source"] == "'@x"


# ------------------------------------------------------------------------------ --out inside the inputs
@pytest.mark.parametrize("inside", [False, True], ids=["out-is-input", "out-under-input"])
def test_out_inside_the_inputs_never_reingests_its_outputs(tmp_path, inside):
    inputs = tmp_path / "in"
    for seed in (1, 2):
        write_volume(_thick(seed), inputs / f"ct{seed}.nii.gz")
    out = inputs / "thin" if inside else inputs
    for run in range(3):
        result = run_batch([inputs], out, CUBIC, progress=False)
        assert result.exit_code == 0 and result.counts == {"done": 2}
        assert (result.ran, result.already_done) == ((2, 0) if run == 0 else (0, 2))
    assert len(_journal(out)) == 2
    names = _volumes(out)
    assert len(names) == (4 if not inside else 2)  # the two inputs (when out is the input folder) and two outputs
    assert read_volume(inputs / "ct1.nii.gz").spacing[2] == pytest.approx(5.0)  # no output landed on an input


# ---------------------------------------------------------------------------------- repeated manifest rows
def _manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["input", "output", "spacing", "method"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_identical_manifest_rows_are_one_case_reported_in_one_line(tmp_path, caplog):
    write_volume(_thick(), tmp_path / "ct.nii.gz")
    manifest = _manifest(tmp_path / "m.csv", [{"input": "ct.nii.gz", "spacing": "2.5"}] * 1000)
    with caplog.at_level(logging.WARNING, logger="thinslice"):
        result = run_batch([manifest], tmp_path / "out", CUBIC, progress=False)
    assert result.ran == 1 and result.counts == {"done": 1}
    lines = [r.getMessage() for r in caplog.records if "given" in r.getMessage()]
    assert len(lines) == 1 and "1000 times" in lines[0] and "m.csv line 2" in lines[0]
    assert "again at line 3, line 4" in lines[0] and "994 more" in lines[0]


def test_same_input_with_different_settings_is_one_case_each(tmp_path):
    write_volume(_thick(), tmp_path / "ct.nii.gz")
    manifest = _manifest(tmp_path / "m.csv", [{"input": "ct.nii.gz", "spacing": s, "method": m}
                                              for s, m in (("2.5", ""), ("1.25", ""), ("2.5", "cubic"))])
    result = run_batch([manifest], tmp_path / "out", CUBIC, progress=False)
    assert result.ran == 3 and result.counts == {"done": 3}
    rows = _journal(tmp_path / "out")
    assert len({r["output"] for r in rows}) == 3 and len({r["key"] for r in rows}) == 3
    got = sorted((round(read_volume(r["output"]).spacing[2], 2), r["method"]) for r in rows)
    assert got == [(1.25, "cubic-dc"), (2.5, "cubic"), (2.5, "cubic-dc")]
    assert run_batch([manifest], tmp_path / "out", CUBIC, progress=False).ran == 0  # keys and names are stable


# ------------------------------------------------------------------------------------ other people's files
def test_foreign_output_needs_overwrite(tmp_path, caplog):
    write_volume(_thick(), tmp_path / "in" / "ct.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "ct.nii.gz").write_bytes(b"somebody's file")
    args = ["batch", str(tmp_path / "in"), "--out", str(out), "--spacing", "1.25", "--method", "cubic-dc"]
    with caplog.at_level(logging.WARNING, logger="thinslice"):
        assert main([*args, "-q"]) == 1
    assert (out / "ct.nii.gz").read_bytes() == b"somebody's file"
    assert "--overwrite" in _journal(out)[-1]["reason"] and "not from this batch" in _journal(out)[-1]["reason"]
    assert main([*args, "-q", "--overwrite"]) == 0
    assert read_volume(out / "ct.nii.gz").spacing[2] == pytest.approx(1.25)


def test_claimed_output_of_a_killed_run_is_redone_not_failed(tmp_path):
    """A worker renamed its output into place, then the driver died before recording it: the output was claimed
    before the case started, so the re-run redoes it instead of calling it somebody else's file."""
    write_volume(_thick(), tmp_path / "in" / "ct.nii.gz")
    out = tmp_path / "out"
    key = str((tmp_path / "in" / "ct.nii.gz").resolve())
    with Ledger(out) as ledger:
        ledger.claim(key, "old-signature", [str(out / "ct.nii.gz")])
    write_volume(_thick(2), out / "ct.nii.gz")  # the killed run's (complete) output
    result = run_batch([tmp_path / "in"], out, CUBIC, progress=False)
    assert result.counts == {"done": 1}
    assert read_volume(out / "ct.nii.gz").spacing[2] == pytest.approx(1.25)


# ---------------------------------------------------------------------------------------------- the ledger
def test_ledger_journal_view_is_rebuilt_and_old_folders_imported(tmp_path):
    write_volume(_thick(), tmp_path / "in" / "ct.nii.gz")
    out = tmp_path / "out"
    run_batch([tmp_path / "in"], out, CUBIC, progress=False)
    journal = (out / "cases.jsonl").read_text()
    (out / "cases.jsonl").write_text(journal[: len(journal) // 2])  # a lagging, torn view
    with Ledger(out) as ledger:
        assert len(ledger.rows) == 1
    assert (out / "cases.jsonl").read_text() == journal
    # A folder of an older version: a journal, no database; its outputs stay the batch's own.
    (out / "cases.sqlite").unlink()
    result = run_batch([tmp_path / "in"], out, CUBIC, progress=False)
    assert (result.ran, result.counts) == (0, {"done": 1}) and (out / "cases.jsonl").read_text() == journal


# ---------------------------------------------------------------------------------------- temporaries
def test_a_live_writer_with_a_foreign_pid_keeps_its_temporary(tmp_path):
    """A writer in another PID namespace (its PID means nothing here) holds its lock: cleanup leaves it; once it is
    killed, its lock is free and the next cleanup removes it."""
    from thinslice.io.atomic import TEMP_PREFIX, remove_stale_temporaries

    code = ("import sys, time; import thinslice.io.atomic as a; "
            "a.temp_prefix = lambda: a.TEMP_PREFIX + '999999999-'; "
            "ctx = a.make_temp_dir(sys.argv[1]); d = ctx.__enter__(); print(d, flush=True); time.sleep(60)")
    writer = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        folder = Path(writer.stdout.readline().strip())
        assert folder.name.startswith(f"{TEMP_PREFIX}999999999-") and folder.is_dir()
        assert remove_stale_temporaries(tmp_path) == [] and folder.is_dir()
    finally:
        writer.kill()
        writer.wait()
    assert folder in remove_stale_temporaries(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_no_locking_means_no_deleting(tmp_path, monkeypatch):
    import errno

    import thinslice.io.atomic as atomic

    dead = tmp_path / f"{atomic.TEMP_PREFIX}1-abcdefgh"
    dead.mkdir()
    (tmp_path / f"{dead.name}.lock").touch()

    class NoLocks:
        LOCK_EX, LOCK_NB = 2, 4

        @staticmethod
        def flock(fd, op):
            raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(atomic, "fcntl", NoLocks)
    assert atomic.remove_stale_temporaries(tmp_path) == [] and dead.is_dir()
    atomic.write_text_atomic(tmp_path / "a.txt", "x")  # writing still works without locks
    assert (tmp_path / "a.txt").read_text() == "x"


# --------------------------------------------------------------------------------------- symlinked folders
def test_symlinked_folders_are_followed_once(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_volume(_thick(1), elsewhere / "linked.nii.gz")
    write_volume(_thick(2), tmp_path / "in" / "real" / "ct.nii.gz")
    (tmp_path / "in" / "link").symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / "in" / "link2").symlink_to(elsewhere, target_is_directory=True)  # the same folder twice
    (tmp_path / "in" / "real" / "loop").symlink_to(tmp_path / "in", target_is_directory=True)  # a loop
    result = run_batch([tmp_path / "in"], tmp_path / "out", CUBIC, progress=False)
    assert result.counts == {"done": 2} and _volumes(tmp_path / "out") == ["ct.nii.gz", "linked.nii.gz"]


# ---------------------------------------------------------------------------------- workers and the driver
def test_workers_die_with_their_parent():
    """A process that armed die_with_parent ends when its parent is killed with SIGKILL (forked here: no start-up)."""
    from thinslice.cohort.local import die_with_parent

    read, write = os.pipe()
    middle = os.fork()
    if middle == 0:  # the parent-to-be: starts the worker, reports its pid, waits to be killed
        worker = os.fork()
        if worker == 0:
            die_with_parent(os.getppid())
            time.sleep(60)
            os._exit(0)
        os.write(write, f"{worker}\n".encode())
        time.sleep(60)
        os._exit(0)
    worker = psutil.Process(int(os.read(read, 64).decode()))
    os.kill(middle, signal.SIGKILL)
    os.waitpid(middle, 0)
    worker.wait(timeout=5)  # psutil.TimeoutExpired if it outlived its parent


def _kill_mid_run(tmp_path: Path, sig: signal.Signals) -> None:
    """``batch --workers 2`` on 6 cases, ``sig`` to the driver once the first case is recorded: no process of it
    survives 5 s, and the re-run does every other case, each exactly once; ledger rows = outputs = cases."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    volume = _thick(1, shape=(64, 80, 80), pixel=4.0)
    for i in range(6):
        write_volume(volume, inputs / f"case{i}.nii.gz")
    command = [sys.executable, "-m", "thinslice.cli.main", "batch", str(inputs), "--out", str(out), "--spacing",
               "1.25", "--method", "cubic-dc", "-q", "--workers", "2", "--no-thumbnails"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    journal, deadline = out / "cases.jsonl", time.monotonic() + 120
    while not (journal.exists() and journal.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.01)
    children = psutil.Process(driver.pid).children(recursive=True)
    driver.send_signal(sig)
    assert driver.wait() == (-signal.SIGKILL if sig == signal.SIGKILL else 143)
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"orphaned: {alive}"
    before = _journal(out)
    assert 1 <= len(before) < 6 and all(r["status"] == "done" for r in before)
    assert subprocess.run(command, env=env, stderr=subprocess.DEVNULL).returncode == 0
    after = _journal(out)
    assert after[: len(before)] == before and all(r["status"] == "done" for r in after)
    assert sorted(r["name"] for r in after) == [f"case{i}" for i in range(6)]  # each case done exactly once
    assert _volumes(out) == [f"case{i}.nii.gz" for i in range(6)]
    assert not [p for p in out.iterdir() if p.name.startswith(".thinslice-tmp-")]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_batch_killed_mid_run_resumes_each_case_once(tmp_path, sig):
    _kill_mid_run(tmp_path, sig)
