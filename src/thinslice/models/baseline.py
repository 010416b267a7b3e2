"""Small 3D residual CNN baseline (filled in by the baseline issue)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BaselineConfig:
    channels: int = 32
    num_blocks: int = 6
