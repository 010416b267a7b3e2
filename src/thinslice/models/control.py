"""IRControlNet: trainable copy of the UNet encoder fed with the LR latent (filled in by the diffusion issue)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ControlConfig:
    enabled: bool = True
    scale: float = 1.0
