"""Atomic writes: a temporary beside the final name, then a rename, so a crash never leaves a half-written file.

Each write owns a group of hidden names in the target folder, ``.thinslice-tmp-<pid>-<token>``: a lock file
(``...<token>.lock``) and the temporary file (``...<token>-<name>``) or folder (``...<token>``). The writer holds an
exclusive ``flock`` on the lock file for the whole write; the kernel releases it when the writer ends, however it
ends (``kill -9`` included). A later write into the same folder removes the leftovers of a group only when it can take
that lock itself, so a running write is never touched, even by a process in another PID namespace (a container) or
on another host sharing the folder over NFS, where a process id says nothing. The PID in the name is for humans.
Where the file system cannot lock, nothing is removed: leftovers are wasted space, a deleted running write is lost
work.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; leftovers are then kept
    fcntl = None  # type: ignore[assignment]  # the module or None, tested before each use


def current_umask() -> int:
    """The process umask (Python can only read it by setting it), to give temp-created outputs normal modes."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


TEMP_PREFIX = ".thinslice-tmp-"
LOCK_SUFFIX = ".lock"
# A group: prefix, pid, the 8-character token of mkstemp; then the end, "-<name>" or ".lock".
_GROUP = re.compile(r"(" + re.escape(TEMP_PREFIX) + r"\d+-[a-z0-9_]{8})(?:$|-|" + re.escape(LOCK_SUFFIX) + "$)")
# Temporaries without a lock file (left by older versions, or by a writer killed between removing its temporary
# and its lock) are removed only when nothing can still be writing them.
UNLOCKED_STALE_S = 24 * 3600.0


def temp_prefix() -> str:
    """Prefix of this process's temporary files and folders."""
    return f"{TEMP_PREFIX}{os.getpid()}-"


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries in ``folder`` whose writer has ended (its lock can be taken); returns what went."""
    try:
        entries = [e for e in Path(folder).iterdir() if e.name.startswith(TEMP_PREFIX)]
    except OSError:
        return []
    groups: dict[str, list[Path]] = {}
    for entry in entries:
        match = _GROUP.match(entry.name)
        groups.setdefault(match.group(1) if match else entry.name, []).append(entry)
    removed: list[Path] = []
    for group, members in groups.items():
        lock = Path(folder) / (group + LOCK_SUFFIX)
        data = [m for m in members if m != lock]
        if lock in members:
            removed += _remove_if_unlocked(lock, data)
        else:
            removed += [_remove(m) for m in data if _older_than(m, UNLOCKED_STALE_S)]
    return removed


def _remove_if_unlocked(lock: Path, members: list[Path]) -> list[Path]:
    """Remove ``members`` and ``lock`` when the lock can be taken (its writer has ended); else nothing."""
    fd = _take_lock(lock)
    if fd is None:
        return []
    try:
        gone = [_remove(m) for m in members]
        lock.unlink(missing_ok=True)
        return [*gone, lock]
    finally:
        os.close(fd)


def _take_lock(lock: Path) -> int | None:
    """An open descriptor holding ``lock`` exclusively, or None: held by a writer, unreadable, or no locking here."""
    if fcntl is None:
        return None
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held (EWOULDBLOCK), or a file system without flock (ENOLCK, EOPNOTSUPP): do not delete
        os.close(fd)
        return None
    return fd


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except OSError:
        return False


def _remove(entry: Path) -> Path:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)
    return entry


@contextmanager
def _owned_group(parent: Path) -> Iterator[str]:
    """A new temporary group in ``parent``: its lock file created and held for the block, removed at its end."""
    while True:
        fd, name = tempfile.mkstemp(prefix=temp_prefix(), suffix=LOCK_SUFFIX, dir=parent)
        if fcntl is None:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locking on this file system: cleaners cannot lock it either, so they keep it
            break
        try:  # a cleaner may have taken the lock before us and removed the file: start again then
            if os.stat(name).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield Path(name).name[: -len(LOCK_SUFFIX)]
    finally:
        Path(name).unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def make_temp_dir(parent: str | Path) -> Iterator[Path]:
    """A private temporary folder in ``parent`` for the block (stale ones of ended writers removed first); it is
    removed at the end unless the block renamed it into place."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(parent)
    with _owned_group(parent) as group:
        folder = parent / group
        folder.mkdir(mode=0o700)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def atomic_output(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path`` in one rename.

    The temporary file gets the permissions a plain ``open(path, "w")`` would give, and is removed if the block
    fails. ``suffix`` matters to writers that pick the format from the extension.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    with _owned_group(path.parent) as group:
        tmp = path.parent / f"{group}-{path.name}{suffix}"
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (parent folders are created)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
    return Path(path)


@contextmanager
def native_messages_to_log(logger_name: str = "thinslice.io") -> Iterator[None]:
    """Route what native libraries (ITK, niftilib) print on the process's stderr into the log at debug level.

    They report a failed write as "** ERROR: NWAD: wrote only 0 of ... bytes" on stderr and go on; thinslice checks
    the result itself and says what went wrong in one line, so the raw text is kept for ``-v`` only.
    """
    import logging
    import sys

    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured by a test runner)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                logging.getLogger(logger_name).debug("native library said: %s", text)
