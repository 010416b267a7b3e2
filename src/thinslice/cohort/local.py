"""Running cases on this machine: in this process (``--workers 1``) or in a pool of worker processes.

Both call the same :meth:`CaseRunner.run` as the Ray actors do; the driver receives each row as its case finishes.
Pool workers are started with ``spawn`` (a forked copy of a process with OpenMP or torch threads can deadlock) and
share the cores: each gets ``cores / workers`` threads unless the user set ``OMP_NUM_THREADS`` himself.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

from thinslice.cohort.cases import Case
from thinslice.cohort.worker import CaseRunner, started_runner

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_runner: CaseRunner | None = None  # one per pool worker process


def run_local(cases: Sequence[Case], on_row: Callable[[dict], None], *, workers: int = 1, dtype: str = "int16",
              thumbnails: bool = True, method: str = "auto", method_options: tuple[tuple[str, object], ...] = ()
              ) -> None:
    """Run ``cases``, calling ``on_row`` with each finished case's ledger row (in the driver, in finishing order)."""
    if workers <= 1 or len(cases) <= 1:
        runner = started_runner(dtype, thumbnails, method, method_options)
        for case in cases:
            on_row(runner.run(case))
        return
    workers = min(workers, len(cases))
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    with _thread_limit(threads), ProcessPoolExecutor(workers, mp_context=context, initializer=_start,
                                                     initargs=(dtype, thumbnails, method, method_options)) as pool:
        futures = {pool.submit(_run, case): case for case in cases}
        for future in as_completed(futures):
            on_row(_row_of(future, futures[future]))


def _row_of(future, case: Case) -> dict:
    try:
        return future.result()
    except BrokenProcessPool:
        return failed_row(case, "the worker process ended abruptly (killed, or out of memory); re-run to retry")


def failed_row(case: Case, reason: str) -> dict:
    """The row of a case whose worker was lost (the case itself may be fine: a re-run retries it)."""
    return {"key": case.key, "name": case.name, "input": case.path, "series_uid": case.series_uid,
            "output": "", "requested_method": case.method, "spacing_out_mm": case.spacing,
            "signature": case.signature, "label": case.label, "status": "failed", "reason": reason}


@contextmanager
def _thread_limit(threads: int) -> Iterator[None]:
    """Thread-count variables for the worker processes started inside the block (a user's own values win)."""
    added = [name for name in THREAD_VARIABLES if name not in os.environ]
    for name in added:
        os.environ[name] = str(threads)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _start(dtype: str, thumbnails: bool, method: str, options: tuple[tuple[str, object], ...]) -> None:
    global _runner
    _runner = started_runner(dtype, thumbnails, method, options)


def _run(case: Case) -> dict:
    assert _runner is not None, "pool worker not initialised"
    return _runner.run(case)
