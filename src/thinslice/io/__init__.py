"""Volumes in and out: NIfTI, DICOM series, NRRD/MHA with geometry kept."""

from thinslice.io.volume import Volume

__all__ = ["Volume"]
