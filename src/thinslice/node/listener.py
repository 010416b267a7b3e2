"""The node's DICOM side: a C-ECHO and C-STORE SCP (pynetdicom) that spools what it receives.

Callers not on the allow-list are refused at association (pynetdicom's ``require_calling_aet``: "calling AE title
not recognised"), associations beyond the limit are refused by pynetdicom ("local limit exceeded"). A C-STORE is
answered only after the instance is on disk under its final name and its job recorded, so an acknowledged instance
is never lost; an instance over the size limit, or one that would fill the spool or the disk, is refused with
0xA700 (out of resources) and nothing of it is kept.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from thinslice.node.queue import JobQueue
from thinslice.node.rules import NodeLimits
from thinslice.node.spool import Spool, uid_name

log = logging.getLogger(__name__)

OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
SUCCESS = 0x0000


class Listener:
    """The SCP: holds the pynetdicom AE and server; :meth:`start` returns at once (the server has its threads)."""

    def __init__(self, ae_title: str, host: str, port: int, limits: NodeLimits, spool: Spool, queue: JobQueue,
                 log_phi: bool = False, on_store: Callable[[str], None] | None = None) -> None:
        self.ae_title, self.host, self.port = ae_title, host, port
        self.limits, self.spool, self.queue = limits, spool, queue
        self.log_phi = log_phi
        self.on_store = on_store
        self._server: Any = None

    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.maximum_associations = self.limits.max_associations
        if not self.limits.allows_any():
            ae.require_calling_aet = list(self.limits.allowed_callers)
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_CONN_OPEN, _on_connection)]
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        log.info("listening as %s on %s:%d", self.ae_title, self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_echo(self, event: Any) -> int:
        log.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
        return SUCCESS

    def _on_rejected(self, event: Any) -> None:
        requestor = event.assoc.requestor
        log.warning("association from %s (%s) refused", requestor.ae_title, requestor.address)

    def _on_store(self, event: Any) -> int:
        """Spool one instance; the status the caller gets says whether it is kept."""
        caller = event.assoc.requestor.ae_title
        size = len(event.request.DataSet.getvalue())
        if size > self.limits.max_dataset_mb * 1e6:
            log.warning("refused an instance of %.1f MB from %s (limit %g MB)", size / 1e6, caller,
                        self.limits.max_dataset_mb)
            return OUT_OF_RESOURCES
        full = self.spool.room_for(size)
        if full:
            log.warning("refused an instance from %s: %s", caller, full)
            return OUT_OF_RESOURCES
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            series_uid, sop_uid = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
            modality = str(ds.get("Modality", ""))
        except Exception as exc:  # noqa: BLE001 - whatever the caller sent, it gets an answer
            log.warning("refused an instance from %s that cannot be decoded: %s", caller, str(exc)[:200])
            return CANNOT_UNDERSTAND
        key = uid_name(series_uid)
        try:
            stored = self.spool.store(series_uid, sop_uid, event.encoded_dataset())
        except OSError as exc:  # the disk filled up meanwhile, or the spool is not writable: nothing of it is kept
            log.warning("refused an instance from %s: cannot write the spool: %s", caller, exc.strerror or exc)
            return OUT_OF_RESOURCES
        if not stored:
            log.debug("series %s: instance %s already spooled", key, sop_uid)
            return SUCCESS
        self.queue.received(key, caller, modality)
        if self.log_phi:
            log.debug("series %s: instance from %s (patient %s)", key, caller, ds.get("PatientID", ""))
        if self.on_store is not None:
            self.on_store(key)
        return SUCCESS


def _on_connection(event: Any) -> None:
    """No Nagle delay: a DIMSE message goes as several small writes, and waiting for the peer's delayed ACK between
    them costs about 40 ms per instance."""
    no_delay(event.assoc)


def no_delay(assoc: Any) -> None:
    """TCP_NODELAY on an association's socket (where it has one)."""
    import socket

    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
