"""Running cases on this machine: in this process (``--workers 1``) or in a pool of worker processes.

Both call the same :meth:`CaseRunner.run` as the Ray actors do; the driver receives each row as its case finishes.
Pool workers are started with ``spawn`` (a forked copy of a process with OpenMP or torch threads can deadlock) and
share the cores: each gets ``cores / workers`` threads unless the user set ``OMP_NUM_THREADS`` himself.

The driver hands out one case per worker at a time (``on_start`` first claims its outputs in the ledger), so an
interrupted batch has only the cases in flight to lose. Workers die with their driver: on Linux the kernel kills
them when it ends (``PR_SET_PDEATHSIG``), elsewhere a watchdog thread in each sees its parent change; a driver
stopped by SIGTERM or Ctrl-C ends them itself before it exits. Without that, orphaned workers would go on writing
outputs that no ledger row records.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

from thinslice.cohort.cases import Case
from thinslice.cohort.worker import CaseRunner, started_runner

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_S = 0.5  # how often a worker checks that its driver is still there (where the kernel cannot tell it)
STOP_GRACE_S = 3.0  # an interrupted driver waits this long for its workers to end before it kills them
BROKEN = "the worker process ended abruptly (killed, or out of memory); re-run to retry"
_runner: CaseRunner | None = None  # one per pool worker process


def run_local(cases: Sequence[Case], on_row: Callable[[dict], None], *, workers: int = 1, dtype: str = "int16",
              thumbnails: bool = True, method: str = "auto", method_options: tuple[tuple[str, object], ...] = (),
              on_start: Callable[[Case], None] | None = None) -> None:
    """Run ``cases``, calling ``on_start`` before each case is handed out and ``on_row`` with each finished case's
    ledger row (both in the driver; rows in finishing order)."""
    start = on_start or (lambda case: None)
    if workers <= 1 or len(cases) <= 1:
        runner = started_runner(dtype, thumbnails, method, method_options)
        for case in cases:
            start(case)
            on_row(runner.run(case))
        return
    workers = min(workers, len(cases))
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    with _thread_limit(threads):  # (workers are started as cases are submitted)
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start,
                                   initargs=(os.getpid(), dtype, thumbnails, method, method_options))
        try:
            _feed(pool, list(cases), on_row, start, workers)
        except BaseException:  # SIGTERM (as an exception), Ctrl-C, a failing callback: no worker may outlive us
            stop_pool(pool)
            raise
        pool.shutdown(wait=True)


def _feed(pool: ProcessPoolExecutor, cases: list[Case], on_row: Callable[[dict], None],
          start: Callable[[Case], None], workers: int) -> None:
    """Keep ``workers`` cases in flight until all are done; a broken pool fails the cases not yet finished."""
    waiting = list(reversed(cases))
    running: dict[Future, Case] = {}

    def submit() -> None:
        case = waiting.pop()
        start(case)
        try:
            running[pool.submit(_run, case)] = case
        except BrokenProcessPool:
            on_row(failed_row(case, BROKEN))

    try:
        while waiting and len(running) < workers:
            submit()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                on_row(_row_of(future, running.pop(future)))
                if waiting:
                    submit()
    except BaseException as exc:
        if not isinstance(exc, Exception):  # interrupted (SIGTERM, Ctrl-C): keep what has already come back
            for future, case in list(running.items()):
                if future.done() and not future.cancelled():
                    on_row(_row_of(future, case))
        raise


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """End ``pool`` now: nothing more is started, its workers get SIGTERM, and SIGKILL after a grace period."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # (no public API lists them)
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        _quietly(process.terminate)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        _quietly(process.join, max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            _quietly(process.kill)
            _quietly(process.join, 1.0)


def _quietly(action: Callable, *args: object) -> None:
    with contextlib.suppress(OSError, ValueError, AssertionError):  # already gone, or already closed
        action(*args)


def _row_of(future: Future, case: Case) -> dict:
    try:
        return future.result()
    except BrokenProcessPool:
        return failed_row(case, BROKEN)


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


def die_with_parent(parent: int) -> None:
    """Make this process end when ``parent`` does: the kernel's parent-death signal on Linux, and on every system a
    watchdog thread that ends the process when its parent id changes (the orphan is adopted by another)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no libc symbol: the watchdog still works
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent ended before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), name="thinslice-parent-watch", daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_S)
    os._exit(1)  # the parent is gone: nobody would record what this process writes


def _start(driver: int, dtype: str, thumbnails: bool, method: str, options: tuple[tuple[str, object], ...]) -> None:
    global _runner
    die_with_parent(driver)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the driver stops the workers
    _runner = started_runner(dtype, thumbnails, method, options)


def _run(case: Case) -> dict:
    assert _runner is not None, "pool worker not initialised"
    return _runner.run(case)
