"""Metrics (PSNR, SSIM, HU-MAE) and benchmarks."""

from thinslice.evaluate.metrics import evaluate_volumes, mae_hu, psnr, ssim3d
from thinslice.io.mask import body_mask

__all__ = ["body_mask", "evaluate_volumes", "mae_hu", "psnr", "ssim3d"]
