"""Where a planes run spends its time, stage by stage: read and decode, the cubic prior, its data consistency, the
network, the final data consistency, the uncertainty step, cast and write; on the 512x512x300 x4 budget input.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_planes.py [--input thick.nii.gz] [--repeat 2]

Without ``--input`` the input is the phantom of ``benchmarks/time_upsample.sh`` (75 slices of 4 mm, 512x512,
upsampled to 1 mm). Each stage is timed by wrapping the pipeline's named steps (``thinslice.infer.pipeline``), so
the table adds up to the run; prints a Markdown table (best of ``--repeat``) and the multiply-adds per output voxel
of the network that served the run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from thinslice import Upsampler, read_volume, write_volume
from thinslice.data.phantom import make_chest_phantom
from thinslice.infer import interpolate as interpolate_module
from thinslice.infer import pipeline as pipeline_module


def _timed(table: dict[str, float], name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            table[name] += time.perf_counter() - start
    return wrapper


def one_run(path: Path, spacing: float, out: Path) -> dict[str, float]:
    """Seconds per stage of one ``thinslice upsample``-equivalent run (weights loaded before, as a batch worker)."""
    table: dict[str, float] = defaultdict(float)
    up = Upsampler("planes", spacing=spacing)
    up.preload()
    pipeline = up.pipeline("planes")
    cubic, project = interpolate_module.interpolate_volume, pipeline_module.make_consistent
    refined = []  # the projection before the network is the prior's (cubic-dc), after it the final one

    def projection(*args, **kwargs):
        name = "data consistency (final)" if refined else "data consistency (prior)"
        return _timed(table, name, project)(*args, **kwargs)

    def network(*args, **kwargs):
        refined.append(True)
        return _timed(table, "network (refine)", refine)(*args, **kwargs)

    refine = pipeline.refine
    interpolate_module.interpolate_volume = _timed(table, "cubic prior", cubic)
    pipeline_module.make_consistent = projection
    pipeline.refine = network  # type: ignore[method-assign]  # an instance attribute, for the timing only
    start = time.perf_counter()
    try:
        thick = _timed(table, "read and decode (.nii.gz)", read_volume)(path)
        result = up(thick)
    finally:
        interpolate_module.interpolate_volume, pipeline_module.make_consistent = cubic, project
        del pipeline.refine
    _timed(table, "cast and write (.nii.gz)", write_volume)(result.volume, out)
    table["whole run"] = time.perf_counter() - start
    table["other (checks, grid, report)"] = table["whole run"] - sum(v for k, v in table.items() if k != "whole run")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=None)
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.input
        if path is None:
            path = Path(tmp) / "thick.nii.gz"
            write_volume(make_chest_phantom((75, 512, 512), (0.7, 0.7, 4.0), seed=0), path)
        runs = [one_run(path, args.spacing, Path(tmp) / "out.nii.gz") for _ in range(args.repeat)]
    best = min(runs, key=lambda r: r["whole run"])
    print(f"planes, {path.name} -> {args.spacing:g} mm, {torch.get_num_threads()} threads, best of {args.repeat}\n")
    print("| stage | seconds | share |\n|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.1f} | {seconds / best['whole run']:.0%} |")


if __name__ == "__main__":
    main()
