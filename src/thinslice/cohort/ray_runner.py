"""Running cases on a Ray cluster (``pip install thinslice[ray]``): one actor per CPU slot or per GPU.

Ray does the distribution: actors are placed by their resource request (``num_cpus``/``num_gpus``), a worker process
or node that dies is restarted (``max_restarts``) and the case it was running is retried on it
(``max_task_retries``), and ``ray.wait`` hands the driver each case as it finishes. The driver only keeps every actor
busy with the next case and writes the ledger; each actor loads its method once and keeps it for all its cases.

Inputs and the output folder must be at the same path on every node (a shared file system); thumbnails travel back
to the driver inside the rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from thinslice.cohort.cases import Case
from thinslice.cohort.local import failed_row
from thinslice.cohort.worker import started_runner
from thinslice.errors import ThinsliceError

log = logging.getLogger(__name__)

# A lost worker (killed, node gone, out of memory) is restarted and its case retried this many times.
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3


@dataclass(frozen=True)
class RayOptions:
    """Where and how big the actors are. ``address``: ``auto`` (a running cluster, else a new local one) or a
    cluster address; ``workers``: at most this many actors (0: one per slot)."""

    address: str = "auto"
    workers: int = 0
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    init: tuple[tuple[str, object], ...] = ()  # extra ray.init arguments (tests: num_cpus)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ThinsliceError("--ray needs Ray: pip install 'thinslice[ray]' (or pip install 'ray>=2.9')") from None
    return ray


class CaseActor:
    """A Ray actor around a :class:`CaseRunner`: its method is loaded once, when the actor starts."""

    def __init__(self, dtype: str, thumbnails: bool, method: str, options: tuple[tuple[str, object], ...]) -> None:
        self.runner = started_runner(dtype, thumbnails, method, options)

    def run(self, case: Case) -> dict:
        return self.runner.run(case)

    def pid(self) -> int:
        return os.getpid()


def connect(options: RayOptions):
    """``ray`` connected to the cluster (started locally when ``auto`` finds none)."""
    ray = import_ray()
    if not ray.is_initialized():
        address = None if options.address == "auto" else options.address
        extra = dict(options.init)
        if address is None:
            extra.setdefault("include_dashboard", False)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **extra)
        except ConnectionError as exc:
            raise ThinsliceError(
                f"cannot connect to the Ray cluster at {options.address} ({str(exc).splitlines()[0][:120]}); check "
                "the address (`ray status` on the head); a cluster started with `ray start` uses token "
                "authentication: set RAY_AUTH_MODE=token here (Ray reads the token from ~/.ray/auth_token or "
                "RAY_AUTH_TOKEN)") from None
    return ray


def start_actors(ray, options: RayOptions, count: int, dtype: str, thumbnails: bool, method: str,
                 method_options: tuple[tuple[str, object], ...]) -> list:
    """One actor per slot of the cluster (CPUs / cpus_per_worker, or GPUs / gpus_per_worker), at most ``count``."""
    resources = ray.cluster_resources()
    if options.gpus_per_worker > 0:
        slots = int(resources.get("GPU", 0) // options.gpus_per_worker)
        if slots < 1:
            raise ThinsliceError("--gpus-per-worker is set but the Ray cluster has no GPU; start workers on GPU "
                                 "machines or leave it out")
    else:
        slots = max(1, int(resources.get("CPU", 1) // options.cpus_per_worker))
    n = max(1, min(slots, options.workers or slots, count))
    actor = ray.remote(CaseActor).options(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker,
                                          max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
    log.info("Ray: %d worker(s) of %g CPU / %g GPU on a cluster with %s", n, options.cpus_per_worker,
             options.gpus_per_worker, _resources_text(resources))
    return [actor.remote(dtype, thumbnails, method, method_options) for _ in range(n)]


def run_ray(cases: Sequence[Case], on_row: Callable[[dict], None], options: RayOptions, *, dtype: str = "int16",
            thumbnails: bool = True, method: str = "auto", method_options: tuple[tuple[str, object], ...] = (),
            on_start: Callable[[Case], None] | None = None) -> None:
    """Run ``cases`` on Ray actors, calling ``on_start`` before each case is handed out and ``on_row`` (in the
    driver) as each finishes."""
    if not cases:
        return
    ray = connect(options)
    actors = start_actors(ray, options, len(cases), dtype, thumbnails, method, method_options)
    waiting = list(reversed(cases))
    running: dict = {}

    def feed(actor) -> None:
        if waiting:
            case = waiting.pop()
            if on_start is not None:
                on_start(case)
            running[actor.run.remote(case)] = (actor, case)

    for actor in actors:
        feed(actor)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        actor, case = running.pop(ready[0])
        row, alive = _result(ray, ready[0], case)
        on_row(row)
        if alive:  # an actor gone for good (restarts used up) gets no more cases
            feed(actor)
    for case in reversed(waiting):
        on_row(failed_row(case, "no Ray worker left (all lost more often than max_restarts); re-run to retry"))
    for actor in actors:
        ray.kill(actor)


def _result(ray, ref, case: Case) -> tuple[dict, bool]:
    """The case's row, and whether its actor is still there."""
    try:
        return ray.get(ref), True
    except ray.exceptions.RayError as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        alive = not isinstance(exc, ray.exceptions.RayActorError)
        return failed_row(case, f"Ray worker lost {MAX_TASK_RETRIES + 1} times ({type(exc).__name__}: {reason}); "
                                "re-run to retry"), alive


def _resources_text(resources: dict) -> str:
    keys = [k for k in ("CPU", "GPU") if resources.get(k)]
    return ", ".join(f"{resources[k]:g} {k}" for k in keys) or "no CPU/GPU resources"
