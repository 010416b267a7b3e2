"""ResShift: diffusion by residual shifting (Yue et al., NeurIPS 2023), written for latents.

The forward process moves the high-resolution latent ``x0`` towards the low-resolution latent ``y`` while adding
noise::

    q(x_t | x0, y) = N(x0 + eta_t (y - x0), kappa^2 eta_t I),       x_T ~ N(y, kappa^2 eta_T I)

so sampling starts *from the LR latent plus noise* and needs only a few steps (15 by default, 4 with the fast
schedule). Written here rather than taken from a library: neither MONAI nor diffusers implements ResShift. The
schedule reproduces ``get_named_eta_schedule('exponential')`` of the official code (github.com/zsyOAOA/ResShift).

Timestep convention: ``t`` is a 0-based integer in ``[0, T-1]``; index ``t`` holds the paper's ``eta_{t+1}``
(``etas[0] = eta_1``, ``etas[T-1] = eta_T``) and the network is given this 0-based ``t``, as in the official code.
The paper's ``eta_0 = 0`` is ``etas_prev[0]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from thinslice.errors import ThinsliceError
from thinslice.presets import METHODS, PREDICTIONS, ResShiftConfig  # noqa: F401 (the schedule settings live with the presets)


def exponential_sqrt_etas(
    num_steps: int, min_noise: float, eta_max_sqrt: float, kappa: float, power: float
) -> np.ndarray:
    """sqrt(eta_t), t = 1..T, exactly as ``get_named_eta_schedule('exponential')`` of the official code."""
    etas_start = min(min_noise / kappa, min_noise)
    increaser = math.exp(1 / (num_steps - 1) * math.log(eta_max_sqrt / etas_start))
    base = np.ones([num_steps]) * increaser
    power_timestep = np.linspace(0, 1, num_steps, endpoint=True) ** power
    power_timestep *= num_steps - 1
    return np.power(base, power_timestep) * etas_start


def _per_sample(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, ...) for broadcasting against a (B, C, ...) tensor."""
    out = values.to(t.device)[t]
    return out.reshape(-1, *([1] * (ndim - 1)))


class ResShiftSchedule:
    """Forward process, training target, posterior and step API of ResShift (see module docstring); satisfies
    :class:`thinslice.diffusion.sampling.Schedule`, whose functions run the loss and the sampling loop."""

    def __init__(self, cfg: ResShiftConfig | None = None) -> None:
        self.cfg = cfg or ResShiftConfig()
        c = self.cfg
        sqrt_etas = exponential_sqrt_etas(c.num_steps, c.min_noise, c.eta_max_sqrt, c.kappa, c.power)
        etas = sqrt_etas**2
        etas_prev = np.append(0.0, etas[:-1])
        alpha = etas - etas_prev
        self.num_steps = c.num_steps
        self.kappa = c.kappa
        # float64 for the maths; cast to the data's dtype where used.
        self.sqrt_etas = torch.from_numpy(sqrt_etas)
        self.etas = torch.from_numpy(etas)
        self.etas_prev = torch.from_numpy(etas_prev)
        self.alpha = torch.from_numpy(alpha)
        # Posterior q(x_{t-1} | x_t, x0) (paper eq. 7); variance 0 at the first step (t index 0).
        self.posterior_variance = torch.from_numpy(c.kappa**2 * etas_prev / etas * alpha)
        self.posterior_mean_coef1 = torch.from_numpy(etas_prev / etas)
        self.posterior_mean_coef2 = torch.from_numpy(alpha / etas)

    def _coef(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _per_sample(values, t, like.ndim).to(like.dtype)

    # ---- forward process -------------------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = x0 + eta_t (y - x0) + kappa sqrt(eta_t) noise."""
        eta = self._coef(self.etas, t, x0)
        sqrt_eta = self._coef(self.sqrt_etas, t, x0)
        return x0 + eta * (y - x0) + self.kappa * sqrt_eta * noise

    def init_latent(self, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Where sampling starts: x_T = y + kappa sqrt(eta_T) noise (the LR latent, shifted)."""
        return y + self.kappa * float(self.sqrt_etas[-1]) * noise

    def scale_model_input(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Network input x_t / sqrt(kappa^2 eta_t + 1) (official ``scale_input``), keeping its variance near 1."""
        std = torch.sqrt(self._coef(self.etas, t, x_t) * self.kappa**2 + 1)
        return x_t / std

    # ---- prediction types ------------------------------------------------------------------------------------
    def training_target(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network regresses for ``cfg.prediction`` (``t`` unused: the targets do not depend on it)."""
        if self.cfg.prediction == "x0":
            return x0
        if self.cfg.prediction == "residual":
            return y - x0
        return noise

    def x0_from_output(
        self, output: torch.Tensor, x_t: torch.Tensor, y: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The network's estimate of x0, whatever it predicts."""
        if self.cfg.prediction == "x0":
            return output
        if self.cfg.prediction == "residual":
            return y - output
        eta = self._coef(self.etas, t, x_t)
        sqrt_eta = self._coef(self.sqrt_etas, t, x_t)
        return (x_t - eta * y - self.kappa * sqrt_eta * output) / (1 - eta)

    # ---- training --------------------------------------------------------------------------------------------
    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniform t in [0, T-1] (official training)."""
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.randint(0, self.num_steps, (batch,), generator=generator, device=gen_device)
        return t.to(device) if device is not None else t

    # ---- reverse process -------------------------------------------------------------------------------------
    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x0) = N((eta_{t-1}/eta_t) x_t + (alpha_t/eta_t) x0, kappa^2 eta_{t-1}/eta_t alpha_t I)."""
        mean = self._coef(self.posterior_mean_coef1, t, x_t) * x_t + self._coef(self.posterior_mean_coef2, t, x_t) * x0
        variance = self._coef(self.posterior_variance, t, x_t)
        return mean, variance

    # ---- step API (the MONAI/diffusers scheduler shape; the loop is thinslice.diffusion.sampling.reverse_process) --
    def set_timesteps(self, steps: int | None = None) -> list[int]:
        """The reverse timesteps T-1 .. 0; a ResShift model samples with exactly the T steps it was trained with."""
        if steps is not None and int(steps) != self.num_steps:
            raise ThinsliceError(f"this ResShift model was trained with {self.num_steps} steps; it cannot sample with "
                             f"{steps} (leave --steps out)")
        self.timesteps = list(range(self.num_steps - 1, -1, -1))
        return self.timesteps

    def step_needs_noise(self, step: int) -> bool:
        """Whether :meth:`step` at ``step`` adds noise (all but the last step)."""
        return step > 0

    def step(self, output: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor, y: torch.Tensor,
             noise: torch.Tensor | None) -> torch.Tensor:
        """x_{t-1} from the network output: the posterior mean with x0 replaced by the network's estimate, plus
        ``noise`` times its standard deviation (none at the last step)."""
        x0_pred = self.x0_from_output(output, x_t, y, t)
        mean, variance = self.q_posterior_mean_variance(x0_pred, x_t, t)
        return mean + torch.sqrt(variance) * noise if noise is not None else mean
