"""Model bundles: one folder holding every network an upsampling method needs.

Layout (file names fixed so that a folder is all the user passes, ``--checkpoint DIR``)::

    vae.safetensors                 AutoencoderKL3D
    denoiser.safetensors            LatentDenoiser (UNet + optional IRControlNet + null condition), one state dict
    denoiser-<T>step.safetensors    optional fast schedule (e.g. denoiser-4step), picked with --steps T
    baseline.safetensors            ResidualCNN3D
    planes.safetensors              PlanesNet (--method planes)

Every file carries its preset record (see :mod:`thinslice.models.weights`), so the networks are rebuilt from the file
alone. The denoiser also records the content hash of the VAE whose latents it was trained on; pairing it with another
VAE is refused. Shipped weights live in the package folder ``thinslice/weights`` with the same layout.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

import thinslice
from thinslice.errors import ThinsliceError
from thinslice.models import weights as weights_io
from thinslice.models.baseline import ResidualCNN3D
from thinslice.models.denoiser import LatentDenoiser
from thinslice.models.factory import build_denoiser  # noqa: F401 (re-exported for callers of the bundle API)
from thinslice.models.planes import PlanesNet
from thinslice.models.vae import AutoencoderKL3D
from thinslice.presets import Preset, load_preset

DEFAULT_BUNDLE_DIR = Path(thinslice.__file__).resolve().parent / "weights"
DENOISER_KIND = "denoiser"
FILES = {"vae": "vae.safetensors", "denoiser": "denoiser.safetensors", "baseline": "baseline.safetensors",
         "planes": "planes.safetensors"}
# What each method needs from a bundle (kinds, see FILES).
METHOD_FILES = {"ldm": ("vae", "denoiser"), "cnn": ("baseline",), "planes": ("planes",)}
# Preset sections that define each kind's architecture (for the "wrong preset" check).
TRAIN_HINT = {"ldm": "thinslice train-vae ... and thinslice train ...", "cnn": "thinslice train-baseline ...",
              "planes": "thinslice train-planes ..."}


def denoiser_file(steps: int | None = None) -> str:
    """File name of the denoiser for ``steps`` (None: the default schedule)."""
    return FILES["denoiser"] if steps is None else f"denoiser-{int(steps)}step.safetensors"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU; a clear error for a device that is not there."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except RuntimeError as exc:
        raise ThinsliceError(f"unknown --device '{device}': use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ThinsliceError(f"--device {device} requested but no CUDA GPU is available; use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ThinsliceError("--device mps requested but Apple MPS is not available; use --device cpu")
    return dev


# --------------------------------------------------------------------------------------------------- locating
def resolve_bundle(checkpoint: str | Path | None, method: str = "ldm") -> Path:
    """The bundle folder for ``method``: ``checkpoint`` (a folder, its ``final/``, or a file inside it) or the
    shipped one; a ThinsliceError says how to get weights when a needed file is missing."""
    needed = [FILES[k] for k in METHOD_FILES.get(method, ())]
    if checkpoint is None:
        folder = DEFAULT_BUNDLE_DIR
        missing = [n for n in needed if not (folder / n).is_file()]
        if missing:
            raise ThinsliceError(
                f"no trained weights for '{method}' found in {folder} (missing {', '.join(missing)}); train them "
                f"with `{TRAIN_HINT.get(method, 'thinslice train ...')}` or pass --checkpoint DIR"
            )
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
        f"no trained weights for '{method}' found in {path} (missing {', '.join(missing)}); train them with "
        f"`{TRAIN_HINT.get(method, 'thinslice train ...')}` or pass --checkpoint DIR holding {', '.join(needed)}"
    )


def has_weights(kind: str, bundle: str | Path | None = None) -> bool:
    """Whether the shipped folder (or ``bundle``) holds weights for ``kind`` ('vae', 'denoiser', 'baseline') or for
    every file a method ('ldm', 'cnn') needs."""
    folder = DEFAULT_BUNDLE_DIR if bundle is None else Path(bundle)
    kinds = METHOD_FILES.get(kind, (kind,))
    if any(k not in FILES for k in kinds):
        raise ThinsliceError(f"unknown weights kind '{kind}': use one of {', '.join([*FILES, *METHOD_FILES])}")
    return all((folder / FILES[k]).is_file() for k in kinds)


# Learned methods in order of preference when the user names none and the shipped folder has no manifest: the first
# whose weights ship with the package is used, else cubic interpolation.
PREFERRED_METHODS = ("planes", "ldm", "cnn")
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


def default_method() -> str:
    """What ``--method auto`` means in this install.

    The shipped manifest's ``default_method`` (the method that scored best on the benchmark for its time, so shipped
    weights that do not beat cubic interpolation are available with ``--method`` but not used by default), else the
    first preferred method with shipped weights, else ``cubic``.
    """
    from thinslice.infer.upsample import WEIGHTLESS_METHODS

    chosen = read_manifest().get("default_method")
    if chosen in WEIGHTLESS_METHODS or (chosen in METHOD_FILES and has_weights(chosen)):
        return str(chosen)
    for name in PREFERRED_METHODS:
        if has_weights(name):
            return name
    return "cubic"


# --------------------------------------------------------------------------------------------------- building
def _load(kind: str, path: Path, device: torch.device, preset: str | Path | Preset | None) -> nn.Module:
    """Network of ``kind`` from a self-describing weights file, refusing files of another kind or preset."""
    return weights_io.load_model(kind, path, preset=preset, device=device)


def load_vae(bundle: str | Path, device: str | torch.device | None = "cpu",
             preset: str | Path | Preset | None = None) -> AutoencoderKL3D:
    """The bundle's VAE (scaling factor from the file's record), in eval mode on ``device``."""
    return _load("vae", Path(bundle) / FILES["vae"], resolve_device(device), preset)  # type: ignore[return-value]


def load_baseline(bundle: str | Path, device: str | torch.device | None = "cpu",
                  preset: str | Path | Preset | None = None) -> ResidualCNN3D:
    return _load("baseline", Path(bundle) / FILES["baseline"], resolve_device(device),  # type: ignore[return-value]
                 preset)


def load_planes(bundle: str | Path, device: str | torch.device | None = "cpu",
                preset: str | Path | Preset | None = None) -> PlanesNet:
    return _load("planes", Path(bundle) / FILES["planes"], resolve_device(device),  # type: ignore[return-value]
                 preset)


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
    return _load(DENOISER_KIND, main, resolve_device(device), preset)  # type: ignore[return-value]


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
    e.g. ``{"vae_hash": vae.weights_hash}``.
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


# ------------------------------------------------------------------------------------------ option values
# ``thinslice upsample --option KEY=VALUE`` passes strings; these accept both typed values and their text form.
def _flag(name: str) -> str:
    """How the user spelled the option: ``--adapt-steps`` (``--option adapt_steps=...`` for the rest)."""
    return "--" + name.replace("_", "-")


def option_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ThinsliceError(f"{_flag(name)} must be true or false, got '{value}'")


def option_int(name: str, value: object, minimum: int | None = None) -> int:
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ThinsliceError(f"{_flag(name)} must be a whole number, got '{value}'") from None
    if minimum is not None and number < minimum:
        raise ThinsliceError(f"{_flag(name)} must be at least {minimum}, got {number}")
    return number


def option_float(name: str, value: object, positive: bool = False) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ThinsliceError(f"{_flag(name)} must be a number, got '{value}'") from None
    if not np.isfinite(number) or (positive and number <= 0):
        raise ThinsliceError(f"{_flag(name)} must be a {'positive ' if positive else ''}finite number, got {value}")
    return number


def option_patch(name: str, value: object) -> tuple[int, int, int]:
    """A (d, h, w) voxel size from a 3-sequence or text like '32,128,128' / '32x128x128'."""
    items = value.replace("x", ",").replace(" ", ",").split(",") if isinstance(value, str) else value
    try:
        sizes = tuple(int(v) for v in items if str(v).strip() != "")  # type: ignore[union-attr]
    except (TypeError, ValueError):
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise ThinsliceError(f"{_flag(name)} must be three positive voxel counts D H W, got {value}")
    return sizes  # type: ignore[return-value]


# bf16 autocast: 2-4x faster 3D convolutions on recent CPUs and GPUs; "fp32" for exact reference runs.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype for a ``--precision`` name (None = plain float32)."""
    if precision not in PRECISIONS:
        raise ThinsliceError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``'s type, or nothing for float32."""
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)
