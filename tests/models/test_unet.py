"""3D latent UNet: shapes, anisotropic strides, windowed attention, conditioning, gradient checkpointing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from thinslice.models.unet import LatentUNet3D, UNetConfig, WindowedSelfAttention, count_parameters
from thinslice.presets import load_preset


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter with small random values so zero-initialised layers do not hide anything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("name,shape", [("tiny", (2, 4, 8, 16, 16)), ("tiny", (1, 4, 6, 12, 20)),
                                        ("small", (1, 4, 4, 16, 24))])
def test_output_shape(name: str, shape: tuple[int, ...]) -> None:
    unet = LatentUNet3D(load_preset(name).unet)
    x, y = inputs(shape)
    with torch.no_grad():
        out = unet(x, torch.tensor([1] * shape[0]), y, factor=torch.full((shape[0],), 3.0))
    assert out.shape == shape


def test_size_multiple_and_bad_sizes() -> None:
    assert LatentUNet3D(load_preset("tiny").unet).size_multiple == (1, 2, 2)
    unet = LatentUNet3D(load_preset("small").unet)
    assert unet.size_multiple == (2, 4, 4)
    x, y = inputs((1, 4, 3, 16, 16))
    with pytest.raises(ValueError, match="multiple"):
        unet(x, torch.tensor([0]), y, 2.0)
    with pytest.raises(ValueError):
        UNetConfig(channel_mult=(1, 2), strides=((1, 2, 2), (2, 2, 2)))


def test_paper_preset_parameter_count() -> None:
    cfg = load_preset("paper").unet
    with torch.device("meta"):
        unet = LatentUNet3D(cfg)
    assert 100e6 < count_parameters(unet) < 130e6
    assert unet.size_multiple == (2, 8, 8)


def test_anisotropic_strides_keep_the_slice_axis() -> None:
    cfg = dataclasses.replace(load_preset("small").unet, strides=((1, 2, 2), (2, 2, 2)))
    unet = LatentUNet3D(cfg)
    x, y = inputs((1, 4, 8, 16, 16))
    with torch.no_grad():
        emb = unet.embedding(torch.tensor([0]), 2.0, 1)
        skips, mid = unet.encoder(torch.cat([x, y], 1), emb)
    spatial = sorted({tuple(s.shape[2:]) for s in skips}, reverse=True)
    assert spatial == [(8, 16, 16), (8, 8, 8), (4, 4, 4)]
    assert tuple(mid.shape[2:]) == (4, 4, 4)


def test_windowed_attention_equals_per_window_attention() -> None:
    """Windows (with masked padding at the far borders) give exactly attention computed window by window."""
    torch.manual_seed(0)
    attn = WindowedSelfAttention(16, 8, 4, window=(2, 3, 4)).eval()
    x = torch.randn(2, 16, 3, 5, 8)
    with torch.no_grad():
        out = attn(x)
        normed = attn.block.norm(x)
        expected = x.clone()
        for d0 in range(0, 3, 2):
            for h0 in range(0, 5, 3):
                for w0 in range(0, 8, 4):
                    win = normed[:, :, d0:d0 + 2, h0:h0 + 3, w0:w0 + 4]
                    tokens = win.flatten(2).transpose(1, 2)
                    res = attn.block.attn(tokens).transpose(1, 2).reshape(win.shape)
                    expected[:, :, d0:d0 + 2, h0:h0 + 3, w0:w0 + 4] += res
        assert torch.allclose(out, expected, atol=1e-5)
        # A window covering everything is MONAI's global SpatialAttentionBlock.
        attn.window = (8, 8, 8)
        assert torch.allclose(attn(x), attn.block(x))


def test_conditioning_on_timestep_and_factor() -> None:
    unet = randomize_(LatentUNet3D(load_preset("tiny").unet)).eval()
    x, y = inputs((1, 4, 4, 8, 8))
    with torch.no_grad():
        base = unet(x, torch.tensor([1]), y, 3.0)
        assert torch.equal(base, unet(x, 1, y, torch.tensor(3.0)))  # scalars broadcast over the batch
        assert not torch.allclose(base, unet(x, torch.tensor([2]), y, 3.0))
        assert not torch.allclose(base, unet(x, torch.tensor([1]), y, 4.0))
        assert not torch.allclose(base, unet(x, torch.tensor([1]), torch.zeros_like(y), 3.0))
    with pytest.raises(ValueError, match="factor"):
        unet(x, torch.tensor([1]), y)
    plain = LatentUNet3D(dataclasses.replace(load_preset("tiny").unet, factor_conditioning=False))
    assert plain(x, torch.tensor([1]), y).shape == x.shape


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    unet = randomize_(LatentUNet3D(load_preset("tiny").unet))
    x, y = inputs((2, 4, 4, 8, 8))
    t = torch.tensor([0, 3])

    def grads(enabled: bool) -> list[torch.Tensor]:
        unet.set_gradient_checkpointing(enabled)
        unet.zero_grad()
        unet(x, t, y, 2.5).square().mean().backward()
        return [p.grad.clone() for p in unet.parameters()]

    plain, checkpointed = grads(False), grads(True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed, strict=True))
    assert any(a.abs().sum() > 0 for a in plain)
