"""Reliability cases of the hostile-file corpus (:mod:`thinslice.data.hostile`): ``thinslice info FILE`` on every
crafted NIfTI, NRRD/MHA and DICOM input ends with rc 0 and the volume's geometry, or rc 2 and one clean line that
names the file; never a traceback, a hang or another exit code. Files that must be refused (a volume the header
cannot back, a device as data) must not end with rc 0.
"""

from __future__ import annotations

import resource
import subprocess
from collections.abc import Callable

from reliability_harness import THINSLICE, WORK, Case

from thinslice.data import hostile

# A run longer than this is a hang (a FIFO, a device read to its end).
TIMEOUT_S = 30
# Address space of one `thinslice info`: a reader that allocates what a bomb header claims fails instead of
# taking the machine's memory.
MEMORY_CAP = 8 * 2**30
_CORPUS: list[hostile.Hostile] = []



def _name(item: hostile.Hostile) -> str:
    """The name a group is chosen by: the file's, or for a DICOM file alone in its folder, the folder's."""
    return item.path.parent.name if item.kind == "dicom" and item.path.is_file() else item.path.name


GROUPS: dict[str, tuple[str, Callable[[hostile.Hostile], bool]]] = {
    "nifti header fields": ("nifti", lambda h: _name(h).startswith(("dims", "ndim", "bitpix", "datatype",
                                                                          "control", "bigendian", "random"))),
    "nifti geometry": ("nifti", lambda h: _name(h).startswith(("pixdim", "quatern", "srow", "codes"))),
    "nifti data and compression": ("nifti", lambda h: _name(h).startswith((
        "vox_offset", "scl", "extension", "truncated", "empty", "header_only", "not_gzip", "gzip", "bomb", "fifo"))),
    "nrrd sizes, types, encodings": ("nrrd", lambda h: not _name(h).startswith(("detached", "list", "format",
                                                                                   "directions", "origin",
                                                                                   "spacings"))),
    "nrrd detached data and geometry": ("nrrd", lambda h: _name(h).startswith((
        "detached", "list", "format", "directions", "origin", "spacings"))),
    "mha headers": ("mha", lambda h: True),
    "dicom pixel data vs header": ("dicom", lambda h: _name(h).startswith((
        "control", "rows", "bits", "frames", "pixels", "slope", "transfer", "huge", "single"))),
    "dicom geometry": ("dicom", lambda h: _name(h).startswith(("spacing", "ipp", "iop"))),
    "dicom instances and objects": ("dicom", lambda h: _name(h).startswith((
        "sop", "modality", "no_meta", "seg", "rt"))),
}


def cases() -> list[Case]:
    return [Case(f"hostile corpus: {name}", f"thinslice info FILE (each {kind} file of the group)",
                 "every file: rc 0 with its geometry, or rc 2 in one clean line naming it (must-refuse files: rc 2)",
                 _check(kind, pick)) for name, (kind, pick) in GROUPS.items()]


def _corpus() -> list[hostile.Hostile]:
    if not _CORPUS:
        _CORPUS.extend(hostile.corpus(WORK / "fuzz"))
    return _CORPUS


def _check(kind: str, pick: Callable[[hostile.Hostile], bool]) -> Callable[[], tuple[bool, str]]:
    def check() -> tuple[bool, str]:
        items = [h for h in _corpus() if h.kind == kind and pick(h)]
        bad = [f"{_name(h)}: {why}" for h in items if (why := _info_problem(h))]
        return not bad, f"{len(items)} files, {len(items) - len(bad)} handled" + (f"; {'; '.join(bad)}"[:900]
                                                                                  if bad else "")
    return check


def _available_memory() -> int:
    from thinslice.io.limits import available_memory

    return min(available_memory(), MEMORY_CAP)


def _info_problem(item: hostile.Hostile) -> str:
    """Why ``thinslice info`` did not handle ``item`` (empty when it did)."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, resource.RLIM_INFINITY))

    try:
        proc = subprocess.run([*THINSLICE, "info", str(item.path)], capture_output=True, text=True,
                              timeout=TIMEOUT_S, preexec_fn=cap)
    except subprocess.TimeoutExpired:
        return f"no answer in {TIMEOUT_S} s (hang)"
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    if "Traceback" in proc.stderr:
        return "traceback: " + proc.stderr.strip().splitlines()[-1][:150]
    if proc.returncode == 0:
        # A file refused in the fuzz tests only for the memory its header claims (they tell the readers there are
        # 256 MB) is rightly read here when the claim fits this machine: the readers refuse by available memory.
        fits = 0 < item.claims <= _available_memory() * 0.5
        return "rc 0 but the file must be refused" if item.expect == hostile.REFUSE and not fits else ""
    if proc.returncode != 2:
        return f"rc {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:150]}"
    if len(errors) != 1:
        return f"{len(errors)} error lines"
    if not hostile.names_file(errors[0], item.path):
        return "message does not name the file: " + errors[0][:150]
    return ""
