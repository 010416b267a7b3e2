"""Limits checked at the boundary, before a byte of voxel data is allocated.

A 1 KB header can claim a terabyte volume (an NRRD saying 2000x2000x1000, a DICOM with Rows = Columns = 12000, a
2 MB gzip of zeros that inflates to 4 GB). Every reader estimates what the file will take from its header alone and
asks here first, so such a file ends in one line instead of the machine swapping or the process being killed.
"""

from __future__ import annotations

from pathlib import Path

from thinslice.errors import ThinsliceError
from thinslice.memory import available_memory  # looked up here at call time (tests and probes replace it)

# Copies of the voxel data a read holds at once: the decoded native array, the float32 volume, and one float32
# working copy made by clean-up steps (padding, tilt resampling).
READ_COPIES = 3
# Share of the available memory a read may take (the rest is for the method that runs on the volume).
READ_SHARE = 0.8
# A CT volume in HU has air: a volume whose lowest value lies above this is not HU (MR, 8-bit, rescaled). The
# readers warn about such a volume and the cohort's QC page flags it.
NOT_HU_ABOVE = -500.0


def voxel_count(shape) -> int:
    """The number of voxels of ``shape`` in Python integers: numpy's product wraps around at 2**63, so a header
    claiming 2**31 x 2**31 x 2**20 voxels would count as a negative (or small) volume and pass the check."""
    count = 1
    for size in shape:
        count *= int(size)
    return count


def check_read_size(source: str | Path, voxels: int, bytes_per_voxel: int, shape: str = "") -> None:
    """Refuse, in one line and before reading voxels, a volume whose header asks for more memory than there is.

    ``voxels`` (from :func:`voxel_count`) and ``bytes_per_voxel`` come from the header (``shape`` says it back to the
    user, e.g. "512x512x300").
    """
    need = int(voxels) * (int(bytes_per_voxel) + 4 * (READ_COPIES - 1))
    have = available_memory()
    if voxels <= 0 or need <= have * READ_SHARE:
        return
    size = f" ({shape} voxels)" if shape else ""
    raise ThinsliceError(
        f"{source}: its header describes a volume{size} that needs about {need / 2**30:.1f} GB to read, but "
        f"{have / 2**30:.1f} GB of memory is available; crop or split the volume, or check that the header is "
        "not damaged")


# Voxel values a volume may hold. HU run from -1024 (air) to a few 10,000 (metal, on 16-bit extended scales); a
# value beyond a million is a damaged voxel or a wrong scaling, and one value like 3e38 overflows the float32
# arithmetic of interpolation kernels (turning whole columns into garbage), so it is refused, not clipped.
VALUE_LIMIT = 1e6
# Voxel sizes in mm a CT volume may have: below 0.01 mm (10 micrometres) or above 100 mm a header holds the wrong
# unit (m or micrometres) or garbage, and a method would run on a meaningless grid.
VOXEL_MM = (0.01, 100.0)


def check_voxel_values(array, source: str | Path) -> None:
    """Refuse NaN, infinite and absurdly large voxels in the array a reader decoded, before any cast or scaling
    (a cast to an integer type or a clean-up step would otherwise turn them into plausible values such as 0 HU).

    min/max propagate NaN and infinity, so the common case needs no temporary array.
    """
    import numpy as np

    if array.size == 0:
        return
    low, high = float(np.min(array)), float(np.max(array))
    if not (np.isfinite(low) and np.isfinite(high)):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise ThinsliceError(f"{source} holds {bad} NaN or infinite voxels; replace them (e.g. by -1024 HU for air) "
                             "before using the volume")
    if max(abs(low), abs(high)) > VALUE_LIMIT:
        raise ThinsliceError(f"{source} holds values from {low:.3g} to {high:.3g}, far outside any CT range (HU lie "
                             f"within +-{VALUE_LIMIT:.0e}); check the file's scaling or replace the damaged voxels")


def check_voxel_size(source: str | Path, spacing: tuple[float, ...]) -> None:
    """Refuse a voxel size outside :data:`VOXEL_MM` (a header in the wrong unit, or a damaged one)."""
    low, high = VOXEL_MM
    if not all(low <= float(s) <= high for s in spacing):
        shown = " x ".join(f"{float(s):.4g}" for s in spacing)
        raise ThinsliceError(f"{source} has a voxel size of {shown} mm, outside the {low:g} to {high:g} mm of any CT "
                             "volume; fix the spacing (and its unit) in the header")
