"""A cohort in one call: discover the cases, skip the ones already done, run the rest, keep the ledger, write the QC
page. :func:`run_batch` is what ``thinslice batch`` runs; the runners (local or Ray) only execute cases.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
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
from thinslice.cohort.ledger import LEDGER_FILES, Ledger
from thinslice.cohort.ray_runner import RayOptions
from thinslice.cohort.report import QC_FOLDER, REPORT, write_report
from thinslice.errors import ThinsliceError
from thinslice.io.atomic import atomic_output
from thinslice.io.writers import std_path_for

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
    """Upsample every case under ``inputs`` into ``out_dir``; re-running it does only what is not done yet.

    Discovery runs with the ledger open, so that when ``out_dir`` is (or lies inside) an input folder, the batch's
    own files (outputs, std maps, the ledger, the QC page) are never taken for inputs."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ThinsliceError(f"--out {out_dir} is a file; give a folder for the outputs and the ledger")
    if settings.fmt != "auto" and settings.fmt not in FORMATS:
        raise ThinsliceError(f"unknown --format {settings.fmt!r}; use auto or one of {', '.join(FORMATS)}")
    _check_methods(settings.method)
    for item in inputs:
        if not Path(item).exists():
            raise ThinsliceError(f"input {item} does not exist; check the path")
    existed = out_dir.is_dir()
    with exclusive(out_dir):
        ledger = Ledger(out_dir)
        try:
            found, skipped = discover(inputs, exclude=out_dir, skip=own_files(ledger))
            if not found and not skipped:
                raise ThinsliceError(f"no volume files or DICOM series found in {', '.join(map(str, inputs))}")
            return _run(found, skipped, out_dir, settings, workers, ray, progress, ledger)
        except ThinsliceError:
            if not existed and not ledger.rows:
                _discard_new_folder(out_dir, ledger)
            raise
        finally:
            ledger.close()


def own_files(ledger: Ledger) -> set[str]:
    """Resolved paths of everything the batch wrote in its folder: outputs and std maps (claimed or recorded), the
    ledger's files, the QC page and its thumbnails."""
    paths = {str(Path(p).resolve()) for p in ledger.written()}
    return paths | {str((ledger.out_dir / name).resolve()) for name in (*LEDGER_FILES, REPORT, QC_FOLDER)}


def _discard_new_folder(out_dir: Path, ledger: Ledger) -> None:
    """A run that fails before any case leaves no folder it created (only the ledger's files were written)."""
    ledger.close()
    for name in (*LEDGER_FILES, LOCK):
        (out_dir / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # something else is in it: leave it
        out_dir.rmdir()


def _run(found: list[Found], skipped: list[Skip], out_dir: Path, settings: Settings, workers: int,
         ray: RayOptions | None, progress: bool, ledger: Ledger) -> BatchResult:
    """Plan against the ledger, record the skips, run what is not done, rewrite the table and the QC page (also when
    the run is interrupted: what finished is in them)."""
    cases = plan(found, settings, out_dir, ledger)
    for skip in skipped:
        ledger.record(skip_row(skip))
    todo = [c for c in cases if not ledger.is_done(c.key, c.signature, c.output)]
    result = BatchResult(out_dir, ran=len(todo), already_done=len(cases) - len(todo))
    log.info("%d case(s): %d to run, %d already done; %d input(s) skipped", len(cases), len(todo),
             result.already_done, len(skipped))
    try:
        _execute(todo, settings, ledger, len(cases), workers, ray, progress)
    finally:
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
    """Run ``todo`` on the chosen runner with one overall bar. A case's output paths are claimed in the ledger
    before it is handed out, and each finished case goes to the ledger at once."""
    from thinslice.cohort.local import run_local
    from thinslice.cohort.ray_runner import run_ray

    with logging_redirect_tqdm(loggers=[logging.getLogger("thinslice")]), \
            tqdm(total=total, initial=total - len(todo), unit="case", disable=not progress) as bar:
        def on_row(row: dict) -> None:
            finish(ledger, row)
            bar.update(1)

        def on_start(case: Case) -> None:
            ledger.claim(case.key, case.signature, target_paths(case))

        options = tuple(sorted(settings.options.items()))
        if ray is not None:
            run_ray(todo, on_row, ray, dtype=settings.dtype, thumbnails=settings.thumbnails, method=settings.method,
                    method_options=options, on_start=on_start)
        else:
            run_local(todo, on_row, workers=workers, dtype=settings.dtype, thumbnails=settings.thumbnails,
                      method=settings.method, method_options=options, on_start=on_start)


def target_paths(case: Case) -> list[str]:
    """What a case may write: its output and, beside it, its std map."""
    return [case.output, str(std_path_for(case.output))]


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
        log.error("failed %s: %s", row["name"], row.get("reason"))  # shown under -q too: one line per failed case


def plan(found: list[Found], settings: Settings, out_dir: Path, ledger: Ledger) -> list[Case]:
    """The cases with their output names (stable: a name once given stays with its input) and signatures.

    The same input given more than once (manifest rows, a folder and a file inside it) is handled by its settings:

    - with the same settings (spacing, method, options, output name) it is one case, run once, and one warning line
      says where it was repeated (10,000 identical rows are one case, not 10,000 runs of it, nor a silent merge);
    - with different settings each is its own case, with its own key and output name (a short hash added where the
      names would collide): a scan wanted at 1.25 mm and at 2.5 mm is a plausible request, and refusing it would
      make the user copy the input; silently keeping one of them is the one wrong answer.

    An existing file under an output name is replaced only when it is the batch's own (recorded or claimed in the
    ledger), or with ``Settings.overwrite``; an output never lands on an input (``--out`` inside an input folder).
    """
    items = distinct_cases(found, settings)
    inputs = _input_paths(found)
    names = assign_names(items, ledger.names(), lambda item, name: _collides(out_dir, item, name, settings, inputs))
    cases = []
    for item in items:
        spacing = item.spacing or settings.spacing
        method = item.method or settings.method
        _check_methods(method)
        options = tuple(sorted({**settings.options, **dict(item.options)}.items()))
        output = output_path(out_dir, names[item.key], _ext(item, settings))
        signature = files_signature(item.files) + "-" + settings_signature(spacing, method, options, output,
                                                                           settings.dtype)
        case = Case(key=item.key, name=names[item.key], kind=item.kind, path=item.path, spacing=float(spacing),
                    method=method, options=options, output=output, signature=signature,
                    series_uid=item.series_uid, label=item.label)
        own_output, std = target_paths(case)
        mine = ledger.owns(own_output) and (ledger.owns(std) or not os.path.lexists(std))
        cases.append(replace(case, replace_output=settings.overwrite or mine))
    return cases


def distinct_cases(found: list[Found], settings: Settings) -> list[Found]:
    """``found`` with repeats of an input under the same settings dropped (one warning line each), and an input given
    under different settings kept once per setting, each with a key of its own (see :func:`plan`)."""
    groups: dict[str, dict[str, list[Found]]] = {}
    for item in found:
        if not (item.spacing or settings.spacing):
            raise ThinsliceError(f"no output spacing for {item.path}: give --spacing MM (or a 'spacing' column in "
                                 "the manifest)")
        groups.setdefault(item.key, {}).setdefault(_variant(item, settings), []).append(item)
    out = []
    for key, variants in groups.items():
        for variant, repeats in variants.items():
            if len(repeats) > 1:
                _warn_repeats(repeats)
            out.append(repeats[0] if len(variants) == 1 else replace(repeats[0], key=f"{key}|{variant}"))
    return out


def _variant(item: Found, settings: Settings) -> str:
    """A short hash of the per-case settings of ``item`` (what makes two requests for one input different)."""
    effective = [float(item.spacing or settings.spacing), item.method or settings.method,
                 sorted({**settings.options, **dict(item.options)}.items()), item.name or ""]
    return hashlib.sha1(json.dumps(effective, default=str).encode()).hexdigest()[:8]


def _warn_repeats(repeats: list[Found]) -> None:
    """One line for all repeats of one request: where it was first given, and where again (the first few)."""
    first = repeats[0].source or repeats[0].path
    again = [r.source or r.path for r in repeats[1:]]
    where = [a.rpartition(" line ") for a in again]
    if all(sep and head == first.rpartition(" line ")[0] for head, sep, _ in where):
        again = [f"line {number}" for _, _, number in where]  # all in the first row's manifest
    shown = ", ".join(again[:5]) + (f" and {len(again) - 5} more" if len(again) > 5 else "")
    log.warning("%s is given %d times with the same settings (%s; again at %s): it is one case, run once",
                repeats[0].path, len(repeats), first, shown)


def _ext(item: Found, settings: Settings) -> str:
    return item.ext if settings.fmt == "auto" else FORMATS[settings.fmt]


def _input_paths(found: list[Found]) -> set[str]:
    """Resolved paths of every input file and DICOM folder: no output may be written over one of them."""
    paths = {str(Path(f).resolve()) for item in found for f in item.files}
    return paths | {str(Path(item.path).resolve()) for item in found}


def _collides(out_dir: Path, item: Found, name: str, settings: Settings, inputs: set[str]) -> bool:
    """Whether the output (or std map) named ``name`` would land on an input (``--out`` inside an input folder)."""
    output = output_path(out_dir, name, _ext(item, settings))
    return any(str(Path(p.rstrip("/" + os.sep)).resolve()) in inputs for p in (output, str(std_path_for(output))))


def assign_names(found: list[Found], known: dict[str, str],
                 collides: Callable[[Found, str], bool] = lambda item, name: False) -> dict[str, str]:
    """key -> output name: the ledger's name for a known input, else its readable name, with a short hash of the
    input's identity appended when that name is taken (by another input, now or in an earlier run) or when its
    output would land on an input file."""
    names = {f.key: known[f.key] for f in found if f.key in known}
    taken = {n.lower() for n in known.values()} | {n.lower() for n in RESERVED_NAMES}
    for item in found:
        if item.key in names:
            continue
        name = item.name or item.base_name
        if name.lower() in taken or collides(item, name):
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
        from thinslice.infer.upsample import find_method

        find_method(method)
