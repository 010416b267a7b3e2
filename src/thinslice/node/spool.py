"""The node's spool on disk: ``SPOOL/incoming/<series UID>/<SOP instance UID>.dcm`` and ``SPOOL/out/``.

Every instance is written to ``SPOOL/tmp`` and renamed into its series folder after an fsync, so a file under its
final name is always complete: a kill, a full disk or a dropped association never leaves a half-written instance
that a later read takes for part of the series. The spool's size is kept, so that the listener refuses an instance
(DICOM status "out of resources") before the spool outgrows its limit or the disk's free space.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def uid_name(uid: str) -> str:
    """A file or folder name for a UID: the UID itself when it is one (digits and dots), else a hash of it."""
    uid = uid.strip().rstrip("\0")
    if _UID.match(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha1(uid.encode()).hexdigest()


class Spool:
    """The folders of one spool and the bytes they hold."""

    def __init__(self, root: str | Path, max_bytes: float, min_free_bytes: float) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.out = self.root / "out"
        self.tmp = self.root / "tmp"
        for folder in (self.incoming, self.out, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp.iterdir():  # a kill left it: never part of any series
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self._lock = threading.Lock()
        self.used = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def series_folder(self, series_uid: str) -> Path:
        return self.incoming / uid_name(series_uid)

    def output_folder(self, series_uid: str) -> Path:
        """Where the derived series of ``series_uid`` is written: ``out/<UID with dashes>`` (a name with dots would
        read as a file extension to the writers, which put the std map at ``<name>_std``)."""
        return self.out / uid_name(series_uid).replace(".", "-")

    def has(self, series_uid: str, sop_uid: str) -> bool:
        return (self.series_folder(series_uid) / (uid_name(sop_uid) + ".dcm")).exists()

    def room_for(self, size: int) -> str:
        """Why ``size`` more bytes cannot be taken ('' when they can): the spool limit or the disk's free space."""
        if self.used + size > self.max_bytes:
            return f"spool full ({self.used / 1e9:.2f} GB of {self.max_bytes / 1e9:.2f} GB)"
        free = shutil.disk_usage(self.root).free
        if free - size < self.min_free_bytes:
            return f"disk nearly full ({free / 1e9:.2f} GB free, {self.min_free_bytes / 1e9:.2f} GB kept free)"
        return ""

    def store(self, series_uid: str, sop_uid: str, data: bytes) -> bool:
        """Write one instance (a DICOM file's bytes) atomically; False when the spool already holds it."""
        folder = self.series_folder(series_uid)
        target = folder / (uid_name(sop_uid) + ".dcm")
        if target.exists():
            return False
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(folder)
        with self._lock:
            self.used += len(data)
        return True

    def instances(self, series_uid: str) -> list[Path]:
        folder = self.series_folder(series_uid)
        return sorted(folder.glob("*.dcm")) if folder.is_dir() else []

    def series_on_disk(self) -> dict[str, int]:
        """Every series folder and its number of instances (to adopt those whose job was never recorded)."""
        return {p.name: len(list(p.glob("*.dcm"))) for p in self.incoming.iterdir() if p.is_dir()}


def _fsync_dir(folder: Path) -> None:
    """The rename itself survives a power cut once the folder is synced (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
