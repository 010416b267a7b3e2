"""The sampling contract: what a schedule offers (:class:`Schedule`), the one reverse process, the one training loss,
and the seeding that makes both reproducible.

A schedule knows no network: the denoiser comes in as a callable (:data:`ModelFn`), bound to its conditioning by the
caller (:mod:`thinslice.infer.ldm` at inference, the trainer's loss). ResShift and DDIM both satisfy
:class:`Schedule`, so the loop and the loss below are written once for both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from thinslice.diffusion.ddim import DDIMSchedule
from thinslice.diffusion.resshift import METHODS, ResShiftConfig, ResShiftSchedule
from thinslice.errors import ThinsliceError

# model_fn(x_t_scaled, t, y) -> network output (x0, residual y - x0, noise, epsilon or v: the schedule's prediction).
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# model_fn(x_t_scaled, t, y, drop_mask): the training call, told which examples lose their condition (CFG dropout).
DroppingModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class Schedule(Protocol):
    """Forward process (training) and step API (sampling) of a diffusion schedule; ``y`` is the LR latent, which a
    schedule may ignore (DDIM: it enters only through the network's conditioning)."""

    cfg: ResShiftConfig

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor: ...

    def q_sample(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    def training_target(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> torch.Tensor: ...

    def set_timesteps(self, steps: int | None = None) -> list[int]: ...

    def init_latent(self, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    def scale_model_input(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def step_needs_noise(self, step: int) -> bool: ...

    def step(self, output: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor, y: torch.Tensor,
             noise: torch.Tensor | None) -> torch.Tensor: ...


def make_schedule(cfg: ResShiftConfig, method: str | None = None) -> Schedule:
    """The schedule a network with settings ``cfg`` was trained with; asking for another method is an error (the
    network would not work with it)."""
    method = method or cfg.method
    if method not in METHODS:
        raise ThinsliceError(f"unknown sampler '{method}': use one of {', '.join(METHODS)}")
    if method != cfg.method:
        raise ThinsliceError(
            f"this model was trained for the '{cfg.method}' sampler and cannot be sampled with '{method}': "
            f"use --sampler {cfg.method}"
        )
    return ResShiftSchedule(cfg) if method == "resshift" else DDIMSchedule(cfg)


# ------------------------------------------------------------------------------------------------ seeding
def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator: the reverse process draws noise on it and moves it, so a seed gives the same result on
    every device."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def window_seed(seed: int, start: tuple[int, ...]) -> int:
    """A seed for one latent window, fixed by the run's seed and the window's position (order-independent)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(int(s) for s in start)]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------ sampling
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


# ------------------------------------------------------------------------------------------------ training
def denoising_mse(schedule: Schedule, model_fn: ModelFn, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
    """MSE between the network output on x_t and the schedule's target, for given timesteps and noise (official
    ResShift trains MSE on x0; DDIM on epsilon or v): the arithmetic of :func:`diffusion_loss`."""
    output = model_fn(schedule.scale_model_input(schedule.q_sample(x0, y, t, noise), t), t, y)
    target = schedule.training_target(x0, y, t, noise)
    return ((output.float() - target.float()) ** 2).flatten(1).mean(dim=1).mean()


def diffusion_loss(schedule: Schedule, model_fn: DroppingModelFn, x0: torch.Tensor, y: torch.Tensor, *,
                   cfg_dropout: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One training loss with classifier-free-guidance dropout: timesteps, the drop mask and the noise are drawn
    from ``generator`` in that order (noise on the generator's device, then moved to x0's), so a seeded batch gives
    the same loss anywhere and resume is exact. Only the network's condition is dropped (``model_fn`` gets the
    mask): the *original* ``y`` still drives the ResShift forward process."""
    batch = x0.shape[0]
    t = schedule.sample_timesteps(batch, generator=generator, device=x0.device)
    gen_device = generator.device if generator is not None else "cpu"
    drop_mask = (torch.rand(batch, generator=generator, device=gen_device) < cfg_dropout).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x0)
    return denoising_mse(schedule, lambda x, tt, yy: model_fn(x, tt, yy, drop_mask), x0, y, t, noise)
