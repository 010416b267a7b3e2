"""Import of a 2D diffusers AutoencoderKL into the 3D VAE (no diffusers needed: the test writes the checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from thinslice.errors import ThinsliceError
from thinslice.models.pretrained import import_diffusers_autoencoder, vae_config_from_diffusers
from thinslice.models.vae import AutoencoderKL3D, VAEConfig


def _resnet_keys(prefix: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    keys = {f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
            f"{prefix}.conv1.weight": (cout, cin, 3, 3), f"{prefix}.conv1.bias": (cout,),
            f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
            f"{prefix}.conv2.weight": (cout, cout, 3, 3), f"{prefix}.conv2.bias": (cout,)}
    if cin != cout:
        keys.update({f"{prefix}.conv_shortcut.weight": (cout, cin, 1, 1), f"{prefix}.conv_shortcut.bias": (cout,)})
    return keys


def _mid_keys(prefix: str, ch: int) -> dict[str, tuple[int, ...]]:
    keys = {**_resnet_keys(f"{prefix}.resnets.0", ch, ch), **_resnet_keys(f"{prefix}.resnets.1", ch, ch)}
    a = f"{prefix}.attentions.0"
    keys.update({f"{a}.group_norm.weight": (ch,), f"{a}.group_norm.bias": (ch,)})
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        keys.update({f"{a}.{name}.weight": (ch, ch), f"{a}.{name}.bias": (ch,)})
    return keys


def diffusers_autoencoder_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of diffusers' AutoencoderKL for ``cfg`` (written out by hand from its layout)."""
    ch, layers, lat = cfg["block_out_channels"], cfg["layers_per_block"], cfg["latent_channels"]
    k: dict[str, tuple[int, ...]] = {"encoder.conv_in.weight": (ch[0], cfg["in_channels"], 3, 3),
                                     "encoder.conv_in.bias": (ch[0],)}
    prev = ch[0]
    for i, c in enumerate(ch):
        for j in range(layers):
            k.update(_resnet_keys(f"encoder.down_blocks.{i}.resnets.{j}", prev if j == 0 else c, c))
        if i < len(ch) - 1:
            k.update({f"encoder.down_blocks.{i}.downsamplers.0.conv.weight": (c, c, 3, 3),
                      f"encoder.down_blocks.{i}.downsamplers.0.conv.bias": (c,)})
        prev = c
    k.update(_mid_keys("encoder.mid_block", ch[-1]))
    k.update({"encoder.conv_norm_out.weight": (ch[-1],), "encoder.conv_norm_out.bias": (ch[-1],),
              "encoder.conv_out.weight": (2 * lat, ch[-1], 3, 3), "encoder.conv_out.bias": (2 * lat,),
              "quant_conv.weight": (2 * lat, 2 * lat, 1, 1), "quant_conv.bias": (2 * lat,),
              "post_quant_conv.weight": (lat, lat, 1, 1), "post_quant_conv.bias": (lat,),
              "decoder.conv_in.weight": (ch[-1], lat, 3, 3), "decoder.conv_in.bias": (ch[-1],)})
    k.update(_mid_keys("decoder.mid_block", ch[-1]))
    rev = list(reversed(ch))
    prev = rev[0]
    for i, c in enumerate(rev):
        for j in range(layers + 1):
            k.update(_resnet_keys(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else c, c))
        if i < len(rev) - 1:
            k.update({f"decoder.up_blocks.{i}.upsamplers.0.conv.weight": (c, c, 3, 3),
                      f"decoder.up_blocks.{i}.upsamplers.0.conv.bias": (c,)})
        prev = c
    k.update({"decoder.conv_norm_out.weight": (rev[-1],), "decoder.conv_norm_out.bias": (rev[-1],),
              "decoder.conv_out.weight": (cfg["out_channels"], rev[-1], 3, 3),
              "decoder.conv_out.bias": (cfg["out_channels"],)})
    return k


@pytest.fixture()
def diffusers_folder(tmp_path):
    cfg = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "block_out_channels": [8, 16],
           "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4, "scaling_factor": 0.5,
           "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g) * 0.2 for k, s in diffusers_autoencoder_shapes(cfg).items()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    return tmp_path, cfg, tensors


def test_import_inflates_every_tensor(diffusers_folder):
    folder, cfg, tensors = diffusers_folder
    config = vae_config_from_diffusers(cfg)
    assert config.channels == (8, 16) and config.attention_at_lowest and config.strides == ((1, 2, 2),)
    vae = AutoencoderKL3D(config).eval()
    report = import_diffusers_autoencoder(vae, folder)
    assert report.skipped == [] and report.not_initialised == []
    assert len(report.loaded) == len(tensors) == len(vae.state_dict())
    assert vae.scaling_factor == 0.5

    # conv_in on a volume of identical slices == the 2D conv (RGB input summed for a grey image) on each slice.
    image = torch.randn(1, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    volume = image[:, :, None].repeat(1, 1, 5, 1, 1)
    with torch.no_grad():
        out3d = vae.encoder.conv_in(volume)
        rgb = image.repeat(1, 3, 1, 1)
        out2d = F.conv2d(rgb, tensors["encoder.conv_in.weight"], tensors["encoder.conv_in.bias"], padding=1)
        for d in range(5):
            torch.testing.assert_close(out3d[:, :, d], out2d, atol=1e-5, rtol=1e-5)
        # Through the whole encoder (GroupNorm, attention, down-sampling) the slices stay identical.
        mean, _ = vae.encode(volume)
        torch.testing.assert_close(mean[:, :, 0], mean[:, :, -1], atol=1e-5, rtol=1e-5)
        # Output conv: 3 RGB output channels averaged into one.
        torch.testing.assert_close(vae.decoder.conv_out.conv.weight[:, :, 1],
                                   tensors["decoder.conv_out.weight"].mean(0, keepdim=True))


def test_import_into_other_architecture_reports_skips(diffusers_folder):
    folder, _, _ = diffusers_folder
    vae = AutoencoderKL3D(VAEConfig(channels=(8, 32), strides=((1, 2, 2),), norm_num_groups=4,
                                    attention_at_lowest=False))
    report = import_diffusers_autoencoder(vae, folder)
    assert report.loaded and report.skipped and report.not_initialised
    assert any("attentions" in key for key, _ in report.skipped)
    assert "encoder.conv_in.conv.weight" in report.loaded
    assert "skipped" in report.summary()


def test_missing_folder_and_offline_hub_give_clear_errors(tmp_path):
    with pytest.raises(ThinsliceError, match="not a diffusers AutoencoderKL folder"):
        import_diffusers_autoencoder(AutoencoderKL3D(VAEConfig(channels=(8,), strides=(), norm_num_groups=4)),
                                     tmp_path)
    with pytest.raises(ThinsliceError, match="not found"):
        import_diffusers_autoencoder(AutoencoderKL3D(VAEConfig(channels=(8,), strides=(), norm_num_groups=4)),
                                     tmp_path / "no" / "such" / "dir")
