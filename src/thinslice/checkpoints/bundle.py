"""Model bundles: one folder holding every network an upsampling method needs (the checkpoint layer below
train/ and infer/: locate, load, save, manifest).

Layout (file names fixed so that a folder is all the user passes, ``--checkpoint DIR``)::

    vae.safetensors                 AutoencoderKL3D
    denoiser.safetensors            LatentDenoiser (UNet + optional IRControlNet + null condition), one state dict
    denoiser-<T>step.safetensors    optional fast schedule (e.g. denoiser-4step), picked with --steps T
    baseline.safetensors            ResidualCNN3D
    planes.safetensors              PlanesNet (--method planes), every factor it was trained for
    planes-x<k>.safetensors         optional PlanesNet trained for factor k alone, used for that factor

Every file carries its preset record (see :mod:`thinslice.checkpoints.files`), so the networks are rebuilt from the
file alone. The denoiser also records the content hash of the VAE whose latents it was trained on; pairing it with
another VAE is refused. Shipped weights live in the package folder ``thinslice/weights`` with the same layout.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from torch import nn

import thinslice
from thinslice.checkpoints import files as weights_io
from thinslice.device import resolve_device
from thinslice.errors import ThinsliceError
from thinslice.models.baseline import ResidualCNN3D
from thinslice.models.denoiser import LatentDenoiser
from thinslice.models.planes import PlanesNet
from thinslice.models.vae import AutoencoderKL3D
from thinslice.presets import Preset, load_preset

DEFAULT_BUNDLE_DIR = Path(thinslice.__file__).resolve().parent / "weights"
DENOISER_KIND = "denoiser"
KINDS = ("vae", "denoiser", "baseline", "planes")


def weights_file(kind: str) -> str:
    """A kind's fixed file name in a bundle: ``<kind>.safetensors``."""
    return f"{kind}.safetensors"


FILES = {kind: weights_file(kind) for kind in KINDS}


def planes_file(factor: int | None = None) -> str:
    """File name of the planes network for ``factor`` (None: the all-factor ``planes.safetensors``)."""
    return FILES["planes"] if factor is None else f"planes-x{int(factor)}.safetensors"


def specialist_factors(bundle: str | Path) -> tuple[int, ...]:
    """Factors that have a ``planes-x<k>.safetensors`` of their own in ``bundle``."""
    found = []
    for path in Path(bundle).glob("planes-x*.safetensors"):
        k = path.name[len("planes-x"): -len(".safetensors")]
        if k.isdigit():
            found.append(int(k))
    return tuple(sorted(found))


def denoiser_file(steps: int | None = None) -> str:
    """File name of the denoiser for ``steps`` (None: the default schedule)."""
    return FILES["denoiser"] if steps is None else f"denoiser-{int(steps)}step.safetensors"


# --------------------------------------------------------------------------------------------------- locating
def resolve_bundle(checkpoint: str | Path | None, kinds: Sequence[str], label: str = "this method",
                   hint: str = "thinslice train ...") -> Path:
    """The bundle folder holding ``kinds`` (e.g. ('vae', 'denoiser')): ``checkpoint`` (a folder, its ``final/``, or
    a file inside it) or the shipped one; a ThinsliceError names ``label`` (the method) and says how to get weights
    (``hint``, its training command) when a needed file is missing."""
    needed = [weights_file(k) for k in kinds]
    if checkpoint is None:
        folder = DEFAULT_BUNDLE_DIR
        missing = [n for n in needed if not (folder / n).is_file()]
        if missing:
            raise ThinsliceError(f"no trained weights for '{label}' found in {folder} (missing {', '.join(missing)}); "
                                 f"train them with `{hint}` or pass --checkpoint DIR")
        return folder
    path = Path(checkpoint).expanduser()
    if path.is_file():
        if path.name not in {*FILES.values()} and not path.name.startswith("denoiser-"):
            raise ThinsliceError(
                f"--checkpoint {path} is a file; pass the folder holding {', '.join(needed) or 'the weights'}"
            )
        path = path.parent
    if not path.is_dir():
        raise ThinsliceError(f"checkpoint folder not found: {path}; pass a folder holding {', '.join(needed)}")
    for folder in (path, path / "final"):
        if all((folder / n).is_file() for n in needed):
            return folder
    missing = [n for n in needed if not (path / n).is_file()]
    raise ThinsliceError(
        f"no trained weights for '{label}' found in {path} (missing {', '.join(missing)}); train them with "
        f"`{hint}` or pass --checkpoint DIR holding {', '.join(needed)}"
    )


def has_weights(kinds: str | Sequence[str], bundle: str | Path | None = None) -> bool:
    """Whether the shipped folder (or ``bundle``) holds weights of every one of ``kinds`` ('vae', 'denoiser',
    'baseline', 'planes')."""
    folder = DEFAULT_BUNDLE_DIR if bundle is None else Path(bundle)
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in FILES]
    if unknown:
        raise ThinsliceError(f"unknown weights kind '{unknown[0]}': use one of {', '.join(FILES)}")
    return all((folder / FILES[k]).is_file() for k in kinds)


# Written next to the shipped weights by whoever trains and benchmarks them: {"default_method": ..., "why": ...}.
MANIFEST_FILE = "manifest.json"


def read_manifest(bundle: str | Path | None = None) -> dict:
    """The bundle's manifest (benchmark summary and recommended default), or {} when there is none."""
    path = (DEFAULT_BUNDLE_DIR if bundle is None else Path(bundle)) / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ThinsliceError(f"cannot read {path}: {err}; fix or delete it") from err
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------------------------------- building
def _load(kind: str, path: Path, device: torch.device, preset: str | Path | Preset | None) -> nn.Module:
    """Network of ``kind`` from a self-describing weights file, refusing files of another kind or preset."""
    return weights_io.load_model(kind, path, preset=preset, device=device)


def load_vae(bundle: str | Path, device: str | torch.device | None = "cpu",
             preset: str | Path | Preset | None = None) -> AutoencoderKL3D:
    """The bundle's VAE (scaling factor from the file's record), in eval mode on ``device``."""
    return cast(AutoencoderKL3D, _load("vae", Path(bundle) / FILES["vae"], resolve_device(device), preset))


def load_baseline(bundle: str | Path, device: str | torch.device | None = "cpu",
                  preset: str | Path | Preset | None = None) -> ResidualCNN3D:
    return cast(ResidualCNN3D, _load("baseline", Path(bundle) / FILES["baseline"], resolve_device(device), preset))


def load_planes(bundle: str | Path, device: str | torch.device | None = "cpu",
                preset: str | Path | Preset | None = None, factor: int | None = None) -> PlanesNet:
    """The all-factor planes network, or with ``factor`` the one trained for that factor alone (its own
    architecture record: ``preset`` is not checked against it)."""
    if factor is not None:
        return cast(PlanesNet, _load("planes", Path(bundle) / planes_file(factor), resolve_device(device), None))
    return cast(PlanesNet, _load("planes", Path(bundle) / FILES["planes"], resolve_device(device), preset))


def load_denoiser(bundle: str | Path, device: str | torch.device | None = "cpu", steps: int | None = None,
                  preset: str | Path | Preset | None = None) -> LatentDenoiser:
    """The denoiser that samples with ``steps`` (None: the default ``denoiser.safetensors``).

    A ResShift model samples with exactly the steps it was trained with; ``steps`` different from the default
    model's picks ``denoiser-<steps>step.safetensors`` (e.g. the 4-step model). DDIM models take any ``steps``.
    """
    folder = Path(bundle)
    main = folder / FILES["denoiser"]
    if steps is not None:
        steps = int(steps)
        if steps < 1:
            raise ThinsliceError(f"--steps must be a positive number, got {steps}")
        diffusion = _file_record(main).get("diffusion", {})
        same = diffusion.get("method", "resshift") == "ddim" or int(diffusion.get("num_steps", -1)) == steps
        if not same:
            fast = folder / denoiser_file(steps)
            if not fast.is_file():
                available = [str(diffusion.get("num_steps", "?"))]
                available += sorted(p.name.split("-")[1].removesuffix("step.safetensors")
                                    for p in folder.glob("denoiser-*step.safetensors"))
                raise ThinsliceError(
                    f"no denoiser for {steps} steps in {folder}: this bundle samples with {', '.join(available)} "
                    "steps; pass one of these to --steps (or leave it out)"
                )
            main = fast
    return cast(LatentDenoiser, _load(DENOISER_KIND, main, resolve_device(device), preset))


def _file_record(path: Path) -> dict:
    meta = weights_io.read_metadata(path)
    if "preset_config" not in meta:
        raise ThinsliceError(f"{path} has no thinslice metadata (kind/preset); it was not saved by thinslice")
    return json.loads(meta["preset_config"])


# ---------------------------------------------------------------------------------------------------- saving
def save_bundle_denoiser(
    denoiser: LatentDenoiser,
    preset: str | Path | Preset,
    path: str | Path,
    extra_metadata: dict[str, str] | None = None,
) -> str:
    """Write ``denoiser`` (one state dict) with its preset record; returns the content hash.

    ``path`` is a file or a bundle folder (then ``denoiser.safetensors``, or ``denoiser-<T>step.safetensors`` when
    the model's ResShift steps differ from the preset's). The record's unet/control/diffusion sections are the
    model's own configs, so the file rebuilds exactly this network. ``extra_metadata`` (strings) is stored too,
    e.g. ``{"vae_hash": record_of(vae).content_hash}``.
    """
    base = load_preset(preset)
    control_cfg = denoiser.control.cfg if denoiser.control is not None else dataclasses.replace(
        base.control, enabled=False)
    record_preset = dataclasses.replace(base, unet=denoiser.unet.cfg, control=control_cfg, diffusion=denoiser.cfg)
    path = Path(path)
    if path.is_dir() or path.suffix != ".safetensors":
        steps = None if denoiser.cfg.num_steps == base.diffusion.num_steps else denoiser.cfg.num_steps
        path = path / denoiser_file(steps)
    meta = {"steps": str(denoiser.cfg.num_steps), "sampler": denoiser.cfg.method}
    meta.update(extra_metadata or {})
    return weights_io.save_weights(path, denoiser, DENOISER_KIND, record_preset, meta)


def save_bundle_model(model: nn.Module, kind: str, preset: str | Path | Preset, folder: str | Path,
                      extra_metadata: dict[str, str] | None = None) -> str:
    """Write a VAE ('vae'), CNN baseline ('baseline') or planes network into a bundle folder under its fixed name."""
    if kind not in ("vae", "baseline", "planes"):
        raise ThinsliceError(f"save_bundle_model saves 'vae', 'baseline' or 'planes', got '{kind}' "
                             "(use save_bundle_denoiser)")
    return weights_io.save_weights(Path(folder) / FILES[kind], model, kind, preset, extra_metadata)


