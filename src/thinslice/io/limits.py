"""Limits checked at the boundary, before a byte of voxel data is allocated.

A 1 KB header can claim a terabyte volume (an NRRD saying 2000x2000x1000, a DICOM with Rows = Columns = 12000, a
2 MB gzip of zeros that inflates to 4 GB). Every reader estimates what the file will take from its header alone and
asks here first, so such a file ends in one line instead of the machine swapping or the process being killed.
"""

from __future__ import annotations

from pathlib import Path

from thinslice.errors import ThinsliceError

# Copies of the voxel data a read holds at once: the decoded native array, the float32 volume, and one float32
# working copy made by clean-up steps (padding, tilt resampling).
READ_COPIES = 3
# Share of the available memory a read may take (the rest is for the method that runs on the volume).
READ_SHARE = 0.8


def available_memory() -> int:
    """Bytes of memory this process can take now (psutil's "available": free plus reclaimable cache)."""
    import psutil

    return int(psutil.virtual_memory().available)


def check_read_size(source: str | Path, voxels: int, bytes_per_voxel: int, shape: str = "") -> None:
    """Refuse, in one line and before reading voxels, a volume whose header asks for more memory than there is.

    ``voxels`` and ``bytes_per_voxel`` come from the header (``shape`` says it back to the user, e.g. "512x512x300").
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
