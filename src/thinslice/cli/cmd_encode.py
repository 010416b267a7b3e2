"""``thinslice encode``: pre-compute the VAE latents the diffusion trainer uses (HR and simulated-thick pairs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import cast

from thinslice.cli.checks import FACTOR, PATCH


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "encode", help="cache VAE latents of thin volumes and of their simulated thick versions",
        description="Encode each thin volume (HR latent) and, per --factors x --profiles, its simulated thick "
        "version cubic-upsampled back to the thin grid (LR latent, with the HR latent of the same grid) into "
        "safetensors files in OUT. Entries still valid for the same VAE and unchanged sources are reused.",
    )
    p.add_argument("--data", nargs="+", required=True, metavar="SPLIT_OR_DIR",
                   help="thin volumes: split .txt file(s), folder(s) or files")
    p.add_argument("--vae", required=True, help="VAE weights (.safetensors or a train-vae run folder) or a preset name "
                   "with bundled weights")
    p.add_argument("--out", required=True, type=Path, help="cache folder")
    p.add_argument("--factors", nargs="*", type=FACTOR, default=[2.0, 4.0], help="thick/thin factors (default 2 4)")
    p.add_argument("--profiles", nargs="*", default=["gaussian"], help="slice profiles (default gaussian)")
    p.add_argument("--tile", nargs=3, type=PATCH, default=None, metavar=("D", "H", "W"),
                   help="tile size in voxels for tiled encoding (default 32 128 128)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.set_defaults(func=run)


def _device(name: str) -> str:
    import torch

    from thinslice.errors import ThinsliceError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ThinsliceError("--device cuda requested but no CUDA GPU is available; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ThinsliceError("--device mps requested but Apple MPS is not available; use --device cpu")
    return name


def run(args: argparse.Namespace) -> int:
    from thinslice.checkpoints.bundle import load_model
    from thinslice.checkpoints.files import record_of
    from thinslice.errors import ThinsliceError
    from thinslice.io.prepare import resolve_data_paths
    from thinslice.models.tiling import DEFAULT_TILE
    from thinslice.models.vae import AutoencoderKL3D
    from thinslice.train.latents import build_latent_cache

    sources = resolve_data_paths(args.data)
    out = args.out.resolve()
    if any(p.resolve() == out for p in sources):
        raise ThinsliceError(f"--out {out} is one of the input files; choose a cache folder")
    vae = cast(AutoencoderKL3D, load_model("vae", args.vae, device=_device(args.device)))
    record = record_of(vae)
    assert record is not None  # load_model records every network it loads
    meta = record.metadata
    cache = build_latent_cache(sources, vae, meta["content_hash"], out, factors=args.factors,
                               profiles=args.profiles, preset_name=meta.get("preset", ""),
                               tile=tuple(args.tile) if args.tile else DEFAULT_TILE)
    print(f"encode: {len(cache.entries)} entries in {out} (VAE {cache.vae_hash})")
    return 0
