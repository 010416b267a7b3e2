"""A cohort in one call: discover the cases, skip the ones already done, run the rest, keep the ledger, write the QC
page. :func:`run_batch` is what ``thinslice batch`` runs; the runners (local or Ray) only execute cases.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from thinslice.cohort.cases import (
    FORMATS,
    Case,
    Found,
    Settings,
    Skip,
    files_signature,
    output_path,
    settings_signature,
)
from thinslice.cohort.discover import discover
from thinslice.cohort.ledger import Ledger
from thinslice.cohort.ray_runner import RayOptions
from thinslice.cohort.report import QC_FOLDER, write_report
from thinslice.errors import ThinsliceError
from thinslice.io.atomic import atomic_output

log = logging.getLogger(__name__)

# Names the batch itself uses in DIR; a case named so gets a suffix.
RESERVED_NAMES = {QC_FOLDER, "cases", "report"}
LOCK = ".thinslice-batch.lock"


@dataclass
class BatchResult:
    """What a run did: counts by status over all cases of DIR, the cases run now, and where the outputs are."""

    out_dir: Path
    counts: Counter = field(default_factory=Counter)
    ran: int = 0
    already_done: int = 0
    report: Path | None = None

    @property
    def exit_code(self) -> int:
        """0 when no case failed (skipped inputs are not failures), 1 otherwise."""
        return 1 if self.counts.get("failed") else 0


def run_batch(inputs: Sequence[str | Path], out_dir: str | Path, settings: Settings, *, workers: int = 1,
              ray: RayOptions | None = None, progress: bool = True) -> BatchResult:
    """Upsample every case under ``inputs`` into ``out_dir``; re-running it does only what is not done yet."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ThinsliceError(f"--out {out_dir} is a file; give a folder for the outputs and the ledger")
    if settings.fmt != "auto" and settings.fmt not in FORMATS:
        raise ThinsliceError(f"unknown --format {settings.fmt!r}; use auto or one of {', '.join(FORMATS)}")
    _check_methods(settings.method)
    found, skipped = discover(inputs, exclude=out_dir)
    if not found and not skipped:
        raise ThinsliceError(f"no volume files or DICOM series found in {', '.join(map(str, inputs))}")
    with exclusive(out_dir):
        return _run(found, skipped, out_dir, settings, workers, ray, progress)


def _run(found: list[Found], skipped: list[Skip], out_dir: Path, settings: Settings, workers: int,
         ray: RayOptions | None, progress: bool) -> BatchResult:
    """Plan against the ledger, record the skips, run what is not done, rewrite the table and the QC page."""
    ledger = Ledger(out_dir)
    cases = plan(found, settings, out_dir, ledger)
    for skip in skipped:
        ledger.record(skip_row(skip))
    todo = [c for c in cases if not ledger.is_done(c.key, c.signature, c.output)]
    result = BatchResult(out_dir, ran=len(todo), already_done=len(cases) - len(todo))
    log.info("%d case(s): %d to run, %d already done; %d input(s) skipped", len(cases), len(todo),
             result.already_done, len(skipped))
    _execute(todo, settings, ledger, len(cases), workers, ray, progress)
    ledger.write_table()
    result.report = write_report(out_dir, list(ledger.rows.values()))
    result.counts = Counter(r.get("status") for r in ledger.rows.values())
    return result


@contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """Hold ``DIR/.thinslice-batch.lock`` for the run: two batches writing one ledger would garble it. The kernel
    releases the lock when the process ends, however it ends (kill -9 included), so it is never stale."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one batch per folder is then up to the user
        yield
        return
    with open(out_dir / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ThinsliceError(f"another thinslice batch is writing to {out_dir}; wait for it to end or choose "
                                 "another --out") from None
        yield


def _execute(todo: list[Case], settings: Settings, ledger: Ledger, total: int, workers: int,
             ray: RayOptions | None, progress: bool) -> None:
    """Run ``todo`` on the chosen runner with one overall bar; each finished case goes to the ledger at once."""
    from thinslice.cohort.local import run_local
    from thinslice.cohort.ray_runner import run_ray

    with logging_redirect_tqdm(loggers=[logging.getLogger("thinslice")]), \
            tqdm(total=total, initial=total - len(todo), unit="case", disable=not progress) as bar:
        def on_row(row: dict) -> None:
            finish(ledger, row)
            bar.update(1)

        if ray is not None:
            run_ray(todo, on_row, ray, dtype=settings.dtype, thumbnails=settings.thumbnails, method=settings.method,
                    method_options=tuple(sorted(settings.options.items())))
        else:
            run_local(todo, on_row, workers=workers, dtype=settings.dtype, thumbnails=settings.thumbnails,
                      method=settings.method, method_options=tuple(sorted(settings.options.items())))


def finish(ledger: Ledger, row: dict) -> None:
    """Keep one finished case: its thumbnail in DIR/qc, its row in the journal and table, a log line."""
    for key, suffix in (("thumbnail_png", ""), ("std_thumbnail_png", "_std")):
        thumbnail = row.pop(key, None)
        if thumbnail:
            with atomic_output(ledger.out_dir / QC_FOLDER / f"{row['name']}{suffix}.png", suffix=".png") as tmp:
                tmp.write_bytes(thumbnail)
    ledger.record(row)
    ledger.write_table()
    if row["status"] == "done":
        log.info("done %s: %s x%g, DC residual %.2f HU, %.1f s%s", row["name"], row.get("method"),
                 row.get("factor") or 0, row.get("dc_residual_hu") or 0, row.get("seconds") or 0,
                 f" ({', '.join(row['flags'])})" if row.get("flags") else "")
    else:
        log.warning("failed %s: %s", row["name"], row.get("reason"))


def plan(found: list[Found], settings: Settings, out_dir: Path, ledger: Ledger) -> list[Case]:
    """The cases with their output names (stable: a name once given stays with its input) and signatures."""
    names = assign_names(found, ledger.names())
    cases = []
    for item in found:
        spacing = item.spacing or settings.spacing
        if not spacing:
            raise ThinsliceError(f"no output spacing for {item.path}: give --spacing MM (or a 'spacing' column in "
                                 "the manifest)")
        method = item.method or settings.method
        _check_methods(method)
        options = tuple(sorted({**settings.options, **dict(item.options)}.items()))
        ext = item.ext if settings.fmt == "auto" else FORMATS[settings.fmt]
        output = output_path(out_dir, names[item.key], ext)
        signature = files_signature(item.files) + "-" + settings_signature(spacing, method, options, output,
                                                                           settings.dtype)
        cases.append(Case(key=item.key, name=names[item.key], kind=item.kind, path=item.path, spacing=float(spacing),
                          method=method, options=options, output=output, signature=signature,
                          series_uid=item.series_uid, label=item.label, replace_output=ledger.owns(output)))
    return cases


def assign_names(found: list[Found], known: dict[str, str]) -> dict[str, str]:
    """key -> output name: the ledger's name for a known input, else its readable name, with a short hash of the
    input's identity appended when that name is taken (by another input, now or in an earlier run)."""
    names = {f.key: known[f.key] for f in found if f.key in known}
    taken = {n.lower() for n in known.values()} | {n.lower() for n in RESERVED_NAMES}
    for item in found:
        if item.key in names:
            continue
        name = item.name or item.base_name
        if name.lower() in taken:
            name = f"{name}-{hashlib.sha1(item.key.encode()).hexdigest()[:6]}"
        names[item.key] = name
        taken.add(name.lower())
    return names


def skip_row(skip: Skip) -> dict:
    return {"key": skip.key, "name": "", "status": "skipped", "reason": skip.reason, "input": skip.path,
            "series_uid": skip.series_uid, "label": skip.label}


def _check_methods(method: str) -> None:
    """An unknown method name fails before any case runs (and lists the available ones)."""
    if method != "auto":
        from thinslice.cohort.worker import method_entry

        method_entry(method)
