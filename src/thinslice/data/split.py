"""The data split every recipe uses: which slices of the shared CT volumes train, and which are held out.

Written down once here (and in docs/design/clinical.md) so that training recipes, the benchmark and the uncertainty
calibration cannot drift apart. A part is a volume named by its prefix (``ct07``) and a range of its slices in
slices-first order ("lower" = the first slices, "upper" = the last), so the held-out parts are contiguous slabs
that no training example ever overlaps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from thinslice.errors import ThinsliceError


@dataclass(frozen=True)
class Part:
    """Slices ``[start, stop)`` (None: the volume's end) of the volume whose file name starts with ``prefix``."""

    prefix: str
    start: int = 0
    stop: int | None = None

    @property
    def name(self) -> str:
        if self.start == 0 and self.stop is None:
            return self.prefix
        if self.start == 0:
            return f"{self.prefix}_lower{self.stop}"
        return f"{self.prefix}_from{self.start}"


TRAIN: tuple[Part, ...] = (
    Part("ct02", 0, 80), Part("ct04"), Part("ct05"), Part("ct06"), Part("ct07", 0, 175), Part("ct08", 0, 100),
    Part("ct09"), Part("ct10"),
)
HELD_OUT: tuple[Part, ...] = (Part("ct02", 80), Part("ct07", 175), Part("ct08", 100))
# Generalisation rows: a model trained without these volumes at all is scored on the whole of each.
UNSEEN: tuple[str, ...] = ("ct07", "ct08")
SETS = ("train", "train_unseen", "heldout", "unseen")


def parts(which: str) -> tuple[Part, ...]:
    """The parts of one set: ``train``, ``train_unseen`` (train without the UNSEEN volumes), ``heldout`` or
    ``unseen`` (the UNSEEN volumes whole)."""
    if which == "train":
        return TRAIN
    if which == "train_unseen":
        return tuple(p for p in TRAIN if p.prefix not in UNSEEN)
    if which == "heldout":
        return HELD_OUT
    if which == "unseen":
        return tuple(Part(prefix) for prefix in UNSEEN)
    raise ThinsliceError(f"unknown data set '{which}': use one of {', '.join(SETS)}")


def source_file(folder: Path, prefix: str) -> Path:
    """The one volume in ``folder`` whose name starts with ``prefix_`` (refused in one line if none or several)."""
    found = sorted(p for p in folder.iterdir() if p.name.startswith(prefix + "_") and p.name.endswith(".nii.gz"))
    if len(found) != 1:
        raise ThinsliceError(f"expected one {prefix}_*.nii.gz in {folder}, found {len(found)}: point --data at the "
                             "shared CT folder (see its MANIFEST.md)")
    return found[0]


def write_part(part: Part, source: Path, out_dir: Path) -> Path:
    """Write ``part`` of ``source`` as ``out_dir/<part name>.nii.gz`` (kept if it already exists)."""
    from thinslice.io import read_volume, write_volume

    path = out_dir / f"{part.name}.nii.gz"
    if path.exists():
        return path
    vol = read_volume(source)
    stop = vol.num_slices if part.stop is None else part.stop
    if not 0 <= part.start < stop <= vol.num_slices:
        raise ThinsliceError(f"{source.name} has {vol.num_slices} slices, fewer than the split's {part.name} needs")
    out_dir.mkdir(parents=True, exist_ok=True)
    piece = vol.slices_first()[part.start:stop]
    write_volume(vol.with_slices(piece, vol.slice_spacing, part.start * vol.slice_spacing), path)
    return path


def materialise(source_dir: str | Path, out_dir: str | Path, sets: Sequence[str] = SETS) -> dict[str, list[Path]]:
    """Write each set's parts under ``out_dir/<set>/``; returns the files of each set."""
    src, out = Path(source_dir), Path(out_dir)
    return {which: [write_part(p, source_file(src, p.prefix), out / which) for p in parts(which)] for which in sets}
