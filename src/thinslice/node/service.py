"""The running node: the listener, and one worker that turns complete series into sent thin series.

The worker does, for each due job: the rule decision (skipped, with its reason), the same per-case function as
``thinslice batch`` (:class:`~thinslice.cohort.worker.CaseRunner`: read, upsample, write atomically, measure) into
``SPOOL/out/<series UID>/`` (dots as dashes), then delivery to each destination not yet recorded as having the
derived series. A failed attempt goes back into the queue with a backoff and is parked as failed after the last one.
Processing runs in ``[node] workers`` threads (default 2: one sends while another processes; each loads its
methods' weights once).
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from thinslice.errors import ThinsliceError
from thinslice.node.listener import Listener
from thinslice.node.queue import Job, JobQueue
from thinslice.node.rules import Rule, Rules
from thinslice.node.sender import deliver
from thinslice.node.spool import Spool

if TYPE_CHECKING:
    from thinslice.cohort.worker import CaseRunner

log = logging.getLogger(__name__)

_PRELOAD = threading.Lock()
# Header fields the rules look at (and nothing that names the patient).
RULE_TAGS = ("Modality", "SliceThickness", "SeriesDescription", "BodyPartExamined", "ImageType", "SOPClassUID",
             "SeriesInstanceUID")


class Node:
    """A DICOM node serving one spool with one rule set."""

    def __init__(self, spool_dir: str | Path, rules: Rules, ae_title: str = "THINSLICE", port: int = 11112,
                 host: str = "0.0.0.0", log_phi: bool = False, poll_seconds: float = 0.2) -> None:
        self.rules = rules
        self.limits = rules.limits
        self.ae_title = ae_title
        self.spool = Spool(spool_dir, self.limits.max_spool_gb * 1e9, self.limits.min_free_gb * 1e9)
        self.queue = JobQueue(spool_dir)
        self.listener = Listener(ae_title, host, port, self.limits, self.spool, self.queue, log_phi)
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._local = threading.local()  # each worker thread's own CaseRunner (its loaded weights)

    # ---------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Recover what a killed node left, start listening, start the worker thread."""
        self.recover()
        self.listener.start()
        for i in range(self.limits.workers):
            thread = threading.Thread(target=self._loop, name=f"thinslice-node-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self.listener.stop()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self.queue.close()

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    def recover(self) -> None:
        """Running jobs go back to their last recorded step; series on disk without a job get one."""
        resumed = self.queue.resume()
        for key, count in self.spool.series_on_disk().items():
            if self.queue.get(key) is None:
                self.queue.adopt(key, count)
                log.info("series %s: %d spooled instance(s) adopted", key, count)
            elif self.queue.reconcile(key, count):
                log.info("series %s: spooled instance(s) not yet counted adopted", key)
        if resumed:
            log.info("%d interrupted job(s) resumed", resumed)

    def _loop(self) -> None:
        self._preload()
        while not self._stop.is_set():
            try:
                if not self.step():
                    self._stop.wait(self.poll_seconds)
            except Exception:  # noqa: BLE001 - the worker must outlive any one job's surprise
                log.exception("worker step failed")
                self._stop.wait(self.poll_seconds)

    # --------------------------------------------------------------------------------------------- work
    def step(self) -> bool:
        """Complete the stable series, then run one due job; whether there was one."""
        self.queue.complete_stable(self.limits.stable_seconds)
        job = self.queue.claim()
        if job is None:
            return False
        try:
            self._run(job)
        except ThinsliceError as exc:
            state = self.queue.retry_or_park(job.series_uid, str(exc), self.limits.max_attempts,
                                             self.limits.backoff_seconds, self.limits.max_backoff_seconds)
            log.warning("series %s: %s (%s)", job.series_uid, exc, "parked" if state == "failed" else "will retry")
        return True

    def _run(self, job: Job) -> None:
        if not job.derived_uids:
            rule = self._decide(job)
            if rule is None:
                return
            self._process(job, rule)
            job = self.queue.get(job.series_uid) or job
        rule = self._rule_named(job.rule)
        self._send(job, rule)

    def _decide(self, job: Job) -> Rule | None:
        files = self.spool.instances(job.series_uid)
        if not files:
            self.queue.finish(job.series_uid, "skipped", "no instances in the spool")
            return None
        header = read_rule_header(files)
        rule, why = self.rules.decide(header, len(files))
        if rule is None:
            self.queue.finish(job.series_uid, "skipped", why)
            log.info("series %s: skipped: %s", job.series_uid, why)
            return None
        self.queue.set_rule(job.series_uid, rule.name)
        return rule

    def _process(self, job: Job, rule: Rule) -> None:
        """The derived series into the spool (reusing one a killed node wrote whole but did not record)."""
        from thinslice.cohort.cases import Case

        out = self.spool.output_folder(job.series_uid)
        if not (out.is_dir() and any(out.iterdir())):
            folder = self.spool.series_folder(job.series_uid)
            case = Case(key=job.series_uid, name=job.series_uid, kind="dicom", path=str(folder), spacing=rule.spacing,
                        method=rule.method, options=rule.method_options(), output=str(out) + "/", signature="",
                        replace_output=True)
            row = self.runner().run(case)
            if row["status"] != "done":
                raise ThinsliceError(row.get("reason") or "processing failed")
            log.info("series %s: %s in %.1f s (%s -> %s)", job.series_uid, row.get("method"), row["seconds"],
                     row.get("shape_in"), row.get("shape_out"))
        folders = [p for p in (out, out.with_name(out.name + "_std")) if p.is_dir()]
        self.queue.processed(job.series_uid, str(out), [series_uid_of(f) for f in folders])

    def _send(self, job: Job, rule: Rule) -> None:
        out = Path(job.output)
        folders = [p for p in (out, out.with_name(out.name + "_std")) if p.is_dir()]
        uids = job.derived_uids.split()
        if len(folders) != len(uids):
            raise ThinsliceError(f"the derived series of {job.series_uid} is missing from the spool ({out})")
        for folder, uid in zip(folders, uids, strict=True):
            for name in rule.send_to:
                if self.queue.was_sent(uid, name):
                    continue
                count = deliver(folder, uid, self.rules.destinations[name], self.ae_title)
                self.queue.record_sent(job.series_uid, uid, name, count)
                log.info("series %s: derived series sent to %s (%d instances)", job.series_uid, name, count)
        self.queue.finish(job.series_uid, "sent")
        after = self.queue.get(job.series_uid)
        if after is not None and after.state == "received":  # new instances arrived meanwhile: derive it anew
            log.info("series %s: changed while it was processed; it will be processed again", job.series_uid)
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)

    def _rule_named(self, name: str) -> Rule:
        for rule in self.rules.rules:
            if rule.name == name:
                return rule
        raise ThinsliceError(f"rule '{name}' is no longer in the rule file: the processed series cannot be routed")

    def runner(self) -> CaseRunner:
        """This worker's per-case function of ``thinslice batch``, built on first use and kept (weights load once
        per worker)."""
        runner = getattr(self._local, "runner", None)
        if runner is None:
            from thinslice.cohort.worker import CaseRunner

            runner = self._local.runner = CaseRunner(thumbnails=False)
        return runner

    def _preload(self) -> None:
        """Imports and every rule's weights now, so that the first series' latency is its own; a method that cannot
        load fails in its jobs, with the reason. One worker at a time: the method registry loads its modules on
        first use, and two threads doing so at once could each see it half loaded."""
        with _PRELOAD:
            for rule in self.rules.rules:
                try:
                    self.runner().preload(rule.method, rule.method_options())
                except ThinsliceError as exc:
                    log.warning("rule %s: method %s cannot be loaded: %s", rule.name, rule.method, exc)


def read_rule_header(files: list[Path]) -> dict[str, str]:
    """The fields the rules test, as text, from the first readable instance of a series."""
    import pydicom

    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(RULE_TAGS))
        except Exception:  # noqa: BLE001 - an unreadable file is the reader's to report; try the next
            continue
        header = {}
        for tag in RULE_TAGS:
            value = ds.get(tag, "")
            header[tag] = "\\".join(str(v) for v in value) if isinstance(value, pydicom.multival.MultiValue) \
                else str(value)
        return header
    return {}


def series_uid_of(folder: Path) -> str:
    """The SeriesInstanceUID of the derived series written in ``folder``."""
    import pydicom

    first = min(p for p in folder.iterdir() if p.is_file())
    return str(pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
