"""Volumes in and out: NIfTI, DICOM series, NRRD/MHA with geometry kept."""

from thinslice.io.dicom import SeriesInfo, list_dicom_series
from thinslice.io.readers import read_volume
from thinslice.io.volume import Volume
from thinslice.io.writers import write_volume

__all__ = ["SeriesInfo", "Volume", "list_dicom_series", "read_volume", "write_volume"]
