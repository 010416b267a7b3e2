"""ResShift schedule and sampler (filled in by the diffusion issue)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ResShiftConfig:
    """Paper defaults (Yue et al., ResShift): T = 15, kappa = 2, p = 0.3, min_noise = 0.04."""

    num_steps: int = 15
    kappa: float = 2.0
    power: float = 0.3
    min_noise: float = 0.04
    eta_max_sqrt: float = 0.99
    prediction: str = "x0"  # "x0" | "residual" | "noise"
    cfg_dropout: float = 0.1
