"""``--method cnn``: the supervised residual CNN baseline refining a cubic-upsampled volume.

Cubic B-spline upsampling to the thin grid, HU -> model range, :class:`~thinslice.models.baseline.ResidualCNN3D`
over the whole volume in overlapping windows (:func:`thinslice.models.windows.blend_windows`), back to HU,
then data consistency with the thick input, on by default (:mod:`thinslice.infer.consistency`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from thinslice.checkpoints.bundle import load_baseline
from thinslice.checkpoints.files import keep_record, loaded_preset, weights_label
from thinslice.device import autocast, autocast_dtype, resolve_device
from thinslice.infer.pipeline import Acquisition, LearnedOptions, Pipeline, Result
from thinslice.infer.registry import register_pipeline
from thinslice.io.volume import Volume
from thinslice.models.baseline import ResidualCNN3D
from thinslice.models.intensity import HU_MAX, HU_MIN, hu_to_model, model_to_hu
from thinslice.models.windows import blend_windows, fit_window

# Inference windows are the training patch times this per axis: fewer window borders, still small in memory.
ROI_SCALE = (2, 2, 2)


def default_roi(model: ResidualCNN3D) -> tuple[int, int, int]:
    preset = loaded_preset(model)
    patch = getattr(getattr(preset, "train_baseline", None), "patch_size", (32, 64, 64))
    d, h, w = (int(p) * k for p, k in zip(patch, ROI_SCALE, strict=True))
    return d, h, w


@torch.no_grad()
def refine_cnn(
    model: ResidualCNN3D,
    lr_hu_slices_first: np.ndarray,
    roi: tuple[int, int, int] | None = None,
    progress: bool = False,
    precision: str = "fp32",
) -> np.ndarray:
    """``model`` applied to a cubic-upsampled HU volume (D, H, W) in overlapping windows; HU out, same shape.

    ``precision="bf16"`` runs the convolutions under autocast (the network predicts a small residual over its
    input, so bf16 rounding barely shows in HU; see docs/design/benchmark.md).
    """
    amp = autocast_dtype(precision)
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(hu_to_model(np.asarray(lr_hu_slices_first, np.float32))))[None, None]
    window = fit_window(roi or default_roi(model), tuple(x.shape[2:]))
    was_training = model.training
    model.eval()

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            return model(window).float()

    out = blend_windows(x, window, predictor, device, progress)
    model.train(was_training)
    hu = model_to_hu(out[0, 0].float().numpy())
    return np.clip(hu, HU_MIN, HU_MAX).astype(np.float32)


@dataclass(frozen=True)
class CnnOptions(LearnedOptions):
    patch_size: tuple[int, int, int] | None = None  # inference window D H W (default: twice the training patch)
    consistency: bool = True  # on ct02 the projection alone adds 0.8-1.3 dB to cubic (docs/design/benchmark.md)
    adapt: bool = False  # fine-tune on the input itself first (in-plane axes degraded like the slice axis, SMORE)
    adapt_steps: int = 200


@register_pipeline
class Cnn(Pipeline):
    """cubic -> the residual 3D CNN in overlapping windows -> data consistency (default on)."""

    name = "cnn"
    description = ("residual 3D CNN baseline refining cubic interpolation; needs trained weights (--checkpoint DIR "
                   "or shipped)")
    Options = CnnOptions
    weights = ("baseline",)
    preference = 1
    model: ResidualCNN3D

    def load(self) -> None:
        o = self.options
        self.model = load_baseline(self.bundle(), resolve_device(o.device), preset=o.preset)

    def refine(self, thick: Volume, prior: Volume, acquisition: Acquisition) -> Result:
        o, model = self.options, self.model
        if o.adapt:  # on a copy: the pipeline's own weights stay those it loaded, whatever input comes next
            from thinslice.infer.cnn_adapt import adapt_baseline, default_plan

            plan = default_plan(o.adapt_steps, precision=o.precision, progress=o.progress)
            copied = cast(ResidualCNN3D, keep_record(self.model, copy.deepcopy(self.model)))
            model = adapt_baseline(copied, thick, prior.slice_spacing,
                                   acquisition.profile, plan, resolve_device(o.device), o.seed)
        start = time.perf_counter()
        refined = refine_cnn(model, prior.slices_first(), o.patch_size, o.progress, o.precision)
        out = prior.with_slices(refined, prior.slice_spacing, 0.0, prior.slice_thickness)
        return Result(out, report={"cnn": f"weights {weights_label(self.model)}, "
                                          f"{time.perf_counter() - start:.1f} s"})
