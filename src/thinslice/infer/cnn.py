"""``--method cnn``: the supervised residual CNN baseline refining a cubic-upsampled volume.

Cubic B-spline upsampling to the thin grid, HU -> model range, :class:`~thinslice.models.baseline.ResidualCNN3D`
over the whole volume in overlapping windows (MONAI ``sliding_window_inference``, Gaussian blending), back to HU,
then data consistency with the thick input, on by default (:mod:`thinslice.infer.consistency`).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from thinslice.checkpoints.bundle import load_baseline
from thinslice.checkpoints.device import autocast, autocast_dtype, resolve_device
from thinslice.checkpoints.files import loaded_preset, weights_label
from thinslice.errors import ThinsliceError
from thinslice.infer.consistency import make_consistent
from thinslice.infer.options import option_bool, option_float, option_int, option_patch
from thinslice.infer.upsample import get_method, register_method
from thinslice.io.volume import Volume
from thinslice.models.baseline import ResidualCNN3D
from thinslice.models.intensity import HU_MAX, HU_MIN, hu_to_model, model_to_hu

DEFAULT_OVERLAP = 0.25
# Inference windows are the training patch times this per axis: fewer window borders, still small in memory.
ROI_SCALE = (2, 2, 2)
OPTIONS = ("checkpoint", "device", "patch_size", "profile", "consistency", "progress", "preset", "thickness", "adapt",
           "adapt_steps", "seed", "precision")


def default_roi(model: ResidualCNN3D) -> tuple[int, int, int]:
    preset = loaded_preset(model)
    patch = getattr(getattr(preset, "train_baseline", None), "patch_size", (32, 64, 64))
    return tuple(int(p) * k for p, k in zip(patch, ROI_SCALE, strict=True))  # type: ignore[return-value]


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
    input, so bf16 rounding barely shows in HU; see docs/benchmark.md).
    """
    amp = autocast_dtype(precision)
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(hu_to_model(np.asarray(lr_hu_slices_first, np.float32))))[None, None]
    roi = roi or default_roi(model)
    # Windows no larger than the volume: MONAI would otherwise pad with zeros (~1000 HU in model range).
    roi = tuple(min(int(r), int(n)) for r, n in zip(roi, x.shape[2:], strict=True))
    was_training = model.training
    model.eval()

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            return model(window).float()

    out = sliding_window_inference(
        x, roi_size=roi, sw_batch_size=1, predictor=predictor, overlap=DEFAULT_OVERLAP, mode="gaussian",
        sw_device=device, device=torch.device("cpu"), progress=progress,
    )
    model.train(was_training)
    hu = model_to_hu(out[0, 0].float().numpy())
    return np.clip(hu, HU_MIN, HU_MAX).astype(np.float32)


def upsample_cnn(
    thick: Volume,
    spacing_mm: float,
    checkpoint: str | None = None,
    device: str | None = None,
    patch_size: tuple[int, int, int] | str | None = None,
    profile: str | None = None,
    consistency: bool | str = True,
    progress: bool | str = False,
    preset: str | None = None,
    thickness: float | str | None = None,
    adapt: bool | str = False,
    adapt_steps: int | str = 200,
    seed: int | str = 0,
    precision: str = "fp32",
) -> Volume:
    """CNN-baseline upsampling of ``thick`` to ``spacing_mm`` slices on ``thin_grid(thick, spacing_mm)``.

    ``patch_size`` (D H W voxels): inference window (default: twice the training patch). ``consistency`` (default
    on, as for ldm) projects the output onto agreement with the thick input under ``profile`` (default gaussian)
    and ``thickness``; on ct02 this projection alone adds 0.8-1.3 dB to cubic interpolation (docs/benchmark.md).
    ``adapt`` first fine-tunes the network on the input itself (in-plane axes degraded like the slice axis, SMORE).
    """
    roi = None if patch_size is None else option_patch("patch_size", patch_size)
    use_dc = option_bool("consistency", consistency)
    use_adapt = option_bool("adapt", adapt)
    if profile is not None and not (use_dc or use_adapt):
        raise ThinsliceError("--option profile=... is only used with consistency=true or --adapt for the cnn method")
    thick_mm = None if thickness is None else option_float("thickness", thickness, positive=True)
    bundle = get_method("cnn").bundle(checkpoint)
    model = load_baseline(bundle, resolve_device(device), preset=preset)
    if use_adapt:
        from thinslice.infer.cnn_adapt import adapt_baseline, default_plan

        plan = default_plan(option_int("adapt_steps", adapt_steps, 1), precision=str(precision),
                            progress=option_bool("progress", progress))
        model = adapt_baseline(model, thick, spacing_mm, profile or "gaussian", plan, resolve_device(device),
                               option_int("seed", seed))
    start = time.perf_counter()
    lr = get_method("cubic").fn(thick, spacing_mm)
    refined = refine_cnn(model, lr.slices_first(), roi, progress=option_bool("progress", progress),
                         precision=str(precision))
    out = lr.with_slices(refined, lr.slice_spacing, 0.0, lr.slice_thickness)
    if use_dc:
        out, report = make_consistent(out, thick, profile or "gaussian", thick_mm)
        out.metadata["cnn_consistency_hu"] = (
            f"{profile or 'gaussian'} profile; |A x - thick| mean {report['before_mean_abs']:.3g} -> "
            f"{report['after_mean_abs']:.3g}")
    out.metadata["cnn"] = f"weights {weights_label(model)}, {time.perf_counter() - start:.1f} s"
    return out


register_method(
    "cnn", upsample_cnn,
    description="residual 3D CNN baseline refining cubic interpolation; needs trained weights (--checkpoint DIR or "
                "shipped)",
    options=OPTIONS,
    weights=("baseline",), train_hint="thinslice train-baseline ...", preference=1,
)
