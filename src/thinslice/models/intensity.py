"""HU <-> model range, in one place. Every network sees HU clipped to [-1024, 3071] mapped linearly to [-1, 1]."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

# An array in, the same kind of array out (a numpy array stays one, a tensor stays one).
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

HU_MIN = -1024.0
HU_MAX = 3071.0
HU_RANGE = HU_MAX - HU_MIN  # 4095: also the PSNR data range
AIR_THRESHOLD_HU = -950.0  # below this a voxel counts as air (lung parenchyma is about -850)


def hu_to_model(hu: ArrayT) -> ArrayT:
    """Clip to [HU_MIN, HU_MAX] and map to [-1, 1]."""
    clipped = hu.clip(HU_MIN, HU_MAX)
    return (clipped - HU_MIN) * (2.0 / HU_RANGE) - 1.0


def model_to_hu(x: ArrayT) -> ArrayT:
    """Exact inverse of :func:`hu_to_model` for values inside the HU range."""
    return (x + 1.0) * (HU_RANGE / 2.0) + HU_MIN


def hu_int16(hu: np.ndarray) -> np.ndarray:
    """HU rounded to int16 (contiguous): how the samplers keep whole volumes in memory (a 512x512x300 CT: 150 MB)."""
    return np.ascontiguousarray(np.rint(np.clip(hu, -32768, 32767)).astype(np.int16))
