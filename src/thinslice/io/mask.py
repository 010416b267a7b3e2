"""Body mask, so that HU errors can be reported where the anatomy is rather than diluted by air."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BODY_THRESHOLD_HU = -500.0


def body_mask(hu_slices_first: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Boolean mask of the patient: voxels above ``threshold_hu``, largest 3D connected component, holes (lungs,
    airways) filled slice by slice along axis 0.

    Pass the slices-first array (``volume.slices_first()``) so that holes are filled in the image planes.
    """
    above = np.asarray(hu_slices_first) > threshold_hu
    labels, count = ndimage.label(above)
    if count == 0:
        return above
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    del labels
    for k in range(mask.shape[0]):
        mask[k] = ndimage.binary_fill_holes(mask[k])
    return mask
