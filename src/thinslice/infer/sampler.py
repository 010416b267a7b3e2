"""One entry point for inference: LR latent -> HR latent with a trained :class:`LatentDenoiser`.

Seeded and reproducible: the same generator seed gives the same output (all noise is drawn from ``generator``).
"""

from __future__ import annotations

import torch

from thinslice.diffusion.ddim import DDIMSchedule
from thinslice.diffusion.resshift import METHODS, ModelFn, ResShiftSchedule
from thinslice.errors import ThinsliceError
from thinslice.models.denoiser import LatentDenoiser


def make_schedule(denoiser: LatentDenoiser, method: str | None = None) -> ResShiftSchedule | DDIMSchedule:
    """The schedule the denoiser was trained with; asking for another method is an error (it would not work)."""
    method = method or denoiser.cfg.method
    if method not in METHODS:
        raise ThinsliceError(f"unknown sampler '{method}': use one of {', '.join(METHODS)}")
    if method != denoiser.cfg.method:
        raise ThinsliceError(
            f"this model was trained for the '{denoiser.cfg.method}' sampler and cannot be sampled with '{method}': "
            f"use --sampler {denoiser.cfg.method}"
        )
    return ResShiftSchedule(denoiser.cfg) if method == "resshift" else DDIMSchedule(denoiser.cfg)


@torch.no_grad()
def sample_latent(
    denoiser: LatentDenoiser,
    y_latent: torch.Tensor,
    factor: torch.Tensor | float | None,
    *,
    method: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    condition: torch.Tensor | None = None,
) -> torch.Tensor:
    """The predicted HR latent x0 for the LR latent ``y_latent`` (B, C, D, H, W).

    ``condition``: what the network is told, when it is not the diffusion's anchor ``y_latent`` (residual latents:
    the anchor is zero and the network sees the prior's latent).
    ``method`` defaults to the one the denoiser was trained for. ``steps``: ResShift runs the T steps it was
    trained with (a different value is an error); DDIM takes any number up to the training steps (default
    cfg.ddim_sample_steps). ``guidance_scale`` defaults to cfg.guidance_scale (1 = no guidance).
    """
    schedule = make_schedule(denoiser, method)
    scale = denoiser.cfg.guidance_scale if guidance_scale is None else guidance_scale
    was_training = denoiser.training
    denoiser.eval()

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return denoiser.guided(x, t, y if condition is None else condition, factor, guidance_scale=scale)

    try:
        out = reverse_process(schedule, model_fn, y_latent, generator, steps, progress)
    except ValueError as err:  # a step count the schedule cannot sample with
        raise ThinsliceError(str(err)) from None
    finally:
        denoiser.train(was_training)
    assert isinstance(out, torch.Tensor)
    return out


Schedule = ResShiftSchedule | DDIMSchedule


@torch.no_grad()
def reverse_process(schedule: Schedule, model_fn: ModelFn, y: torch.Tensor, generator: torch.Generator | None = None,
                    steps: int | None = None, progress: bool = False,
                    return_all: bool = False) -> torch.Tensor | list[torch.Tensor]:
    """The one sampling loop, for ResShift and DDIM alike, through the schedules' step API (set_timesteps,
    init_latent, scale_model_input, step). Noise is drawn on the generator's device and moved to ``y``'s, so a seed
    gives the same result anywhere. ``return_all`` returns [x_T, ..., x_0]."""
    from tqdm.auto import tqdm

    def randn() -> torch.Tensor:
        gen_device = generator.device if generator is not None else y.device
        return torch.randn(y.shape, generator=generator, device=gen_device, dtype=torch.float32).to(y)

    timesteps = schedule.set_timesteps(steps)
    x = schedule.init_latent(y, randn())
    states = [x] if return_all else []
    for step in tqdm(timesteps, desc=schedule.cfg.method, disable=not progress, leave=False):
        t = torch.full((y.shape[0],), step, device=y.device, dtype=torch.long)
        output = model_fn(schedule.scale_model_input(x, t), t, y)
        x = schedule.step(output, t, x, y, randn() if schedule.step_needs_noise(step) else None)
        if return_all:
            states.append(x)
    return states if return_all else x



def diffusion_loss(
    denoiser: LatentDenoiser,
    x0: torch.Tensor,
    y: torch.Tensor,
    factor: torch.Tensor | float | None,
    *,
    generator: torch.Generator | None = None,
    schedule: ResShiftSchedule | DDIMSchedule | None = None,
    cfg_dropout: float | None = None,
    condition: torch.Tensor | None = None,
) -> torch.Tensor:
    """One training loss for the method the denoiser is configured for, with classifier-free-guidance dropout.

    Use this from trainers rather than re-assembling it: the *original* ``y`` must drive the ResShift forward
    process while only the network's condition is dropped (``drop_mask``). Timesteps, dropout and noise are all
    drawn from ``generator`` (noise on the generator's device, then moved to x0's). ``condition``: the network's
    condition when it is not ``y`` (see :func:`sample_latent`).
    """
    schedule = schedule or make_schedule(denoiser)
    batch = x0.shape[0]
    t = schedule.sample_timesteps(batch, generator=generator, device=x0.device)
    p = denoiser.cfg.cfg_dropout if cfg_dropout is None else cfg_dropout
    gen_device = generator.device if generator is not None else "cpu"
    drop_mask = (torch.rand(batch, generator=generator, device=gen_device) < p).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x0)

    def model_fn(x: torch.Tensor, tt: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        return denoiser(x, tt, yy if condition is None else condition, factor, drop_mask=drop_mask)

    return schedule.loss(model_fn, x0, y, t, noise)
