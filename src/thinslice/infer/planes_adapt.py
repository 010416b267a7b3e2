"""``--adapt`` of the planes method: fine-tune the network on the input's own examples before it runs.

Inference, not training: it runs inside ``upsample --method planes --adapt`` on one input, through the few-step loop
of :mod:`thinslice.examples.fit` on :class:`~thinslice.examples.planes.PlaneSampler` examples cut from that input
(its axial slices, one in-plane axis degraded like the slice axis). Kept apart from :mod:`thinslice.infer.planes` so
that the pipeline module holds the pipeline, and the examples package needs no pipeline.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from thinslice.checkpoints.files import keep_record, loaded_preset
from thinslice.examples.fit import FineTune, fine_tune
from thinslice.examples.planes import PlaneSampler
from thinslice.io.volume import Volume
from thinslice.models.planes import PlanesNet
from thinslice.presets import DegradationConfig, PlaneSamplingConfig

# Adaptation: a tenth of the training learning rate keeps the network near what it learned from many volumes.
ADAPT_LR = 5e-5
ADAPT_BATCH = 16


def adapt_planes(model: PlanesNet, thick: Volume, k: int, acquisition: tuple[str, float],
                 plan: FineTune | None = None, seed: int = 0) -> PlanesNet:
    """A copy of ``model`` fine-tuned on ``thick``'s own axial slices, each degraded along one in-plane axis with the
    input's factor and profile (SR4ZCT / SMORE): the only thin-resolution planes a thick scan holds.

    ``plan`` defaults to :func:`adapt_plan` (at most 1500 steps or 180 s at a constant tenth of the training rate).
    """
    torch.manual_seed(seed)
    tuned = copy.deepcopy(model)
    keep_record(model, tuned)
    sampling = dataclasses.replace(getattr(loaded_preset(model), "planes_data", PlaneSamplingConfig()),
                                   inplane_fraction=1.0)
    batch = ADAPT_BATCH if model.cfg.dims == 2 else ADAPT_BATCH // 4  # a block holds ~4 planes' pixels
    sampler = PlaneSampler([thick], sampling, DegradationConfig(factors=(float(k),), profiles=(acquisition[0],)),
                           dataclasses.replace(model.cfg, factors=(k,)), batch, seed, acquisition)
    return fine_tune(tuned, sampler, _l1, plan or adapt_plan())


def adapt_plan(steps: int = 1500, max_seconds: float = 180.0, precision: str = "bf16",
               progress: bool = False) -> FineTune:
    """Adaptation schedule of planes: a tenth of the training learning rate keeps the network near what it learned
    from many volumes."""
    return FineTune(steps=int(steps), lr=ADAPT_LR, max_seconds=float(max_seconds), precision=precision,
                    progress=progress)


def _l1(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.l1_loss(model(batch["thick"], batch["base"], batch["cond"]).float(), batch["hr"])
