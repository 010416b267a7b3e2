"""Time and memory of ``--method planes`` on a full-size volume (512x512x300 output at x4 by default).

    .venv/bin/python benchmarks/bench_planes.py [--checkpoint DIR | --preset small] [--shape 300 512 512] \
        [--factor 4] [--threads 2] [--precision bf16] [--orientations both] [--uncertainty]

Without ``--checkpoint`` the network of ``--preset`` gets random weights: the compute (and so the time and memory)
is that of a trained model of the same preset. The input is the synthetic chest phantom made directly at the thick
spacing (``shape[0] / factor`` slices), so no patient data is needed. Prints seconds per stage (cubic-dc, network,
consistency), the peak resident memory of the process and the network's multiply-adds per output voxel.

``--uncertainty`` instead times the pipeline a user runs (the weights of ``--checkpoint``, default the shipped ones,
with their calibration) without and with ``--uncertainty``: without, with, without again (the faster of the two
runs without is the baseline, so warm-up does not flatter the ratio); prints the seconds and their ratio, and the
seconds the map itself took inside the run with it (features and calibration; on a shared CPU, where run-to-run
times drift, (with - map) / with is the steadier figure of the cost).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from thinslice.checkpoints.bundle import load_planes
from thinslice.data.phantom import make_chest_phantom
from thinslice.infer.consistency import make_consistent
from thinslice.infer.planes import parse_orientations, refine_planes
from thinslice.infer.upsample import get_method, upsample
from thinslice.memory import process_peak_mb
from thinslice.models.factory import build_planes
from thinslice.models.kinds import network_kind
from thinslice.models.planes import PlanesNet, acquisition_vector


def macs_per_output_voxel(model: PlanesNet, k: int, orientations: int) -> float:
    """Multiply-adds of the network per thin output voxel: per thick pixel (3x3 convolutions, factor k's heads and
    the shared trunk) x orientations / k."""
    convs = [model.heads_in[str(k)], *[m for m in model.body.modules() if isinstance(m, nn.Conv2d)],
             model.body_tail, model.heads_out[str(k)]]
    per_thick_pixel = sum(c.weight.numel() for c in convs)
    return per_thick_pixel * orientations / k


def time_uncertainty(thick, thin_spacing: float, args: argparse.Namespace) -> None:
    """Seconds of ``upsample --method planes`` without and with ``--uncertainty`` on ``thick``, and the ratio."""
    from thinslice.infer.planes import Planes

    seconds: dict[bool, list[float]] = {False: [], True: []}
    report, map_s = "", 0.0
    for flag in (False, True, False):
        pipeline = Planes.from_pretrained(args.checkpoint, precision=args.precision, uncertainty=flag)
        start = time.perf_counter()
        result = pipeline(thick, thin_spacing)
        seconds[flag].append(time.perf_counter() - start)
        report = result.report.get("uncertainty", report)
        map_s = float(result.report.get("uncertainty_s", map_s))
    base, with_map = min(seconds[False]), seconds[True][0]
    print(f"planes {thick.num_slices} -> {round(thick.num_slices * args.factor)} slices of "
          f"{thick.slices_first().shape[1]}x{thick.slices_first().shape[2]}, {args.threads} threads: without "
          f"--uncertainty {' / '.join(f'{s:.1f}' for s in seconds[False])} s, with {with_map:.1f} s: ratio "
          f"{with_map / base:.2f}; the map inside that run {map_s:.1f} s, so with / (with - map) = "
          f"{with_map / max(with_map - map_s, 1e-9):.2f}; peak RSS {process_peak_mb() / 1024:.2f} GB; {report}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="model bundle folder (default: random weights)")
    parser.add_argument("--preset", default="small", help="preset for random weights (default: small)")
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("D", "H", "W"),
                        help="output (thin) shape, slices first")
    parser.add_argument("--factor", type=int, default=4, help="thick / thin spacing (default: 4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--orientations", default="both", help="coronal, sagittal or both (default)")
    parser.add_argument("--uncertainty", action="store_true",
                        help="time the pipeline without and with --uncertainty instead (shipped weights by default)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    thin_spacing = 1.25
    d, h, w = args.shape
    thick = make_chest_phantom((d // args.factor, h, w), (0.7, 0.7, thin_spacing * args.factor), seed=0)
    if args.uncertainty:
        time_uncertainty(thick, thin_spacing, args)
        return
    if args.checkpoint:  # the network a user gets for this factor: its own x<k> network where the bundle has one
        bundle = get_method("planes").bundle(args.checkpoint)
        own = args.factor in network_kind("planes").variants_in(bundle)
        model = load_planes(bundle, factor=args.factor if own else None)
    else:
        model = build_planes(args.preset)
    model.eval()
    orientations = parse_orientations(args.orientations)
    start = time.perf_counter()
    base = upsample(thick, thin_spacing, "cubic-dc")
    t_base = time.perf_counter()
    refined = refine_planes(model, thick.slices_first(), base.slices_first(),
                            acquisition_vector(1.0, "gaussian"), orientations, args.precision, progress=True)
    t_net = time.perf_counter()
    out, _ = make_consistent(base.with_slices(refined, thin_spacing, 0.0, thin_spacing), thick)
    t_dc = time.perf_counter()
    macs = macs_per_output_voxel(model, args.factor, len(orientations))
    which = f"x{args.factor} network" if model.factors == (args.factor,) else "all-factor network"
    print(f"planes ({which}) "
          f"{thick.num_slices} -> {out.num_slices} slices of {h}x{w}, x{args.factor}, {args.precision}, "
          f"{args.threads} threads, orientations {','.join(orientations)}")
    print(f"cubic-dc {t_base - start:.1f} s, network {t_net - t_base:.1f} s, consistency {t_dc - t_net:.1f} s, "
          f"total {t_dc - start:.1f} s, peak RSS {process_peak_mb() / 1024:.2f} GB, {macs / 1e3:.0f}k multiply-adds "
          "per output voxel")


if __name__ == "__main__":
    main()
