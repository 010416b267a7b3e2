"""Is the ldm std map worth reading? Calibration of a per-voxel standard deviation against the actual error.

Two questions a user of an uncertainty map asks, each answered by one number:

- *does it point at the errors?* Spearman rank correlation of std with |error|, per voxel and per block
  (blocks average out the noise of a few samples' std, which is what a reader of the map sees);
- *is its size right?* coverage: the fraction of voxels whose truth lies within mean +- 2 std (0.954 for a Gaussian
  posterior whose std the samples estimate well; lower means the map is over-confident).

Voxels outside the body (air) are left out: there the error and the std are both ~0 and would inflate every score.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from thinslice.errors import ThinsliceError
from thinslice.io.mask import body_mask

BLOCK = (4, 16, 16)
MAX_VOXELS = 2_000_000  # rank correlation on a fixed random subset beyond this (a full sort is slow and adds nothing)


def _blocks(x: np.ndarray, block: tuple[int, int, int]) -> np.ndarray:
    """Mean over non-overlapping blocks (the volume cropped to whole blocks)."""
    shape = [n // b for n, b in zip(x.shape, block, strict=True)]
    if min(shape) < 1:
        raise ThinsliceError(f"volume {x.shape} is smaller than one calibration block {block}")
    crop = x[: shape[0] * block[0], : shape[1] * block[1], : shape[2] * block[2]]
    return crop.reshape(shape[0], block[0], shape[1], block[1], shape[2], block[2]).mean(axis=(1, 3, 5))


def calibration(mean_hu: np.ndarray, std_hu: np.ndarray, truth_hu: np.ndarray, seed: int = 0,
                block: tuple[int, int, int] = BLOCK) -> dict[str, float]:
    """Rank correlation (voxel, block) of std with |mean - truth|, and coverage of mean +- 1 and 2 std, in the
    body; also the mean std and mean |error| there (HU)."""
    if not (mean_hu.shape == std_hu.shape == truth_hu.shape):
        raise ThinsliceError(f"mean {mean_hu.shape}, std {std_hu.shape} and truth {truth_hu.shape} differ in shape")
    error = np.abs(np.asarray(mean_hu, np.float32) - np.asarray(truth_hu, np.float32))
    std = np.asarray(std_hu, np.float32)
    body = body_mask(truth_hu)
    if body.sum() < 10:
        raise ThinsliceError("the truth has almost no body voxels (all air?): nothing to calibrate on")
    e, s = error[body], std[body]
    if e.size > MAX_VOXELS:
        pick = np.random.default_rng(seed).choice(e.size, MAX_VOXELS, replace=False)
        e_rank, s_rank = e[pick], s[pick]
    else:
        e_rank, s_rank = e, s
    blocks_in_body = _blocks(body.astype(np.float32), block) > 0.5
    block_error = np.sqrt(_blocks(error**2, block))[blocks_in_body]
    block_std = np.sqrt(_blocks(std**2, block))[blocks_in_body]
    return {
        "spearman_voxel": float(spearmanr(s_rank, e_rank).statistic),
        "spearman_block": float(spearmanr(block_std, block_error).statistic),
        "coverage_1std": float(np.mean(e <= s)),
        "coverage_2std": float(np.mean(e <= 2 * s)),
        "mean_std_hu": float(s.mean()),
        "mean_abs_error_hu": float(e.mean()),
        "body_voxels": int(e.size),
    }
