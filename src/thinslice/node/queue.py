"""The durable job queue of the node: ``SPOOL/jobs.sqlite``, one job per received series.

States: ``received`` (instances arriving) -> ``complete`` (stable, or completed on demand) -> ``running`` ->
``processed`` (the derived series is written in the spool) -> ``sent`` (every destination has it); or ``skipped``
(no rule takes it, with the reason) or ``failed`` (parked after the last attempt, with its reason). Each change is one
committed transaction (WAL, ``synchronous=FULL``), so a ``kill -9`` loses nothing that was acknowledged. The
``sent`` table records every (derived series, destination) pair delivered: a resumed job skips those, so nothing is
sent twice; a derived series is written once (its UIDs recorded with the job), so a retried send repeats the same
instances, which a PACS stores once.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from thinslice.errors import ThinsliceError

DATABASE = "jobs.sqlite"
STATES = ("received", "complete", "running", "processed", "sent", "skipped", "failed")
FINAL = ("sent", "skipped", "failed")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    series_uid TEXT PRIMARY KEY, state TEXT NOT NULL, calling_ae TEXT NOT NULL DEFAULT '',
    modality TEXT NOT NULL DEFAULT '', instances INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL, last_received REAL NOT NULL, rule TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL DEFAULT 0, reason TEXT NOT NULL DEFAULT '',
    output TEXT NOT NULL DEFAULT '', derived_uids TEXT NOT NULL DEFAULT '', started REAL, processed REAL,
    finished REAL, changed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS sent (
    derived_uid TEXT NOT NULL, destination TEXT NOT NULL, series_uid TEXT NOT NULL, instances INTEGER NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (derived_uid, destination));
"""


@dataclass(frozen=True)
class Job:
    """One row of ``jobs``."""

    series_uid: str
    state: str
    calling_ae: str
    modality: str
    instances: int
    first_received: float
    last_received: float
    rule: str
    attempts: int
    next_try: float
    reason: str
    output: str
    derived_uids: str
    started: float | None
    processed: float | None
    finished: float | None
    changed: int


class JobQueue:
    """The jobs of one spool; safe to share between the listener's threads and the worker (one lock)."""

    def __init__(self, spool: str | Path) -> None:
        self.path = Path(spool) / DATABASE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ThinsliceError(f"cannot open the job queue {self.path}: {exc}; move it away to start afresh") \
                from None

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                count = self._db.execute(sql, args).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return count

    # ------------------------------------------------------------------------------------------ arrivals
    def received(self, series_uid: str, calling_ae: str, modality: str, now: float | None = None) -> None:
        """One new instance of ``series_uid`` is in the spool: a new job, or the job's count and clock move on. A
        finished series that receives a new instance is processed again (it changed); one in flight is flagged."""
        now = time.time() if now is None else now
        self._write("""
            INSERT INTO jobs (series_uid, state, calling_ae, modality, instances, first_received, last_received)
            VALUES (?, 'received', ?, ?, 1, ?, ?)
            ON CONFLICT(series_uid) DO UPDATE SET instances = instances + 1, last_received = excluded.last_received,
                changed = CASE WHEN state IN ('running', 'processed') THEN 1 ELSE changed END,
                attempts = CASE WHEN state IN ('sent', 'skipped', 'failed', 'complete') THEN 0 ELSE attempts END,
                state = CASE WHEN state IN ('sent', 'skipped', 'failed', 'complete') THEN 'received' ELSE state END
            """, (series_uid, calling_ae, modality, now, now))

    def adopt(self, series_uid: str, instances: int, now: float | None = None) -> None:
        """A spool folder without a job (the node was killed between the file and the record): a job for it."""
        now = time.time() if now is None else now
        self._write("INSERT OR IGNORE INTO jobs (series_uid, state, instances, first_received, last_received) "
                    "VALUES (?, 'received', ?, ?, ?)", (series_uid, instances, now, now))

    def reconcile(self, series_uid: str, on_disk: int, now: float | None = None) -> int:
        """A series with more instances on disk than its job counts (the node was killed between an instance's file
        and its record): the count corrected, and a finished job reopened (the series changed); 1 if so."""
        now = time.time() if now is None else now
        return self._write("""
            UPDATE jobs SET instances = ?, last_received = ?,
                changed = CASE WHEN state IN ('running', 'processed') THEN 1 ELSE changed END,
                attempts = CASE WHEN state IN ('sent', 'skipped', 'failed') THEN 0 ELSE attempts END,
                state = CASE WHEN state IN ('sent', 'skipped', 'failed') THEN 'received' ELSE state END
            WHERE series_uid = ? AND instances < ?""", (on_disk, now, series_uid, on_disk))

    def complete_stable(self, stable_seconds: float, now: float | None = None) -> int:
        """Mark complete every series that received nothing for ``stable_seconds``; how many."""
        now = time.time() if now is None else now
        return self._write("UPDATE jobs SET state = 'complete', next_try = 0 WHERE state = 'received' AND "
                           "last_received <= ?", (now - stable_seconds,))

    def complete(self, series_uid: str | None = None) -> int:
        """Mark complete now (on demand) one series, still receiving or parked as failed (tried afresh), or every
        series still receiving (None)."""
        if series_uid is None:
            return self._write("UPDATE jobs SET state = 'complete', next_try = 0 WHERE state = 'received'")
        return self._write("UPDATE jobs SET state = CASE WHEN derived_uids != '' THEN 'processed' ELSE 'complete' "
                           "END, next_try = 0, attempts = 0 WHERE state IN ('received', 'failed') AND series_uid = ?",
                           (series_uid,))

    def resume(self) -> int:
        """At start-up: jobs left running by a killed node go back to where their record says they were."""
        return self._write("UPDATE jobs SET state = CASE WHEN derived_uids != '' THEN 'processed' ELSE 'complete' "
                           "END, next_try = 0 WHERE state = 'running'")

    # --------------------------------------------------------------------------------------------- work
    def claim(self, now: float | None = None) -> Job | None:
        """The next job due (complete or processed, its backoff over), now running; None when there is none."""
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT series_uid FROM jobs WHERE state IN ('complete', 'processed') AND "
                                       "next_try <= ? ORDER BY last_received LIMIT 1", (now,)).fetchone()
                if row is not None:
                    self._db.execute("UPDATE jobs SET state = 'running', started = COALESCE(started, ?), "
                                     "changed = 0 WHERE series_uid = ?", (now, row[0]))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get(row[0]) if row is not None else None

    def set_rule(self, series_uid: str, rule: str) -> None:
        self._write("UPDATE jobs SET rule = ? WHERE series_uid = ?", (rule, series_uid))

    def processed(self, series_uid: str, output: str, derived_uids: list[str]) -> None:
        """The derived series is written (complete, under its final name): from now on only sending remains."""
        self._write("UPDATE jobs SET output = ?, derived_uids = ?, processed = ? WHERE series_uid = ?",
                    (output, " ".join(derived_uids), time.time(), series_uid))

    def record_sent(self, series_uid: str, derived_uid: str, destination: str, instances: int) -> None:
        self._write("INSERT OR IGNORE INTO sent (derived_uid, destination, series_uid, instances, at) VALUES "
                    "(?, ?, ?, ?, ?)", (derived_uid, destination, series_uid, instances, time.time()))

    def was_sent(self, derived_uid: str, destination: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM sent WHERE derived_uid = ? AND destination = ?",
                                    (derived_uid, destination)).fetchone() is not None

    def finish(self, series_uid: str, state: str, reason: str = "") -> None:
        """A final state (sent, skipped); a series that changed while it ran goes back to receiving instead."""
        self._write("UPDATE jobs SET state = CASE WHEN changed = 1 THEN 'received' ELSE ? END, reason = ?, "
                    "finished = ?, output = CASE WHEN changed = 1 THEN '' ELSE output END, derived_uids = CASE "
                    "WHEN changed = 1 THEN '' ELSE derived_uids END WHERE series_uid = ?",
                    (state, reason, time.time(), series_uid))

    def retry_or_park(self, series_uid: str, reason: str, max_attempts: int, backoff: float,
                      max_backoff: float = float("inf")) -> str:
        """One failed attempt: back in the queue after ``backoff * 2**(attempts-1)`` s (at most ``max_backoff``), or
        parked as failed after ``max_attempts``; the state it is left in."""
        job = self.get(series_uid)
        attempts = (job.attempts if job else 0) + 1
        if attempts >= max_attempts:
            self._write("UPDATE jobs SET state = 'failed', attempts = ?, reason = ?, finished = ? WHERE "
                        "series_uid = ?", (attempts, reason, time.time(), series_uid))
            return "failed"
        state = "processed" if job and job.derived_uids else "complete"
        wait = min(backoff * 2 ** (attempts - 1), max_backoff)
        self._write("UPDATE jobs SET state = ?, attempts = ?, reason = ?, next_try = ? WHERE series_uid = ?",
                    (state, attempts, reason, time.time() + wait, series_uid))
        return state

    # ------------------------------------------------------------------------------------------- queries
    def get(self, series_uid: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE series_uid = ?", (series_uid,)).fetchone()
        return Job(*row) if row else None

    def jobs(self) -> list[Job]:
        with self._lock:
            return [Job(*r) for r in self._db.execute("SELECT * FROM jobs ORDER BY first_received")]

    def sent_rows(self) -> list[tuple[str, str, str, int, float]]:
        with self._lock:
            return list(self._db.execute("SELECT derived_uid, destination, series_uid, instances, at FROM sent "
                                         "ORDER BY at"))
