"""gzip at disk speed: ``.nii.gz`` read and written with ISA-L's deflate (the ``isal`` package), several times faster
than the standard library's single-threaded zlib, with the standard library as the fallback where isal is absent.

Why: writing a 512x512x300 result through ITK's gzip took 7-8 s of a 60 s run (``benchmarks/bench_gzip.py``); ISA-L
level 2 writes a file a few percent larger in well under a second, and reads it back faster too. The output is a
plain gzip stream that every reader (nibabel, ITK, dcm2niix, FSL) opens. ``THINSLICE_GZIP_LEVEL`` sets the level:
0 (fastest) to 3 (smallest) for ISA-L; zlib's 1 to 9 where the standard library writes.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import zlib
from pathlib import Path
from typing import Literal, cast

from thinslice.errors import ThinsliceError

try:  # ISA-L: wheels for Linux, macOS and Windows on x86-64 and ARM; the standard library where it has none
    from isal import igzip, igzip_threaded, isal_zlib
except ImportError:  # pragma: no cover - exercised by monkeypatching ENGINE in the tests
    igzip = igzip_threaded = isal_zlib = None  # type: ignore[assignment]  # absent: the standard library serves

# "itk" (benchmarks/bench_gzip.py): ITK compresses while it writes, as thinslice did before ISA-L.
ENGINE = "isal" if igzip is not None else "zlib"
LEVEL_ENV = "THINSLICE_GZIP_LEVEL"
DEFAULT_LEVEL = {"isal": 2, "zlib": 1}  # ISA-L's default; zlib's fastest (its level 6 is 4x slower for 3% less)
MAX_LEVEL = {"isal": 3, "zlib": 9}
# What a damaged or cut gzip stream raises, whichever engine reads it.
_ISAL_ERRORS: tuple[type[BaseException], ...] = (
    (cast(type[BaseException], isal_zlib.error),) if isal_zlib is not None else ())
GZIP_ERRORS: tuple[type[BaseException], ...] = (EOFError, gzip.BadGzipFile, zlib.error, *_ISAL_ERRORS)


def engine() -> str:
    """The deflate engine in use: "isal", "zlib" (or "itk", for comparison)."""
    return ENGINE


def level() -> int:
    """The compression level: ``THINSLICE_GZIP_LEVEL`` when set (clamped to the engine's range), else the default."""
    name = "zlib" if engine() == "itk" else engine()
    text = os.environ.get(LEVEL_ENV, "").strip()
    if not text:
        return DEFAULT_LEVEL[name]
    try:
        chosen = int(text)
    except ValueError:
        raise ThinsliceError(f"{LEVEL_ENV}={text!r} is not a whole number: give 0-{MAX_LEVEL[name]}") from None
    return max(0 if name == "isal" else 1, min(MAX_LEVEL[name], chosen))


def open_gzip(path: str | Path, mode: Literal["rb"] = "rb") -> gzip.GzipFile:
    """A gzip file opened for reading (seekable, as :func:`gzip.open`) with the fastest engine present."""
    if engine() == "isal":
        return cast(gzip.GzipFile, igzip.open(path, mode))  # igzip.IGzipFile is a gzip.GzipFile
    return gzip.GzipFile(path, mode)


def compresses_itself() -> bool:
    """Whether thinslice compresses a ``.nii.gz`` itself (ISA-L or zlib) rather than leaving it to ITK."""
    return engine() != "itk"


def compress_file(source: Path, target: Path, chunk: int = 1 << 22) -> None:
    """``source`` gzip-compressed into ``target`` (threads on a multi-core machine); errors of the disk (full,
    read-only) raise :class:`OSError`, so a short file is never taken for a complete one."""
    with open(source, "rb") as src, _gzip_writer(target) as out:
        shutil.copyfileobj(src, out, chunk)


def _gzip_writer(target: Path) -> io.BufferedIOBase:
    """A gzip writer of the fastest engine present (ISA-L with up to four threads; else zlib)."""
    if engine() == "isal":
        threads = max(1, min(4, os.cpu_count() or 1))
        return cast(io.BufferedIOBase, igzip_threaded.open(target, "wb", compresslevel=level(), threads=threads))
    return gzip.GzipFile(target, "wb", compresslevel=level())
