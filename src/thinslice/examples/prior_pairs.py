"""Training pairs for the latent diffusion model that starts from the best estimate (``latent.prior`` planes or
cubic-dc): first-stage latents of (prior, truth) for every training volume and degradation, held in memory.

Why in memory, made once: the prior is a whole pipeline (cubic-dc, then the planes network), far dearer than a
diffusion step, and it must see whole volumes (its data-consistency projection and the planes network work on the
full slice stack), so it cannot run per training patch. With the lossless Haar first stage a latent holds as many
values as the image, so the pairs of the shared training volumes take about 1 GB as float16.

The sampler draws random latent crops through :class:`CropBatches`, which the latent-cache sampler of the diffusion
trainer (``LatentCropSampler``) shares.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from thinslice.degrade.pairs import simulate_pair
from thinslice.errors import ThinsliceError
from thinslice.examples.base import ExampleSampler
from thinslice.io.volume import Volume
from thinslice.models.intensity import hu_to_model
from thinslice.models.vae import AutoencoderKL3D
from thinslice.models.wavelet import HaarFirstStage

log = logging.getLogger(__name__)

# (thick volume, thin spacing in mm, slice profile) -> the prior on the thin grid
PriorFn = Callable[[Volume, float, str], Volume]
_SEED_HIGH = 2**62
FirstStage = AutoencoderKL3D | HaarFirstStage  # both encode, and both have total_stride and scaling_factor


@dataclass
class LatentPair:
    """First-stage latents (C, d, h, w), float16, of the prior and of the truth on the same grid."""

    prior: np.ndarray
    truth: np.ndarray
    factor: float
    name: str


@torch.no_grad()
def encode_whole(first_stage: FirstStage, hu: np.ndarray) -> np.ndarray:
    """The first-stage latent (float16) of a whole volume (slices first), cropped to a multiple of its stride.
    Used for the parameter-free Haar stage, which needs no tiling."""
    stride = first_stage.total_stride
    crop = tuple(slice(0, n - n % s) for n, s in zip(hu.shape, stride, strict=True))
    device = next(iter(first_stage.buffers()), torch.zeros(0)).device
    x = torch.as_tensor(hu_to_model(np.ascontiguousarray(hu[crop], dtype=np.float32)), device=device)[None, None]
    z, _ = first_stage.encode(x)
    return (z[0] * float(first_stage.scaling_factor)).half().cpu().numpy()


def make_pair(volume: Volume, name: str, degradation: tuple[float, str], prior_fn: PriorFn,
              first_stage: FirstStage) -> LatentPair:
    """One volume degraded by (factor, profile), its prior, and both latents."""
    factor, profile = degradation
    thick, target = simulate_pair(volume, factor=factor, profile=profile)
    prior = prior_fn(thick, target.slice_spacing, profile)
    n = min(prior.num_slices, target.num_slices)
    truth_hu, prior_hu = target.slices_first()[:n], prior.slices_first()[:n]
    return LatentPair(encode_whole(first_stage, prior_hu), encode_whole(first_stage, truth_hu),
                      thick.slice_spacing / target.slice_spacing, f"{name} x{factor:g} {profile}")


def build_pairs(volumes: Sequence[tuple[str, Volume]], degradations: Sequence[tuple[float, str]], prior_fn: PriorFn,
                first_stage: FirstStage, workers: int = 1) -> list[LatentPair]:
    """Every volume x degradation (``workers`` threads: the interpolation and projection release the GIL)."""
    jobs = [(name, vol, d) for name, vol in volumes for d in degradations]
    if not jobs:
        raise ThinsliceError("no training volumes or degradations to make prior pairs from")

    def run(job: tuple[str, Volume, tuple[float, str]]) -> LatentPair:
        name, vol, degradation = job
        pair = make_pair(vol, name, degradation, prior_fn, first_stage)
        log.info("prior pairs: %s", pair.name)
        return pair

    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        return list(pool.map(run, jobs))


def residual_scale(pairs: Sequence[LatentPair]) -> float:
    """1 / RMS of (truth - prior) latents over all pairs: the residual then has unit size for ResShift's noise."""
    total, count = 0.0, 0
    for p in pairs:
        d = p.truth.astype(np.float32) - p.prior.astype(np.float32)
        total += float(np.square(d, dtype=np.float64).sum())
        count += d.size
    rms = (total / max(count, 1)) ** 0.5
    if not np.isfinite(rms) or rms <= 0:
        raise ThinsliceError("the prior equals the truth on every training pair: there is no residual to learn")
    return 1.0 / rms


def fits(shape: Sequence[int], crop: Sequence[int]) -> bool:
    """Whether a (C, d, h, w) latent holds at least one crop of ``crop`` (d, h, w)."""
    return all(n >= c for n, c in zip(shape[1:], crop, strict=True))


class CropBatches(ExampleSampler):
    """Endless batches ``{"hr_latent", "lr_latent": (B, C, d, h, w), "factor": (B,), "seed": int}`` of random latent
    crops of pairs whose (C, d, h, w) ``shapes`` are given; each pair is drawn with probability proportional to its
    number of crop positions, from the sampler's one checkpointed generator (exact resume). Subclasses say how a
    crop is read (:meth:`read`): from memory (:class:`PriorPairSampler`) or from a latent cache's files
    (the diffusion trainer's ``LatentCropSampler``)."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], crop: tuple[int, int, int], batch_size: int,
                 seed: int = 0) -> None:
        super().__init__(seed)
        self.crop = tuple(int(c) for c in crop)
        self.shapes = [tuple(s) for s in shapes]
        counts = np.array([np.prod([n - c + 1 for n, c in zip(s[1:], self.crop, strict=True)]) for s in self.shapes],
                          dtype=np.float64)
        self.weights = counts / counts.sum()
        self.batch_size = int(batch_size)

    def read(self, index: int, window: tuple[slice, ...]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(truth crop, prior crop, factor) of pair ``index``."""
        raise NotImplementedError

    def next_batch(self) -> dict[str, Any]:
        hrs, lrs, factors = [], [], []
        for _ in range(self.batch_size):
            index = int(self.rng.choice(len(self.shapes), p=self.weights))
            corner = [int(self.rng.integers(0, n - c + 1)) for n, c in zip(self.shapes[index][1:], self.crop,
                                                                            strict=True)]
            window = (slice(None), *(slice(a, a + c) for a, c in zip(corner, self.crop, strict=True)))
            hr, lr, factor = self.read(index, window)
            hrs.append(hr)
            lrs.append(lr)
            factors.append(factor)
        return {"hr_latent": torch.stack(hrs).float(), "lr_latent": torch.stack(lrs).float(),
                "factor": torch.tensor(factors, dtype=torch.float32), "seed": int(self.rng.integers(_SEED_HIGH))}


class PriorPairSampler(CropBatches):
    """:class:`CropBatches` of in-memory prior pairs (lr = the prior's latent)."""

    def __init__(self, pairs: Sequence[LatentPair], crop: tuple[int, int, int], batch_size: int,
                 seed: int = 0) -> None:
        self.pairs = [p for p in pairs if fits(p.prior.shape, crop)]
        if not self.pairs:
            raise ThinsliceError(f"no training volume is at least {tuple(crop)} latent voxels; use larger volumes or "
                                 "a smaller train_diffusion.patch_size")
        super().__init__([p.prior.shape for p in self.pairs], crop, batch_size, seed)

    def read(self, index: int, window: tuple[slice, ...]) -> tuple[torch.Tensor, torch.Tensor, float]:
        pair = self.pairs[index]
        return (torch.from_numpy(pair.truth[window].astype(np.float32)),
                torch.from_numpy(pair.prior[window].astype(np.float32)), pair.factor)
