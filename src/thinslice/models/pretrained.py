"""Start the 3D VAE from a pretrained 2D diffusers ``AutoencoderKL`` (e.g. ``microsoft/mri-autoencoder-v0.1``).

Reads a diffusers-format folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) *without* the diffusers
package: the config is plain JSON and the weights a safetensors state dict whose key names follow diffusers'
``AutoencoderKL`` layout, which :class:`~thinslice.models.vae.AutoencoderKL3D` mirrors module by module.

2D -> 3D inflation puts each 2D kernel ``(o, i, kh, kw)`` in the *centre depth slice* of a ``(o, i, kd, kh, kw)``
kernel (zeros elsewhere): a volume of identical slices then gives, slice by slice, exactly the 2D model's result
(GroupNorm and attention statistics over identical slices are the 2D ones). RGB input convs become 1-channel by
summing over input channels (a grey image replicated to RGB); RGB output convs become 1-channel by averaging.
Tensors whose shapes do not fit (other channels or levels) are skipped and reported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.networks.blocks import Convolution
from safetensors.torch import load_file

from thinslice.errors import ThinsliceError
from thinslice.models.vae import AutoencoderKL3D, VAEConfig

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
# Old diffusers attention names (before 0.14) -> current names.
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass
class ImportReport:
    source: str
    loaded: list[str] = field(default_factory=list)  # target (3D) keys set from the checkpoint
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source key, why) not used
    not_initialised: list[str] = field(default_factory=list)  # target keys left at their initial values

    def summary(self) -> str:
        lines = [f"imported {len(self.loaded)} tensors from {self.source}; "
                 f"{len(self.skipped)} checkpoint tensors skipped, {len(self.not_initialised)} model tensors kept "
                 "at random init"]
        for key, why in self.skipped[:10]:
            lines.append(f"  skipped {key}: {why}")
        if len(self.skipped) > 10:
            lines.append(f"  ... and {len(self.skipped) - 10} more")
        return "\n".join(lines)


def locate_pretrained(path_or_hub_id: str | Path) -> Path:
    """Folder holding ``config.json`` + weights: a local folder (or its ``vae/`` subfolder) or a Hub id."""
    path = Path(path_or_hub_id)
    if path.exists():
        for folder in (path, path / "vae"):
            if (folder / "config.json").is_file() and any((folder / w).is_file() for w in WEIGHT_NAMES):
                return folder
        raise ThinsliceError(
            f"{path} is not a diffusers AutoencoderKL folder (needs config.json and diffusion_pytorch_model"
            ".safetensors, possibly in vae/)"
        )
    text = str(path_or_hub_id)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        raise ThinsliceError(f"pretrained weights not found: {text}; pass a local folder or a Hugging Face hub id")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ThinsliceError(
            f"'{text}' looks like a Hugging Face hub id, but huggingface_hub is not installed; install it "
            "(pip install 'thinslice[hub]') or download the folder and pass its path"
        ) from exc
    patterns = [f"{p}{n}" for p in ("", "vae/") for n in ("config.json", *WEIGHT_NAMES)]
    try:
        local = Path(snapshot_download(repo_id=text, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated model: all mean "cannot get it"
        raise ThinsliceError(
            f"cannot download '{text}' from the Hugging Face hub ({type(exc).__name__}); when offline, download the "
            "folder elsewhere and pass its path"
        ) from exc
    return locate_pretrained(local)


def read_diffusers_autoencoder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = json.loads((folder / "config.json").read_text())
    weights = next(folder / w for w in WEIGHT_NAMES if (folder / w).is_file())
    return cfg, load_file(str(weights), device="cpu")


def vae_config_from_diffusers(cfg: dict, strides: tuple[tuple[int, int, int], ...] | None = None) -> VAEConfig:
    """A 3D config with the 2D model's channels/levels; in-plane-only strides unless given."""
    channels = tuple(int(c) for c in cfg.get("block_out_channels", (64,)))
    return VAEConfig(
        in_channels=1,
        latent_channels=int(cfg.get("latent_channels", 4)),
        channels=channels,
        num_res_blocks=int(cfg.get("layers_per_block", 1)),
        strides=strides or tuple((1, 2, 2) for _ in channels[1:]),
        attention_at_lowest=bool(cfg.get("mid_block_add_attention", True)),
        norm_num_groups=int(cfg.get("norm_num_groups", 32)),
    )


def diffusers_key_map(model: AutoencoderKL3D) -> dict[str, str]:
    """3D model state-dict key -> diffusers AutoencoderKL key."""
    conv_wrappers = {name for name, m in model.named_modules() if isinstance(m, Convolution)}
    mapping: dict[str, str] = {}
    for key in model.state_dict():
        module, _, param = key.rpartition(".")
        name = key
        if module.endswith(".conv") and module[: -len(".conv")] in conv_wrappers:
            name = f"{module[: -len('.conv')]}.{param}"
        name = name.replace(".nin_shortcut.", ".conv_shortcut.")
        name = re.sub(r"(attentions\.\d+)\.norm\.", r"\1.group_norm.", name)
        name = re.sub(r"(attentions\.\d+)\.attn\.out_proj\.", r"\1.to_out.0.", name)
        name = re.sub(r"(attentions\.\d+)\.attn\.(to_[qkv])\.", r"\1.\2.", name)
        mapping[key] = name
    return mapping


def _normalise_source_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        m = re.match(r"(.*attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$", key)
        if m:
            key = f"{m.group(1)}.{_OLD_ATTENTION[m.group(2)]}.{m.group(3)}"
            if value.ndim == 4:  # very old checkpoints stored these as 1x1 convs
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def _inflate(src: torch.Tensor, target: torch.Tensor) -> torch.Tensor | str:
    """Source tensor shaped for the 3D target, or the reason why it cannot be."""
    if src.ndim == 4 and target.ndim == 5:
        o, i = src.shape[:2]
        if i != target.shape[1]:
            if target.shape[1] == 1:
                src = src.sum(dim=1, keepdim=True)  # RGB input -> grey
            else:
                return f"input channels {i} vs {target.shape[1]}"
        if o != target.shape[0]:
            if target.shape[0] == 1:
                src = src.mean(dim=0, keepdim=True)  # RGB output -> grey
            else:
                return f"output channels {o} vs {target.shape[0]}"
        if tuple(src.shape[2:]) != tuple(target.shape[3:]):
            return f"kernel {tuple(src.shape[2:])} vs {tuple(target.shape[3:])}"
        out = torch.zeros(target.shape, dtype=target.dtype)
        out[:, :, target.shape[2] // 2] = src.to(target.dtype)
        return out
    if src.ndim == 1 and target.ndim == 1 and src.shape[0] != target.shape[0] and target.shape[0] == 1:
        return src.mean(dim=0, keepdim=True).to(target.dtype)  # bias of an RGB output conv
    if tuple(src.shape) != tuple(target.shape):
        return f"shape {tuple(src.shape)} vs {tuple(target.shape)}"
    return src.to(target.dtype)


def import_diffusers_autoencoder(model: AutoencoderKL3D, path_or_hub_id: str | Path) -> ImportReport:
    """Load what fits of a 2D diffusers AutoencoderKL into ``model`` (in place); report the rest."""
    folder = locate_pretrained(path_or_hub_id)
    cfg, source = read_diffusers_autoencoder(folder)
    source = _normalise_source_keys(source)
    report = ImportReport(source=str(folder))
    own = model.state_dict()
    new_state = {}
    used: set[str] = set()
    for key, src_key in diffusers_key_map(model).items():
        if src_key not in source:
            report.not_initialised.append(key)
            continue
        result = _inflate(source[src_key], own[key])
        used.add(src_key)
        if isinstance(result, str):
            report.skipped.append((src_key, result))
            report.not_initialised.append(key)
        else:
            new_state[key] = result
            report.loaded.append(key)
    for src_key in sorted(set(source) - used):
        report.skipped.append((src_key, "no matching module in the 3D model"))
    model.load_state_dict(new_state, strict=False)
    if "scaling_factor" in cfg:
        # A starting value only: thinslice re-estimates it on 3D training patches after training.
        model.set_scaling_factor(float(cfg["scaling_factor"]))
    return report
