"""Metrics (PSNR, SSIM, HU-MAE) and benchmarks."""
