"""The ledger of a cohort: ``DIR/cases.sqlite`` (the record), exported as ``DIR/cases.jsonl`` and ``DIR/cases.csv``.

The record is an SQLite database (WAL mode, exclusive locking, ``synchronous=FULL``): one row per case with its
latest outcome, every outcome in order (``events``), and every output path the batch has claimed (``outputs``).
Each change is one transaction, committed before the driver goes on, so a ``kill -9`` loses at most the cases in
flight and never leaves a half-written record. A case's output paths are claimed *before* the case is handed to a
worker: an output that exists under a claimed name is this batch's own (a complete file, as every write is atomic),
so a resume replaces it by redoing its case instead of failing it as somebody else's file; and discovery never
takes such a file for an input when ``--out`` lies inside an input folder.

``cases.jsonl`` (every finished row, in order) and ``cases.csv`` (the latest row per case, for a spreadsheet) are
views for people and scripts; ``cases.jsonl`` is rewritten from the record whenever it lags behind it (a kill
between the commit and the append). Only the driver writes any of them: workers return their rows, which keeps the
ledger consistent however many machines run the cases. A folder of an older version (a journal, no database) is
imported on first use.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from thinslice.io.atomic import write_text_atomic
from thinslice.io.tables import spreadsheet_safe

log = logging.getLogger(__name__)

DATABASE = "cases.sqlite"
JOURNAL = "cases.jsonl"
TABLE = "cases.csv"
# The ledger's own files in DIR (never inputs, whatever folder is searched).
LEDGER_FILES = (DATABASE, DATABASE + "-wal", DATABASE + "-shm", DATABASE + "-journal", JOURNAL, TABLE)
COLUMNS = ("name", "status", "reason", "input", "series_uid", "input_bytes", "input_sha256", "output", "method",
           "requested_method", "factor", "spacing_in_mm", "spacing_out_mm", "shape_in", "shape_out",
           "dc_residual_hu", "hu_min", "hu_max", "seconds", "peak_memory_mb", "std_output", "wide_fraction",
           "uncertainty", "warnings", "flags", "worker", "finished", "key", "signature", "label")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, row TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (key TEXT PRIMARY KEY, status TEXT NOT NULL, row TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outputs (path TEXT PRIMARY KEY, key TEXT NOT NULL, signature TEXT NOT NULL);
"""


class Ledger:
    """The latest row of every case of ``out_dir`` (from earlier runs too), the claimed outputs, and the means to add
    rows. Use it as a context manager (or call :meth:`close`)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.journal = self.out_dir / JOURNAL
        self.table = self.out_dir / TABLE
        self.database = self.out_dir / DATABASE
        fresh = not self.database.exists()
        self._db = _connect(self.database)
        if fresh:
            self._import_journal()
        self.rows: dict[str, dict] = {k: json.loads(r) for k, r in self._db.execute("SELECT key, row FROM cases")}
        self._outputs = {p for (p,) in self._db.execute("SELECT path FROM outputs")}
        self._sync_journal()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    # ----------------------------------------------------------------------------------------------- queries
    def is_done(self, key: str, signature: str, output: str) -> bool:
        """Whether ``key`` finished with this signature (same input files and settings) and its output is there."""
        row = self.rows.get(key)
        return bool(row and row.get("status") == "done" and row.get("signature") == signature
                    and Path(output).exists())

    def owns(self, output: str) -> bool:
        """Whether ``output`` was written (or claimed for writing) by this batch, so replacing it loses nothing of
        the user's."""
        return _norm(output) in self._outputs

    def written(self) -> set[str]:
        """Every path the batch wrote or claimed (outputs, std maps), absolute."""
        return set(self._outputs)

    def names(self) -> dict[str, str]:
        """Output name of every case with one (key -> name), so that re-runs keep names stable."""
        return {k: r["name"] for k, r in self.rows.items() if r.get("name")}

    # ----------------------------------------------------------------------------------------------- changes
    def claim(self, key: str, signature: str, paths: Iterable[str]) -> None:
        """Record, before a case is handed to a worker, the paths it may write: from then on they are this batch's,
        whether the driver lives to record the case's row or not."""
        with _signals_deferred(), self._db:
            self._db.executemany("INSERT OR REPLACE INTO outputs (path, key, signature) VALUES (?, ?, ?)",
                                 [(_norm(p), key, signature) for p in paths if p])
        self._outputs.update(_norm(p) for p in paths if p)

    def record(self, row: dict) -> bool:
        """Commit ``row`` as its case's latest outcome (and append it to the journal) unless it repeats the case's
        latest row; True when recorded. Claims of the case that name no existing file are released."""
        previous = self.rows.get(row["key"])
        if previous is not None and _same_outcome(previous, row):
            return False
        clean = {c: row.get(c, "") for c in COLUMNS}
        text = json.dumps(clean, default=str)
        with _signals_deferred():
            with self._db:
                self._db.execute("INSERT INTO events (key, row) VALUES (?, ?)", (clean["key"], text))
                self._db.execute("INSERT OR REPLACE INTO cases (key, status, row) VALUES (?, ?, ?)",
                                 (clean["key"], clean["status"], text))
                self._release_missing(clean["key"])
            self.rows[clean["key"]] = json.loads(text)
            with open(self.journal, "a", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return True

    def _release_missing(self, key: str) -> None:
        paths = [p for (p,) in self._db.execute("SELECT path FROM outputs WHERE key = ?", (key,))]
        gone = [p for p in paths if not os.path.lexists(p)]
        self._db.executemany("DELETE FROM outputs WHERE path = ?", [(p,) for p in gone])
        self._outputs.difference_update(gone)

    def write_table(self) -> Path:
        """Rewrite ``cases.csv`` (atomically) from the latest rows, in name order; text cells that a spreadsheet
        would run as a formula are neutralised."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for row in sorted(self.rows.values(), key=lambda r: (r.get("name") or "", r.get("key") or "")):
            writer.writerow({c: spreadsheet_safe(_cell(row.get(c, ""))) for c in COLUMNS})
        return write_text_atomic(self.table, buffer.getvalue())

    # ------------------------------------------------------------------------------------------ the views
    def _import_journal(self) -> None:
        """A folder written by an older version: its journal becomes the record (done outputs claimed)."""
        rows = read_journal(self.journal)
        if not rows:
            return
        with self._db:
            for row in rows:
                text = json.dumps(row, default=str)
                self._db.execute("INSERT INTO events (key, row) VALUES (?, ?)", (row["key"], text))
                self._db.execute("INSERT OR REPLACE INTO cases (key, status, row) VALUES (?, ?, ?)",
                                 (row["key"], row.get("status", ""), text))
                if row.get("status") == "done":
                    self._db.executemany("INSERT OR REPLACE INTO outputs (path, key, signature) VALUES (?, ?, ?)",
                                         [(_norm(p), row["key"], row.get("signature", ""))
                                          for p in (row.get("output"), row.get("std_output")) if p])
        log.info("%s: imported %d row(s) of %s into %s", self.out_dir, len(rows), JOURNAL, DATABASE)

    def _sync_journal(self) -> None:
        """Rewrite ``cases.jsonl`` from the record when it is not exactly the record's events (lagging, torn)."""
        events = [r for (r,) in self._db.execute("SELECT row FROM events ORDER BY seq")]
        try:
            current = self.journal.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            current = None
        if current != events and (events or current):
            write_text_atomic(self.journal, "".join(e + "\n" for e in events))


def _connect(path: Path) -> sqlite3.Connection:
    """The ledger database, created if need be; WAL with full sync: a commit survives a kill or a power cut."""
    try:
        db = sqlite3.connect(path, timeout=30, isolation_level="DEFERRED", check_same_thread=False)
        # One writer (the batch's lock says so): exclusive locking keeps WAL's index in memory instead of a shared
        # -shm file, which is what makes WAL unsafe on NFS; where WAL is refused SQLite keeps its rollback journal.
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
    except sqlite3.DatabaseError as exc:
        from thinslice.errors import ThinsliceError

        raise ThinsliceError(f"cannot open the ledger {path}: {exc}; move it away to start the batch afresh") from None
    return db


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (main thread, POSIX), so that an interrupted driver never stops
    between the record's commit and the journal's line."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def read_journal(path: Path) -> list[dict]:
    """The journal's rows in order; unreadable lines (a write torn by a kill) are skipped with a note."""
    if not path.exists():
        return []
    rows, torn = [], 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if isinstance(row, dict) and row.get("key"):
                rows.append(row)
    if torn:
        log.info("%s: ignored %d incomplete line(s) (a run was killed while writing)", path, torn)
    return rows


def _norm(path: str) -> str:
    return os.path.abspath(os.path.normpath(str(path).rstrip("/" + os.sep) or str(path)))


def _same_outcome(a: dict, b: dict) -> bool:
    """Skipped rows are re-derived on every run; repeating one unchanged would only grow the journal."""
    return a.get("status") == b.get("status") == "skipped" and a.get("reason") == b.get("reason")


def _cell(value: object) -> object:
    if isinstance(value, list | tuple):
        return "; ".join(str(v) for v in value)
    return value
