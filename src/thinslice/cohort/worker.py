"""The per-case function: read, upsample, write atomically, measure; the same code on every runner.

A :class:`CaseRunner` lives as long as its worker (the driver process, a pool process or a Ray actor) and keeps one
:class:`~thinslice.infer.upsample.Upsampler` per method and options, so that a learned method loads its weights once
per worker, not once per case. It never raises for a bad case: every outcome, failures included, is a ledger row.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from thinslice.cohort.cases import Case
from thinslice.cohort.thumbnails import std_thumbnail_png, thumbnail_png
from thinslice.errors import ThinsliceError, os_reason
from thinslice.io.limits import NOT_HU_ABOVE
from thinslice.io.volume import Volume
from thinslice.memory import PeakMemory

if TYPE_CHECKING:
    from thinslice.infer.upsample import Upsampler

log = logging.getLogger(__name__)

# Mean |A x - thick| (HU) above which the QC page flags a case: the output does not reproduce its own input slices.
DC_RESIDUAL_FLAG_HU = 2.0


class CaseRunner:
    """Runs cases; holds the upsamplers built so far (one per method and options, each with its loaded weights)."""

    def __init__(self, dtype: str = "int16", thumbnails: bool = True) -> None:
        self.dtype = dtype
        self.thumbnails = thumbnails
        self._upsamplers: dict[tuple[str, str], Upsampler] = {}

    def preload(self, method: str, options: tuple[tuple[str, object], ...] = ()) -> None:
        """Import the readers and writers and load a named method's weights now, when the worker starts, so that a
        case's seconds are the case's own and not the worker's start-up."""
        import PIL.Image  # noqa: F401
        import SimpleITK  # noqa: F401

        import thinslice.infer.consistency  # noqa: F401
        import thinslice.io.writers  # noqa: F401

        self.upsampler(method, options).preload()

    def run(self, case: Case) -> dict:
        """The ledger row of ``case``: done (with its measurements) or failed (with a one-line reason)."""
        start = time.perf_counter()
        row = {"key": case.key, "name": case.name, "input": case.path, "series_uid": case.series_uid,
               "output": case.output.rstrip("/" + os.sep), "requested_method": case.method,
               "spacing_out_mm": case.spacing, "signature": case.signature, "label": case.label,
               "worker": f"{socket.gethostname()}:{os.getpid()}"}
        messages: list[str] = []
        try:
            with PeakMemory() as peak, _collected(messages):
                row.update(self._upsample(case))
            row["status"], row["peak_memory_mb"] = "done", round(peak.mb, 1)
        except ThinsliceError as exc:
            row.update(status="failed", reason=str(exc))
        except MemoryError:
            row.update(status="failed", reason="out of memory; run fewer workers per machine or use --patch-size")
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            row.update(status="failed", reason=f"{os_reason(exc)}{where}")
        except Exception as exc:  # noqa: BLE001 - one broken case must never stop the cohort
            log.debug("case %s: %s", case.name, traceback.format_exc())
            row.update(status="failed", reason=f"unexpected {type(exc).__name__}: {exc}".splitlines()[0][:300])
        if row["status"] != "done":
            row["output"] = ""  # nothing was written under the final name
        row["warnings"] = messages
        row["seconds"] = round(time.perf_counter() - start, 2)
        row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        return row

    def _upsample(self, case: Case) -> dict:
        from thinslice.io import read_volume, write_volume

        if Path(case.output).exists() and not case.replace_output:
            raise ThinsliceError(f"{case.output} exists and is not from this batch; left as it is: move it away, "
                                 "choose another --out, or give --overwrite to replace it")
        thick = read_volume(case.path, series_uid=case.series_uid or None)
        up = self.upsampler(case.method, case.options)
        decision = up.decide(thick, case.spacing)
        result = up.run(thick, decision)
        method, note, thin = decision.method, decision.fallback, result.volume
        std = result.extras.get("std")
        facts = self._write_std(case, std, method) if std is not None else {}
        written = write_volume(thin, case.output, dtype=self.dtype, reference_input=case.path,
                               overwrite=case.replace_output, method=method)
        facts.update(measure(thick, thin, result.acquisition))
        facts.update(method=method, output=str(written).rstrip("/" + os.sep), reason=note or "",
                     input_bytes=_input_bytes(case), input_sha256=_sha256(case))
        if note:
            facts["flags"] = ["fallback method"]
        if self.thumbnails:
            facts["thumbnail_png"] = thumbnail_png(thick, thin)
            if std is not None:
                facts["std_thumbnail_png"] = std_thumbnail_png(std)
        return facts

    def _write_std(self, case: Case, std: Volume, method: str) -> dict:
        """The calibrated std map beside the output (``<name>_std``, as ``thinslice upsample`` writes it), before the
        output, so that a case whose output exists is complete; its report line goes to the ledger."""
        from thinslice.io.writers import std_path_for, write_std_map

        written = write_std_map(std, std_path_for(case.output), method, overwrite=case.replace_output)
        return {"std_output": str(written).rstrip("/" + os.sep), "uncertainty": std.metadata.get("uncertainty", ""),
                "wide_fraction": float(std.metadata.get("wide_fraction", "nan"))}

    def upsampler(self, method: str, options: tuple[tuple[str, object], ...]) -> Upsampler:
        """The upsampler of ``method`` with the cohort's options (command-line text; each method takes those it
        uses), built on first use and kept; no progress bars inside a case (the batch draws its own)."""
        from thinslice.infer.upsample import Upsampler

        key = (method, repr(options))
        if key not in self._upsamplers:
            given = {k: v for k, v in options if v is not None}
            self._upsamplers[key] = Upsampler.of(method, {**given, "progress": False}, strict=False, text=True)
        return self._upsamplers[key]


def started_runner(dtype: str, thumbnails: bool, method: str, options: tuple[tuple[str, object], ...]) -> CaseRunner:
    """A runner with its imports done and its method loaded (a method that cannot load fails in each case's row)."""
    runner = CaseRunner(dtype, thumbnails)
    try:
        runner.preload(method, options)
    except ThinsliceError as exc:
        log.debug("preload of %s failed: %s", method, exc)
    return runner


def measure(thick: Volume, thin: Volume, acquisition) -> dict:
    """What the ledger and QC page show about a result: factor, grids, HU range and the data-consistency residual."""
    from thinslice.degrade.operators import thick_profile_operator
    from thinslice.infer.consistency import consistency_residual_hu

    profile = acquisition.profile if acquisition is not None else "gaussian"
    thickness = acquisition.thickness_mm if acquisition is not None else None
    op = thick_profile_operator(thick, thin.slice_spacing, profile, thickness)
    # Every 4th column in both in-plane directions: the residual is per column, so 1/16 of them estimate its mean.
    residual = consistency_residual_hu(thin.slices_first()[:, ::4, ::4], thick.slices_first()[:, ::4, ::4], op)
    low, high = float(thick.array.min()), float(thick.array.max())
    flags = ["large DC residual"] if residual["mean_abs"] > DC_RESIDUAL_FLAG_HU else []
    flags += ["not CT HU"] if low > NOT_HU_ABOVE else []
    return {"factor": round(thick.slice_spacing / thin.slice_spacing, 4), "spacing_in_mm": thick.slice_spacing,
            "shape_in": "x".join(map(str, thick.shape_ijk)), "shape_out": "x".join(map(str, thin.shape_ijk)),
            "dc_residual_hu": round(residual["mean_abs"], 3), "hu_min": round(low), "hu_max": round(high),
            "flags": flags}


def _input_bytes(case: Case) -> int:
    path = Path(case.path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _sha256(case: Case) -> str:
    """Content hash of a file input: its header and the detached data files it names, in the order read (DICOM
    series are identified by their UID instead)."""
    path = Path(case.path)
    if not path.is_file():
        return ""
    from thinslice.io.readers import files_read

    try:
        files = files_read(path)
    except ThinsliceError:
        files = [path]  # the read refuses the case and says why
    digest = hashlib.sha256()
    for name in files:
        with open(name, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _collected(messages: list[str]):
    """Collect the warnings of one case (thinslice's log and Python warnings) for its ledger row."""

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = _Keep(logging.WARNING)
    logger = logging.getLogger("thinslice")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        messages.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)
