"""Atomic writes: a temp file in the same folder, then a rename, so a crash never leaves a half-written file.

Temporary names carry the writer's process id (``.thinslice-tmp-<pid>-...``): a run killed with SIGKILL cannot clean
up after itself, so every later write into the same folder removes the leftovers of processes that no longer exist.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process umask (Python can only read it by setting it), to give temp-created outputs normal modes."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


TEMP_PREFIX = ".thinslice-tmp-"
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-")


def temp_prefix() -> str:
    """Prefix of this process's temporary files and folders."""
    return f"{TEMP_PREFIX}{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove temporary files/folders in ``folder`` left by thinslice processes that no longer run."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def make_temp_dir(parent: Path) -> Path:
    """A private temporary folder in ``parent`` (stale ones of dead processes removed first)."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(parent)
    return Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=parent))


@contextmanager
def atomic_output(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path`` in one rename.

    The temporary file gets the permissions a plain ``open(path, "w")`` would give (``mkstemp`` makes it private),
    and is removed if the block fails. ``suffix`` matters to writers that pick the format from the extension.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    fd, name = tempfile.mkstemp(prefix=f"{temp_prefix()}{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
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
