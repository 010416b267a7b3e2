"""Self-supervised adaptation of the CNN baseline to one thick volume (SMORE idea, Zhao et al. 2021).

The network is fine-tuned on pairs cut from the input itself, one in-plane axis degraded the way the scanner
degraded the slice axis (:mod:`thinslice.examples.inplane` makes them), and then runs on the real through-plane
direction (``upsample --method cnn --adapt``).

The fine-tuning runs through :func:`thinslice.examples.fit.fine_tune` (L1 loss as in
:mod:`thinslice.train.baseline`, warm-up, cosine decay to a tenth, gradient clipping), not the training engine:
inference does not import training code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thinslice.checkpoints.files import loaded_preset
from thinslice.device import resolve_device
from thinslice.errors import ThinsliceError
from thinslice.examples.fit import FineTune, fine_tune
from thinslice.examples.inplane import DEFAULT_BATCH, DEFAULT_PATCH, adaptation_sampler
from thinslice.io.volume import Volume
from thinslice.models.baseline import ResidualCNN3D

DEFAULT_ADAPT_STEPS = 200
DEFAULT_ADAPT_LR = 1e-4


def _l1(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.l1_loss(model(batch["lr"]).float(), batch["hr"].float())


def adapt_baseline(
    model: ResidualCNN3D,
    thick: Volume,
    spacing_mm: float,
    profile: str = "gaussian",
    plan: FineTune | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    sampling: tuple[tuple[int, int, int], int] | None = None,
) -> ResidualCNN3D:
    """``model`` fine-tuned on self-supervised pairs from ``thick`` (in place); returned in eval mode on ``device``.
    ``profile`` is the thick slices' assumed slice profile (gaussian, box or decimate). ``plan`` defaults to
    200 steps at lr 1e-4 (warm-up, cosine to a tenth, clipping, fp32); bf16 is about twice as fast on a CPU.

    ``sampling`` (patch size, batch size) defaults to the model's training settings (its preset's
    ``train_baseline`` when it was loaded from a bundle).
    """
    plan = plan or default_plan()
    if plan.steps < 1:
        raise ThinsliceError(f"--adapt-steps must be at least 1, got {plan.steps}")
    train_cfg = getattr(loaded_preset(model), "train_baseline", None)
    if sampling is None:
        d, h, w = (int(v) for v in getattr(train_cfg, "patch_size", DEFAULT_PATCH))
        sampling = ((d, h, w), int(getattr(train_cfg, "batch_size", DEFAULT_BATCH)))
    patch, batch = sampling
    sampler = adaptation_sampler(thick, spacing_mm, profile, patch, batch, seed)
    torch.manual_seed(seed)
    model.to(resolve_device(device))
    return fine_tune(model, iter(sampler), _l1, plan)


def default_plan(steps: int = DEFAULT_ADAPT_STEPS, lr: float = DEFAULT_ADAPT_LR, precision: str = "fp32",
                 progress: bool = False) -> FineTune:
    """The CNN's adaptation schedule: warm-up over a tenth (at most 10 steps), cosine decay to a tenth, clipping."""
    return FineTune(steps=int(steps), lr=float(lr), warmup=min(10, int(steps) // 10), min_lr_ratio=0.1,
                    grad_clip=1.0, precision=precision, progress=progress)
