"""The data files an NRRD (``data file:``) or MetaImage (``ElementDataFile``) header points to, checked before ITK
opens them.

ITK follows such a path anywhere: ``../../etc/passwd``, ``/proc/self/environ`` (whose bytes would become voxels and
end up in an output or a QC thumbnail), ``/dev/urandom`` or a named pipe (a read that never ends). So the header
text is parsed here first, in every form the two formats allow (one name, ``LIST`` with one name a line, and a
printf pattern with min/max/step), and a data file must lie beside its header: a relative path without ``..``
that names a regular file in the header's folder (or below it), also after symbolic links are followed.

Hand-written because neither SimpleITK nor pynrrd exposes the data-file names without reading the data.
"""

from __future__ import annotations

import os
import re
import stat
import zlib
from pathlib import Path

from thinslice.errors import ThinsliceError, os_reason
from thinslice.io.formats import METAIMAGE, file_extension, format_for_suffix

# Bytes of header text read at most (a LIST of one file per slice stays far below; the voxels of an attached file
# follow the header and are not needed).
HEADER_LIMIT = 4 << 20
# Most data files one header may name (a printf pattern's min..max range is expanded and each name checked).
MAX_DATA_FILES = 100_000

_NRRD_FIELD = re.compile(r"^\s*data\s?file\s*:(?!=)\s*(.*?)\s*$", re.IGNORECASE)
_META_FIELD = re.compile(r"^\s*ElementDataFile\s*[=:]\s*(.*?)\s*$", re.IGNORECASE)
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def regular_file_check(path: Path, what: str = "input") -> None:
    """Refuse a path that is not a regular file (a named pipe would block the read forever, a device never ends)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ThinsliceError(f"cannot read {path}: {os_reason(exc)}") from None
    if not stat.S_ISREG(mode):
        kind = "a named pipe" if stat.S_ISFIFO(mode) else "a device or socket"
        raise ThinsliceError(f"{what} {path} is {kind}, not a regular file; pass a volume file or a DICOM folder")


def data_files(header: Path) -> list[Path]:
    """The detached data files that reading ``header`` would open (empty for a file with its data inside), each
    checked to lie beside the header; a header naming any other file is refused in one line."""
    text = _header_text(header)
    if text.startswith("NRRD"):
        names = _nrrd_names(text, header)
    elif _is_metaimage_name(header) or _meta_line(text.splitlines()) is not None:
        names = _meta_names(text, header)
    else:
        return []
    return [_checked(header, name) for name in names]


def check_compressed_data(header: Path, files: list[Path]) -> None:
    """Refuse a MetaImage header saying ``CompressedData = True`` whose data are not a zlib (or gzip) stream: ITK
    then reads the raw bytes as if inflated and returns garbage voxels without a word."""
    text = _header_text(header)
    if _meta_line(text.splitlines()) is None or not re.search(r"^\s*CompressedData\s*=\s*True\s*$", text, re.I | re.M):
        return
    where = files[0] if files else header
    try:
        with open(where, "rb") as fh:
            if not files:  # LOCAL: the data follow the ElementDataFile line of the header itself
                fh.seek(_local_data_offset(fh.read(HEADER_LIMIT)))
            start = fh.read(1 << 12)
        zlib.decompressobj(wbits=47).decompress(start)  # 47: a zlib or a gzip header, detected
    except OSError as exc:
        raise ThinsliceError(f"cannot read {where}: {os_reason(exc)}") from None
    except zlib.error:
        raise ThinsliceError(f"{header} says CompressedData = True but its data in {where.name} are not compressed "
                             "(not a zlib stream); fix the header (CompressedData = False) or export it again"
                             ) from None


def _local_data_offset(raw: bytes) -> int:
    """Where the voxels of a MetaImage with its data inside start: after the line of ElementDataFile."""
    match = re.search(rb"^[ \t]*ElementDataFile[ \t]*[=:][^\n]*\n", raw, re.I | re.M)
    return match.end() if match else len(raw)


def _header_text(header: Path) -> str:
    """The header's text: its first 64 KB, or up to :data:`HEADER_LIMIT` where a header goes on past them (a long
    LIST of data files); the voxels of a 1 GB file with its data inside are not read."""
    try:
        with open(header, "rb") as fh:
            raw = fh.read(1 << 16)
            if _header_goes_on(raw, header):
                raw += fh.read(HEADER_LIMIT - len(raw))
    except OSError as exc:
        raise ThinsliceError(f"cannot read {header}: {os_reason(exc)}") from None
    return raw.decode("latin-1")


def _header_goes_on(raw: bytes, header: Path) -> bool:
    """Whether the header text may continue past ``raw``: an NRRD header ends at its first empty line, a
    MetaImage header at its ElementDataFile line unless that starts a LIST."""
    if raw.startswith(b"NRRD"):
        return b"\n\n" not in raw.replace(b"\r\n", b"\n")
    if b"ElementDataFile" in raw or _is_metaimage_name(header):
        return b"ElementDataFile" not in raw or re.search(rb"ElementDataFile\s*[=:]\s*LIST", raw, re.I) is not None
    return False


def _is_metaimage_name(header: Path) -> bool:
    return format_for_suffix(file_extension(header)) is METAIMAGE


def _nrrd_names(text: str, header: Path) -> list[str]:
    """The names of the NRRD ``data file:`` field (the header ends at the first empty line; LIST is the last field
    and names one file a line till the end)."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if not line.strip():
            return []  # end of the header of an attached-data .nrrd
        if line.lstrip().startswith("#"):
            continue
        match = _NRRD_FIELD.match(line)
        if match:
            return _field_names(match.group(1), lines[index + 1:], header, "data file")
    return []


def _meta_line(lines: list[str]) -> int | None:
    for index, line in enumerate(lines):
        if _META_FIELD.match(line):
            return index
    return None


def _meta_names(text: str, header: Path) -> list[str]:
    """The names of the MetaImage ``ElementDataFile`` field (LOCAL: the data follow in the same file)."""
    lines = text.splitlines()
    index = _meta_line(lines)
    match = None if index is None else _META_FIELD.match(lines[index])
    if index is None or match is None:
        return []
    value = match.group(1)
    if value.upper() == "LOCAL":
        return []
    return _field_names(value, lines[index + 1:], header, "ElementDataFile")


def _field_names(value: str, rest: list[str], header: Path, field: str) -> list[str]:
    """One name, a LIST (names on the following lines) or a printf pattern ``FORMAT MIN MAX STEP [SUBDIM]``."""
    tokens = value.split()
    if tokens and tokens[0].upper() == "LIST":
        return [line.strip() for line in rest if line.strip() and not line.lstrip().startswith("#")]
    if len(tokens) in (4, 5) and "%" in tokens[0] and all(_is_int(t) for t in tokens[1:]):
        first, last, step = (int(t) for t in tokens[1:4])
        return _pattern_names(tokens[0], first, last, step, header=header, field=field)
    if not value:
        raise ThinsliceError(f"{header}: its {field} field is empty; name the data file beside the header")
    return [value]


def _pattern_names(pattern: str, first: int, last: int, step: int, header: Path, field: str) -> list[str]:
    count = (last - first) // step + 1 if step else 0
    if count <= 0 or count > MAX_DATA_FILES:
        raise ThinsliceError(f"{header}: its {field} pattern {pattern} {first} {last} {step} names {max(count, 0)} "
                             f"files (1 to {MAX_DATA_FILES} allowed); fix the header")
    try:
        return [pattern % number for number in range(first, last + (1 if step > 0 else -1), step)]
    except (TypeError, ValueError):
        raise ThinsliceError(f"{header}: its {field} pattern {pattern!r} is not a file-name pattern with one number "
                             "(such as slice%03d.raw); fix the header") from None


def _is_int(text: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", text) is not None


def _checked(header: Path, name: str) -> Path:
    """``name`` as a path beside ``header``, or a one-line refusal that says why it is not one."""
    parts = re.split(r"[\\/]+", name)
    if name.startswith(("/", "\\", "~")) or _WINDOWS_DRIVE.match(name):
        why = "is an absolute path"
    elif ".." in parts:
        why = "leads out of the header's folder (..)"
    else:
        folder = header.parent.resolve()
        target = (header.parent / name).resolve()
        why = "" if target.is_relative_to(folder) else "is a link to a file outside the header's folder"
        if not why:
            try:
                mode = os.stat(target).st_mode
                why = "" if stat.S_ISREG(mode) else "is not a regular file (a device, pipe or folder)"
            except OSError as exc:
                why = f"cannot be opened ({os_reason(exc)})"
        if not why:
            return target
    raise ThinsliceError(f"{header}: its data file {name!r} {why}; detached voxel data must be a regular file in the "
                         "header's folder, named relative to it (fix the header or move the data file)")
