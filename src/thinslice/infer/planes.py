"""``--method planes``: cubic-dc refined by a 2D network on through-plane planes, computed on the thick grid.

Pipeline: cubic-dc (cubic B-spline + data consistency) -> :class:`~thinslice.models.planes.PlanesNet` on every
coronal and every sagittal plane (thick rows x pixels, k thin rows emitted per thick row), the two orientations
averaged -> data consistency again, so the network can only add what the thick slices do not determine.

The same code serves training (:mod:`thinslice.examples.planes` builds its inputs with
:func:`~thinslice.degrade.operators.cell_operators`, which is cubic-dc written as one matrix, and
:mod:`thinslice.train.planes` validates through :meth:`Planes.from_model`), so validation scores are what users get.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from thinslice.checkpoints.bundle import load_planes
from thinslice.checkpoints.files import read_metadata, weights_label
from thinslice.device import autocast, autocast_dtype, resolve_device
from thinslice.errors import ThinsliceError
from thinslice.infer.pipeline import Acquisition, LearnedOptions, Pipeline, Result
from thinslice.infer.planes_adapt import adapt_plan, adapt_planes
from thinslice.infer.registry import CubicDC, register_pipeline
from thinslice.io.volume import Volume
from thinslice.models.intensity import HU_RANGE, hu_to_model
from thinslice.models.kinds import network_kind
from thinslice.models.planes import PlanesNet, acquisition_vector
from thinslice.models.windows import halo_tiles

log = logging.getLogger(__name__)

ORIENTATIONS = ("coronal", "sagittal")
# The planes row of the kinds table: names of the all-factor file and the per-factor planes-x<k> files.
PLANES = network_kind("planes")
# Planes per network call: small batches stay in cache (48 channels x 75 rows x 512 px x 2 bytes = 3.7 MB per plane
# and layer); 8 measured fastest on the 2-core CPU (docs/design/planes.md).
PLANES_PER_BATCH = 8


def integer_factor(thick_spacing_mm: float, thin_spacing_mm: float) -> int:
    """k = thick spacing / thin spacing, which must be a whole number for a thick cell to hold k thin rows."""
    ratio = float(thick_spacing_mm) / float(thin_spacing_mm)
    k = int(round(ratio))
    if k < 1 or abs(ratio - k) > 1e-3 * ratio:
        raise ThinsliceError(
            f"method planes needs an output spacing that divides the slice spacing {thick_spacing_mm:.4g} mm "
            f"(ratio {ratio:.4g}); use --spacing {thick_spacing_mm / max(1, math.ceil(ratio)):.4g} (the nearest "
            "finer one) or --method cubic-dc"
        )
    return k


# A plane where no more than AIR_FRACTION of the thick slices' and the estimate's pixels reach AIR_HU holds only air
# (and its noise: a few pixels of a noisy scan's air reach higher): ``skip_air`` leaves it to the estimate instead of
# running the network on it. Lung (-900 to -500 HU) never fills a plane alone: the chest wall bounds it.
AIR_HU = -800.0
AIR_FRACTION = 5e-4


def _planes_to_run(thick_v: np.ndarray, base_v: np.ndarray, skip_air: bool) -> np.ndarray:
    """Indices of the planes (first axis) the network runs on: all, or (``skip_air``) those that hold more than
    air in the thick slices or the estimate."""
    if not skip_air:
        return np.arange(thick_v.shape[0])
    def dense(view: np.ndarray) -> np.ndarray:
        return np.count_nonzero(view >= AIR_HU, axis=(1, 2)) > AIR_FRACTION * view[0].size

    return np.flatnonzero(dense(thick_v) | dense(base_v))


def _orientation_views(volume: np.ndarray, orientation: str) -> np.ndarray:
    """(D, A, B) slices-first -> planes first: coronal (A, D, B), sagittal (B, D, A)."""
    if orientation == "coronal":
        return volume.transpose(1, 0, 2)
    if orientation == "sagittal":
        return volume.transpose(2, 0, 1)
    raise ThinsliceError(f"unknown orientation '{orientation}': use {', '.join(ORIENTATIONS)} or both")


@torch.no_grad()
def refine_planes(
    model: PlanesNet,
    thick_hu: np.ndarray,
    base_hu: np.ndarray,
    cond: Sequence[float],
    orientations: Sequence[str] = ORIENTATIONS,
    precision: str = "bf16",
    progress: bool = False,
    first: np.ndarray | None = None,
    skip_air: bool = False,
) -> np.ndarray:
    """cubic-dc plus the network's residual (HU, shape of ``base_hu`` (M*k, A, B)) from thick slices (M, A, B).

    Every plane of each orientation goes through the network; the orientations are averaged. ``first`` (an array
    of that shape) receives the first orientation's estimate alone: its distance from the average is the passes'
    disagreement, the raw uncertainty map of ``--uncertainty``, at the cost of one copy.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    # channels-last convolutions: 2.5-3x faster under bf16 on the CPU (oneDNN), also faster on GPUs.
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit memory_format
    amp = autocast_dtype(precision)
    cond_t = torch.tensor([list(cond)], dtype=torch.float32, device=device)
    total = np.zeros(base_hu.shape, np.float32)
    work = {o: _planes_to_run(_orientation_views(thick_hu, o), _orientation_views(base_hu, o), skip_air)
            for o in orientations}
    steps = sum(math.ceil(len(planes) / PLANES_PER_BATCH) for planes in work.values())
    bar = tqdm(total=steps, desc="planes", unit="batch", disable=not progress, leave=False)
    context = model.cfg.context
    for orientation in orientations:
        thick_v = _orientation_views(thick_hu, orientation)
        base_v = _orientation_views(base_hu, orientation)
        out_v = _orientation_views(total, orientation)
        planes = work[orientation]
        air = np.setdiff1d(np.arange(thick_v.shape[0]), planes)
        out_v[air] += base_v[air]  # planes of air keep the estimate
        for p0 in range(0, len(planes), PLANES_PER_BATCH):
            chosen = planes[p0:p0 + PLANES_PER_BATCH]
            # Each plane with its context neighbours (clamped at the edge): (planes, 1 + 2 context, rows, pixels).
            index = np.clip(chosen[:, None] + np.arange(-context, context + 1)[None, :], 0, thick_v.shape[0] - 1)
            t = torch.from_numpy(np.ascontiguousarray(hu_to_model(thick_v[index]))).to(device)
            b = torch.from_numpy(np.ascontiguousarray(hu_to_model(base_v[index]))).to(device)
            with autocast(device, amp):
                y = model(t, b, cond_t.expand(t.shape[0], -1))
                middle = b[:, context: context + 1]
                residual = (y - middle).float()[:, 0].cpu().numpy() * (HU_RANGE / 2)
            # The residual goes onto the unclipped estimate: the network sees HU clipped to the model range, but
            # values outside it (air below -1024 after cubic overshoot, metal) keep what cubic-dc gave them.
            out_v[chosen] += base_v[chosen] + residual
            bar.update(1)
        if first is not None and orientation == orientations[0]:
            np.copyto(first, total)
    bar.close()
    total /= len(orientations)
    return total


# 3D networks run on in-plane tiles of the whole thick stack (:func:`thinslice.models.windows.halo_tiles`); the halo
# covers the receptive field (two 3-wide convolutions per block plus head, body tail and output: 2 * num_blocks + 3
# pixels), so tiles join exactly.
BLOCK_TILE = 160


@torch.no_grad()
def refine_blocks(model: PlanesNet, thick_hu: np.ndarray, base_hu: np.ndarray, cond: Sequence[float],
                  precision: str = "bf16", progress: bool = False) -> np.ndarray:
    """:func:`refine_planes` for a 3D (``dims`` 3) network: one pass over in-plane tiles of the whole stack."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch's stubs omit memory_format
    amp = autocast_dtype(precision)
    cond_t = torch.tensor([list(cond)], dtype=torch.float32, device=device)
    out = np.empty(base_hu.shape, np.float32)
    tiles = halo_tiles(base_hu.shape[1:], BLOCK_TILE, 2 * model.cfg.num_blocks + 3)
    for tile in tqdm(tiles, desc="planes", unit="tile", disable=not progress, leave=False):
        window, inner, target = ((slice(None), *part) for part in (tile.read, tile.core, tile.write))
        t = torch.from_numpy(hu_to_model(thick_hu[window]))[None, None].to(device)
        b = torch.from_numpy(hu_to_model(base_hu[window]))[None, None].to(device)
        with autocast(device, amp):
            y = model(t, b, cond_t)
            residual = (y - b).float()[0, 0].cpu().numpy() * (HU_RANGE / 2)
        # As in refine_planes: the residual goes onto the unclipped estimate.
        out[target] = base_hu[target] + residual[inner]
    return out


def parse_orientations(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """"both" (or None) -> coronal and sagittal; "coronal", "sagittal" or a comma list -> those."""
    if value is None or value == "both":
        return ORIENTATIONS
    items = tuple(value.split(",")) if isinstance(value, str) else tuple(value)
    for item in items:
        _orientation_views(np.zeros((1, 1, 1)), item)
    return items


@dataclass(frozen=True)
class PlanesOptions(LearnedOptions):
    precision: str = "bf16"  # bf16 = fp32 on the benchmark (41.32 dB both) and 1.8x faster
    orientations: str = "both"  # coronal, sagittal or both (averaged)
    consistency: bool = True  # final data-consistency projection
    adapt: bool = False  # fine-tune on the input's own axial slices first
    adapt_steps: int = 1500
    adapt_seconds: float = 180.0
    uncertainty: bool = False  # also a calibrated std map from the coronal/sagittal disagreement (extras["std"])
    skip_air: bool = False  # planes that hold only air keep the estimate (no network run on them)

    def __post_init__(self) -> None:
        if not (isinstance(self.adapt_steps, int) and self.adapt_steps >= 1):
            raise ThinsliceError(f"--adapt-steps must be at least 1, got {self.adapt_steps}")
        if not (isinstance(self.adapt_seconds, (int, float)) and self.adapt_seconds > 0):
            raise ThinsliceError(f"--option adapt_seconds must be a positive number, got {self.adapt_seconds}")


@register_pipeline
class Planes(Pipeline):
    """cubic-dc -> the planes network on every coronal and sagittal plane (or thick-grid blocks) -> consistency."""

    name = "planes"
    description = ("cubic-dc refined by a 2D network on coronal and sagittal planes, computed on the thick grid "
                   "(k thin rows per thick row), then data consistency; shipped weights or --checkpoint DIR")
    Options = PlanesOptions
    weights = ("planes",)
    preference = 3
    steps = ("prior", "refine", "consistency", "spread")
    model: PlanesNet

    def __init__(self, options: PlanesOptions | None = None) -> None:
        super().__init__(options)
        # Networks trained for one factor alone (planes-x<k>.safetensors beside the all-factor one): used for that
        # factor, as one network per factor measures better than one for all (docs/design/planes.md).
        self.specialists: dict[int, PlanesNet] = {}

    def load(self) -> None:
        o = self.options
        bundle, device = self.bundle(), resolve_device(o.device)
        self.model = load_planes(bundle, device, preset=o.preset)
        self.specialists = {k: load_planes(bundle, device, factor=k) for k in PLANES.variants_in(bundle)}
        for k, net in self.specialists.items():
            if k not in net.factors:
                raise ThinsliceError(f"{bundle / PLANES.file_name(k)} serves factors "
                                     f"{', '.join(map(str, net.factors))}, not {k}: rename it after the factor it "
                                     "was trained for")

    def network_for(self, k: int) -> PlanesNet:
        """The network that serves factor ``k``: its specialist when the bundle has one, else the all-factor one."""
        return self.specialists.get(k, self.model)

    @classmethod
    def applicable(cls, thick: Volume, spacing_mm: float, checkpoint: str | None = None) -> str | None:
        """Why planes cannot serve ``thick`` -> ``spacing_mm`` with these weights (None: it can); reads only the
        weights' record, not the network."""
        try:
            k = integer_factor(thick.slice_spacing, spacing_mm)
            bundle = cls.locate_weights(checkpoint)
            meta = read_metadata(bundle / PLANES.file)
        except ThinsliceError as err:
            return str(err)
        factors = json.loads(meta.get("preset_config", "{}")).get("planes", {}).get("factors", [])
        factors = sorted({*factors, *PLANES.variants_in(bundle)})
        if k > 1 and k not in factors:
            return f"its weights serve factors {', '.join(map(str, factors))}, not {k}"
        return None

    def prior(self, thick: Volume, spacing_mm: float, acquisition: Acquisition) -> Volume:
        return CubicDC()(thick, spacing_mm, acquisition).volume

    def refine(self, thick: Volume, prior: Volume, acquisition: Acquisition) -> Result:
        o, start = self.options, time.perf_counter()
        k = integer_factor(thick.slice_spacing, prior.slice_spacing)
        if k == 1:
            return Result(prior)
        network = self.network_for(k)
        if k not in network.factors:
            raise ThinsliceError(f"the planes network was trained for factors "
                                 f"{', '.join(map(str, network.factors))}, not {k}; use --method cubic-dc or "
                                 "train it for that factor")
        model = self._adapted(network, thick, k, acquisition) if o.adapt else network
        cond = acquisition_vector(acquisition.ratio_to(thick.slice_spacing), acquisition.profile)
        first = self._first_pass_buffer(model, prior.slices_first().shape)
        if model.cfg.dims == 3:
            refined = refine_blocks(model, thick.slices_first(), prior.slices_first(), cond, o.precision, o.progress)
        else:
            refined = refine_planes(model, thick.slices_first(), prior.slices_first(), cond,
                                    parse_orientations(o.orientations), o.precision, o.progress, first, o.skip_air)
        out = prior.with_slices(refined, prior.slice_spacing, 0.0, prior.slice_thickness)
        extras = {}
        if first is not None:  # |first pass - average| = |coronal - sagittal| / 2, calibrated by the spread step
            spread = np.abs(np.subtract(first, refined, out=first), out=first)
            extras["spread"] = prior.with_slices(spread, prior.slice_spacing, 0.0, prior.slice_thickness)
        return Result(out, extras=extras, report={"planes": f"weights {weights_label(network)}"
                                             f"{' (x' + str(k) + ' network)' if network is not self.model else ''}, "
                                             f"{time.perf_counter() - start:.1f} s"})

    def _first_pass_buffer(self, model: PlanesNet, shape: tuple[int, ...]) -> np.ndarray | None:
        """Where refine_planes keeps the first pass for ``--uncertainty`` (None without it); refuses setups that
        have no second pass to disagree with."""
        if not self.options.uncertainty:
            return None
        if model.cfg.dims == 3 or len(parse_orientations(self.options.orientations)) != 2:
            raise ThinsliceError("planes --uncertainty compares the coronal and sagittal passes: use a 2D network "
                                 "with --option orientations=both")
        return np.empty(shape, np.float32)

    def spread(self, result: Result, thick: Volume, acquisition: Acquisition) -> Result:
        """The calibrated std map from the disagreement of the passes and the final volume (calibration.json beside
        the weights); the raw spread stays in ``extras`` for ldm, which starts from planes and builds on it."""
        from thinslice.infer.uncertainty import attach_std

        k, start = integer_factor(thick.slice_spacing, result.volume.slice_spacing), time.perf_counter()
        attach_std(result, self.bundle(), "planes", k, self.network_hashes(k))
        result.report["uncertainty_s"] = f"{time.perf_counter() - start:.1f}"
        return result

    def network_hashes(self, k: int) -> dict[str, str]:
        """Content hash of the network that serves factor ``k`` (marked when ``--adapt`` changes it): what a
        calibration of the std map is valid for."""
        network = self.network_for(k)
        name = PLANES.file_name(k if network is not self.model else None)
        return {name: weights_label(network) + ("+adapted" if self.options.adapt else "")}

    def _adapted(self, network: PlanesNet, thick: Volume, k: int, acquisition: Acquisition) -> PlanesNet:
        o = self.options
        plan = adapt_plan(o.adapt_steps, o.adapt_seconds, o.precision, o.progress)
        return adapt_planes(network, thick, k, (acquisition.profile, acquisition.ratio_to(thick.slice_spacing)),
                            plan, o.seed)
