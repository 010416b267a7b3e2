"""Where a planes run spends its time, stage by stage: read and decode, the cubic prior, its data consistency, the
network, the final data consistency, the uncertainty step, cast and write; on the 512x512x300 x4 budget input.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_planes.py [--input thick.nii.gz] [--repeat 2]

Without ``--input`` the input is the phantom of ``benchmarks/time_upsample.sh`` (75 slices of 4 mm, 512x512,
upsampled to 1 mm). Each stage is timed by wrapping the pipeline's named steps (``thinslice.infer.pipeline``), so
the table adds up to the run; prints a Markdown table (best of ``--repeat``), then the network's multiply-adds per
output voxel (``torch.utils.flop_counter`` on an in-plane crop of the same input: the cost per voxel does not depend
on the in-plane size), its achieved rate against this machine's own bf16 matmul peak, the CPU, and the convolution
kernels oneDNN chose (its verbose log).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from thinslice import Upsampler, read_volume, write_volume
from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade.grid import thin_grid
from thinslice.infer import interpolate as interpolate_module
from thinslice.infer import pipeline as pipeline_module
from thinslice.io.volume import Volume


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


def macs_per_output_voxel(thick: Volume, spacing: float) -> float:
    """Multiply-adds of the planes network per output voxel, counted on a 64x64 in-plane crop of the input."""
    from torch.utils.flop_counter import FlopCounterMode

    crop = thick.slices_first()[:, :64, :64]
    small = thick.with_slices(crop, thick.slice_spacing, 0.0, thick.slice_thickness)
    up = Upsampler("planes", spacing=spacing, precision="fp32")  # counted in fp32: the same operations as bf16
    up.preload()
    with FlopCounterMode(display=False) as counter:
        result = up(small)
    return counter.get_total_flops() / 2 / result.volume.array.size


def bf16_matmul_peak(n: int = 4096, repeat: int = 5) -> float:
    """GMAC/s of a large bf16 matmul on this machine's threads: the peak the network's rate is compared with."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b  # warm-up: oneDNN's kernel choice and the threads' start
    best = min(_seconds(lambda: a @ b) for _ in range(repeat))
    return n ** 3 / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_name() -> str:
    """The CPU model and the bf16 instruction families it offers (AVX-512 BF16, AMX)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.+)", text)
    flags = set(re.search(r"flags\s*:\s*(.+)", text).group(1).split()) if "flags" in text else set()
    families = [name for flag, name in (("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX-BF16")) if flag in flags]
    return f"{model.group(1) if model else platform.processor()}; bf16: {', '.join(families) or 'none'}"


def conv_kernels(thick: Volume, spacing: float) -> list[str]:
    """The convolution implementations oneDNN picked for the planes network (from its verbose log, one small run)."""
    small = thick.with_slices(thick.slices_first()[:, :32, :32], thick.slice_spacing, 0.0, thick.slice_thickness)
    up = Upsampler("planes", spacing=spacing)
    up.preload()
    handle, name = tempfile.mkstemp()
    saved = os.dup(1)
    sys.stdout.flush()
    os.dup2(handle, 1)
    try:
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            up(small)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(handle)
    lines = Path(name).read_text().splitlines()
    os.unlink(name)
    return sorted({line.split(",")[6] for line in lines if ",convolution," in line and line.count(",") > 6})


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
        thick = read_volume(path)
        macs = macs_per_output_voxel(thick, args.spacing)
        kernels = conv_kernels(thick, args.spacing)
        voxels = thin_grid(thick, args.spacing)[0] * thick.slices_first()[0].size
    best = min(runs, key=lambda r: r["whole run"])
    print(f"planes, {path.name} -> {args.spacing:g} mm, {torch.get_num_threads()} threads, best of {args.repeat}\n")
    print("| stage | seconds | share |\n|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.1f} | {seconds / best['whole run']:.0%} |")
    peak = bf16_matmul_peak()
    print(f"\nnetwork: {macs / 1e3:.1f}k multiply-adds per output voxel")
    rate = macs * voxels / best["network (refine)"] / 1e9
    print(f"network rate: {rate:.0f} GMAC/s = {rate / peak:.2f} of this machine's bf16 matmul peak "
          f"({peak:.0f} GMAC/s, best of 5 bf16 matmuls of 4096^3)")
    print(f"CPU: {cpu_name()}\nconvolution kernels (oneDNN): {', '.join(kernels) or 'none reported'}")


if __name__ == "__main__":
    main()
