"""Alternative to ResShift: a standard DDPM noise schedule (1000 steps), LR latent concatenated, DDIM sampling.

A thin wrapper around MONAI's ``DDPMScheduler`` (training noise) and ``DDIMScheduler`` (sampling) satisfying the
same :class:`thinslice.diffusion.sampling.Schedule` protocol as :class:`thinslice.diffusion.resshift.ResShiftSchedule`,
so that training and inference can switch with ``diffusion.method`` / ``--sampler``. Unlike ResShift, sampling starts
from pure noise (y only enters through the network's conditioning) and the network input is x_t itself (unit
variance already).
Timesteps are MONAI's: integers in [0, ddim_train_steps - 1].
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from thinslice.diffusion.resshift import ResShiftConfig

DDIM_PREDICTIONS = ("epsilon", "v_prediction")


class DDIMSchedule:
    """DDPM training objective + DDIM sampler for a network ``model_fn(x_t, t, y)``."""

    def __init__(self, cfg: ResShiftConfig | None = None) -> None:
        self.cfg = cfg or ResShiftConfig(method="ddim")
        if self.cfg.ddim_prediction not in DDIM_PREDICTIONS:
            raise ValueError(f"diffusion.ddim_prediction must be one of {DDIM_PREDICTIONS}")
        self.num_train_steps = self.cfg.ddim_train_steps
        self.train_scheduler = DDPMScheduler(
            num_train_timesteps=self.num_train_steps,
            schedule=self.cfg.ddim_schedule,
            prediction_type=self.cfg.ddim_prediction,
            clip_sample=False,  # latents are not confined to [-1, 1]
        )

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.randint(0, self.num_train_steps, (batch,), generator=generator, device=gen_device)
        return t.to(device) if device is not None else t

    def q_sample(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t of the DDPM forward process (``y`` unused: DDIM does not shift towards the LR latent)."""
        return self.train_scheduler.add_noise(x0, noise, t)

    def training_target(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Epsilon or v, as the network is trained to predict (``y`` unused)."""
        if self.cfg.ddim_prediction == "epsilon":
            return noise
        return self.train_scheduler.get_velocity(x0, noise, t)

    # ---- step API (the loop is thinslice.diffusion.sampling.reverse_process) ---------------------------------------
    def set_timesteps(self, steps: int | None = None) -> list[int]:
        """DDIM timesteps for ``steps`` (default cfg.ddim_sample_steps), any number up to the training steps."""
        self.sampler = DDIMScheduler(num_train_timesteps=self.num_train_steps, schedule=self.cfg.ddim_schedule,
                                     prediction_type=self.cfg.ddim_prediction, clip_sample=False)
        self.sampler.set_timesteps(steps or self.cfg.ddim_sample_steps)
        self.timesteps = [int(t) for t in self.sampler.timesteps.tolist()]
        return self.timesteps

    def init_latent(self, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Where sampling starts: pure noise (y enters only through the network's conditioning)."""
        return noise

    def scale_model_input(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t

    def step_needs_noise(self, step: int) -> bool:
        return False  # deterministic DDIM (eta = 0)

    def step(self, output: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor, y: torch.Tensor,
             noise: torch.Tensor | None) -> torch.Tensor:
        x, _ = self.sampler.step(output.float(), int(t[0]), x_t.float(), eta=0.0)
        return x.to(y.dtype)
