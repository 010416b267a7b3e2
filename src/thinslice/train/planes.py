"""Train the through-plane planes network (``thinslice train-planes``, ``--method planes``).

Training examples are 2D planes on the thick grid, far cheaper than 3D patches, so a CPU sees hundreds of
thousands of them per hour. Each example is a thin plane X (rows x k thin rows, ``width`` pixels) taken either
from a volume's through-plane planes (coronal or sagittal) or, with probability ``inplane_fraction``, from an axial
slice with one in-plane axis playing the slice axis (the SMORE / SR4ZCT self-supervision: in-plane resolution is
higher than through-plane, and every volume has hundreds of such planes). X is degraded with a random profile,
thickness (jitter, overlap) and factor k as ``thick = A X`` and turned into cubic-dc as ``base = B thick``, with
the very operators inference uses (:func:`thinslice.degrade.operators.cell_operators`). The loss compares the
network's output with X. Validation runs the shipped pipeline (:class:`thinslice.infer.planes.Planes`) on
whole slices of the validation volumes, so the logged PSNR is what ``--method planes`` gives.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from thinslice.checkpoints.bundle import save_model
from thinslice.errors import ThinsliceError
from thinslice.examples.planes import PlaneSampler
from thinslice.infer.planes import Planes
from thinslice.io.volume import Volume
from thinslice.models.factory import build_planes
from thinslice.models.planes import PlanesNet
from thinslice.presets import Preset, load_preset
from thinslice.train.engine import (
    RunOptions,
    Trainer,
    TrainResult,
    check_run_record,
    engine_config,
    fit_run,
    run_settings,
)
from thinslice.train.validation import VAL_FACTOR, make_pipeline_validate, validation_cases

log = logging.getLogger(__name__)

LOSSES = ("l1", "mse")
VAL_INPLANE = 256  # central in-plane crop of each validation volume (whole slices through-plane)


@dataclass(kw_only=True)
class PlanesTrainOptions(RunOptions):
    loss: str = "l1"
    init: str | None = None  # start from these planes weights (a bundle folder) instead of a fresh network


def make_loss(kind: str):
    if kind not in LOSSES:
        raise ThinsliceError(f"unknown --loss '{kind}': use one of {', '.join(LOSSES)}")
    fn = F.l1_loss if kind == "l1" else F.mse_loss

    def loss(models: dict[str, nn.Module], batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        pred = models["planes"](batch["thick"], batch["base"], batch["cond"])
        value = fn(pred.float(), batch["hr"])
        return value, {"l1_base": float(F.l1_loss(batch["base"], batch["hr"]).detach())}

    return loss


def initial_planes(preset: Preset, init: str | None, resume: bool) -> PlanesNet:
    """A fresh network, or one started from ``init`` (a bundle folder, or one planes weights file such as
    ``planes-x4.safetensors``) when not resuming (a resumed run continues from its own checkpoint).

    The trunk must match the preset's (channels, context, dims: refused in one line otherwise); the heads of
    the factors both networks have are copied too, a factor the source lacks starts fresh (e.g. a x4/x5 network
    started from the x4 one). A preset with more residual blocks deepens the source: the extra blocks start as the
    identity (their last convolution zero), so training starts from the source's function with more capacity."""
    model = build_planes(preset)
    if init and not resume:
        source = _init_source(init)
        mine, theirs = model.cfg, source.cfg
        trunk = ("channels", "context", "dims")
        if any(getattr(mine, f) != getattr(theirs, f) for f in trunk) or mine.num_blocks < theirs.num_blocks:
            def arch(cfg: object) -> str:
                return ", ".join(f"{f} {getattr(cfg, f)}" for f in (*trunk, "num_blocks"))

            raise ThinsliceError(f"--init {init} has another architecture ({arch(theirs)}) than the preset "
                                 f"({arch(mine)}): pick weights trained with the same preset (or with fewer "
                                 "blocks, to deepen them)")
        state = model.state_dict()
        shared = {k: v for k, v in source.state_dict().items() if k in state and v.shape == state[k].shape}
        model.load_state_dict(shared, strict=False)
        _identity_blocks(model, theirs.num_blocks)
        fresh = sorted({int(k) for k in mine.factors} - {int(k) for k in theirs.factors})
        log.info("initialised from %s%s%s", init,
                 f" (heads for factors {', '.join(map(str, fresh))} start fresh)" if fresh else "",
                 f" (blocks {theirs.num_blocks}-{mine.num_blocks - 1} added as the identity)"
                 if mine.num_blocks > theirs.num_blocks else "")
    return model


def _identity_blocks(model: PlanesNet, copied: int) -> None:
    """Zero the last convolution of every residual block after the first ``copied``: a block x + 0.1 * conv2(...)
    is then the identity, and the deepened network computes what the source did."""
    blocks: list[Any] = list(model.body)  # the residual blocks (each has conv2)
    for block in blocks[copied:]:
        nn.init.zeros_(block.conv2.weight)
        nn.init.zeros_(block.conv2.bias)


def _init_source(init: str) -> PlanesNet:
    """The planes network in ``init``: a weights file, or a bundle folder's all-factor network."""
    from thinslice.checkpoints.bundle import load_model, load_planes

    path = Path(init)
    if path.is_file():
        return cast(PlanesNet, load_model("planes", path))  # the planes kind is a PlanesNet
    return load_planes(Planes.locate_weights(init))


def train_planes(train: Sequence[Volume | str | Path], val: Sequence[Volume | str | Path] | None,
                 opts: PlanesTrainOptions) -> TrainResult:
    """Train the planes network; ``result.models['planes']`` holds the final (EMA) weights."""
    preset = load_preset(opts.preset)
    tc, seed, ema_decay = run_settings(preset.train_planes, opts)
    run_dir = Path(opts.run_dir)
    record = {"kind": "planes", "preset": preset.name, "planes": asdict(preset.planes),
              "planes_data": asdict(preset.planes_data), "train_planes": asdict(tc), "seed": seed, "loss": opts.loss,
              "init": opts.init}
    check_run_record(run_dir, record, opts.resume, ("planes", "planes_data", "loss"))
    torch.manual_seed(seed)
    layout = torch.channels_last if preset.planes.dims == 2 else torch.channels_last_3d
    # ~25% faster on a CPU (bf16); Module.to takes memory_format, though torch's stubs leave it out
    model = initial_planes(preset, opts.init, opts.resume).to(memory_format=layout)  # type: ignore[call-overload]
    sampler = PlaneSampler(train, preset.planes_data, preset.degradation, preset.planes, tc.batch_size, seed)
    # Validated at x4 like every trainer; a network that serves no x4 (e.g. an x5 specialist) at its first factor.
    factors = [int(k) for k in preset.planes.factors]
    cases = validation_cases(list(val) if val else list(train), VAL_INPLANE,
                             factor=VAL_FACTOR if VAL_FACTOR in factors else factors[0])
    precision = "bf16" if opts.mixed_precision == "bf16" else "fp32"
    validate = make_pipeline_validate(cases, lambda models: Planes.from_model(models["planes"], precision=precision))

    def export(eval_models: dict[str, nn.Module], out_dir: Path) -> None:
        save_model(eval_models["planes"], "planes", preset, out_dir)

    # Each batch has one factor and so uses one factor's input/output heads: under DDP the other heads get no
    # gradient in that step, which DDP must be told (find_unused_parameters; measured against a zero-weight term on
    # every head in docs/guide/training.md).
    config = replace(engine_config(run_dir, tc, opts, seed, ema_decay), find_unused_parameters=True)
    trainer = Trainer({"planes": model}, make_loss(opts.loss), sampler, config,
                      validate_fn=validate, export_fn=export)
    return fit_run(trainer, opts, record, preset)
