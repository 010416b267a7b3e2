"""Delivering a derived series: C-STORE to a DICOM peer (pynetdicom) or a copy into a folder.

Both are safe to repeat: a peer receiving the same SOP instance UIDs again stores them once (a PACS replaces or
ignores a duplicate instance), and a folder copy lands under the derived series' UID, renamed into place whole.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from thinslice.errors import ThinsliceError
from thinslice.node.listener import no_delay
from thinslice.node.rules import Destination
from thinslice.node.spool import uid_name

log = logging.getLogger(__name__)

# C-STORE statuses that mean stored: success, and the warnings (coercion, elements discarded) of PS3.4 B.2.3.
STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class SendError(ThinsliceError):
    """A destination did not take the series (down, refused, a failure status): the job retries later."""


def deliver(folder: Path, derived_uid: str, dest: Destination, calling_ae: str, timeout: float = 30.0) -> int:
    """Send or copy the series in ``folder`` to ``dest``; the number of instances delivered."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise SendError(f"{folder} holds no instances to send")
    if dest.is_dicom:
        send_series(files, dest, calling_ae, timeout)
    if dest.folder:
        copy_series(files, Path(dest.folder) / uid_name(derived_uid))
    return len(files)


def send_series(files: list[Path], dest: Destination, calling_ae: str, timeout: float = 30.0) -> None:
    """C-STORE every file to ``dest`` over ``dest.associations`` associations at once (a PACS stores instances in
    parallel: four associations send a series about three times faster into Orthanc than one); the first refusal or
    failure status raises :class:`SendError`."""
    count = max(1, min(dest.associations, len(files)))
    if count == 1:
        _send_files(files, dest, calling_ae, timeout)
        return
    errors: list[BaseException] = []

    def one(part: list[Path]) -> None:
        try:
            _send_files(part, dest, calling_ae, timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(files[i::count],), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _send_files(files: list[Path], dest: Destination, calling_ae: str, timeout: float) -> None:
    """One association: C-STORE each file in turn."""
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(uid)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise SendError(f"destination {dest.name} ({dest.ae_title}@{dest.host}:{dest.port}) refused or did not "
                        "answer the association")
    no_delay(assoc)
    try:
        for path, ds in zip(files, datasets, strict=True):
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code not in STORED:
                where = "no answer" if code is None else f"status 0x{code:04X}"
                raise SendError(f"destination {dest.name} did not store {path.name} ({where})")
    finally:
        assoc.release()


def copy_series(files: list[Path], target: Path) -> None:
    """Copy the files into ``target`` (created whole by a rename; left as it is when it exists: already copied)."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for path in files:
            shutil.copy2(path, tmp / path.name)
        os.replace(tmp, target)
    except OSError as exc:
        raise SendError(f"cannot copy the series into {target}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
