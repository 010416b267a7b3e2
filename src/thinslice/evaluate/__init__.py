"""Metrics (PSNR, SSIM, HU-MAE) and benchmarks."""

from thinslice.evaluate.mask import body_mask
from thinslice.evaluate.metrics import evaluate_volumes, mae_hu, psnr, ssim3d

__all__ = ["body_mask", "evaluate_volumes", "mae_hu", "psnr", "ssim3d"]
