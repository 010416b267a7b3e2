"""The ledger of a cohort: ``DIR/cases.jsonl`` (the journal) and ``DIR/cases.csv`` (the table for a spreadsheet).

The journal gets one JSON line per finished case, flushed and fsync'ed before the next case is reported, so that a
``kill -9`` loses at most the cases in flight; a torn last line (killed while writing) is ignored when read back.
The CSV is rewritten atomically from the journal's latest row per case. Only the driver writes either file: workers
return their rows, which keeps the ledger consistent however many machines run the cases.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path

from thinslice.io.atomic import write_text_atomic

log = logging.getLogger(__name__)

JOURNAL = "cases.jsonl"
TABLE = "cases.csv"
COLUMNS = ("name", "status", "reason", "input", "series_uid", "input_bytes", "input_sha256", "output", "method",
           "requested_method", "factor", "spacing_in_mm", "spacing_out_mm", "shape_in", "shape_out",
           "dc_residual_hu", "hu_min", "hu_max", "seconds", "peak_memory_mb", "std_output", "wide_fraction",
           "uncertainty", "warnings", "flags", "worker", "finished", "key", "signature", "label")
STATUSES = ("done", "failed", "skipped")


class Ledger:
    """The latest row of every case of ``out_dir`` (from earlier runs too), and the means to add rows."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.journal = self.out_dir / JOURNAL
        self.table = self.out_dir / TABLE
        self.rows: dict[str, dict] = {}
        self._outputs: set[str] | None = None  # outputs of done cases, built on first use
        for row in read_journal(self.journal):
            self.rows[row["key"]] = row

    def is_done(self, key: str, signature: str, output: str) -> bool:
        """Whether ``key`` finished with this signature (same input files and settings) and its output is there."""
        row = self.rows.get(key)
        return bool(row and row.get("status") == "done" and row.get("signature") == signature
                    and Path(output).exists())

    def owns(self, output: str) -> bool:
        """Whether ``output`` was written by this batch (so replacing it loses nothing of the user's)."""
        if self._outputs is None:
            self._outputs = {os.path.normpath(r["output"]) for r in self.rows.values()
                             if r.get("status") == "done" and r.get("output")}
        return os.path.normpath(output) in self._outputs

    def record(self, row: dict) -> bool:
        """Append ``row`` to the journal (durably) unless it repeats the case's latest row; True when appended."""
        previous = self.rows.get(row["key"])
        if previous is not None and _same_outcome(previous, row):
            return False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps({c: row.get(c, "") for c in COLUMNS}, default=str) + "\n"
        with open(self.journal, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self.rows[row["key"]] = {c: row.get(c, "") for c in COLUMNS}
        self._outputs = None
        return True

    def write_table(self) -> Path:
        """Rewrite ``cases.csv`` (atomically) from the latest rows, in name order."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for row in sorted(self.rows.values(), key=lambda r: (r.get("name") or "", r.get("key") or "")):
            writer.writerow({c: _cell(row.get(c, "")) for c in COLUMNS})
        return write_text_atomic(self.table, buffer.getvalue())

    def names(self) -> dict[str, str]:
        """Output name of every case with one (key -> name), so that re-runs keep names stable."""
        return {k: r["name"] for k, r in self.rows.items() if r.get("name")}


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


def _same_outcome(a: dict, b: dict) -> bool:
    """Skipped rows are re-derived on every run; repeating one unchanged would only grow the journal."""
    return a.get("status") == b.get("status") == "skipped" and a.get("reason") == b.get("reason")


def _cell(value: object) -> object:
    if isinstance(value, list | tuple):
        return "; ".join(str(v) for v in value)
    return value
