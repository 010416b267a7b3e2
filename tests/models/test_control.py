"""IRControlNet (zero-init, initialisation from the UNet) and the denoiser's classifier-free guidance."""

from __future__ import annotations

import math

import torch

from thinslice.models.control import ControlConfig, IRControlNet
from thinslice.models.denoiser import LatentDenoiser
from thinslice.models.unet import LatentUNet3D
from thinslice.presets import load_preset


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def inputs(shape=(2, 4, 4, 8, 8), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.tensor([0, 2])[: shape[0]], torch.randn(shape, generator=g)


def test_fresh_control_net_changes_nothing() -> None:
    unet = randomize_(LatentUNet3D(load_preset("tiny").unet)).eval()
    control = IRControlNet.from_unet(unet, ControlConfig()).eval()
    x, t, y = inputs()
    with torch.no_grad():
        residuals = control(x, t, y, 3.0)
        assert len(residuals) == unet.num_control_residuals
        assert torch.equal(unet(x, t, y, 3.0, control_residuals=residuals), unet(x, t, y, 3.0))
        # Once the zero convolutions have learned something, the control does change the output ...
        randomize_(control.zero_convs, seed=1)
        changed = unet(x, t, y, 3.0, control_residuals=control(x, t, y, 3.0))
        assert not torch.allclose(changed, unet(x, t, y, 3.0))
        # ... by an amount set by control_scale (0 = off).
        control.control_scale = 0.0
        assert torch.equal(unet(x, t, y, 3.0, control_residuals=control(x, t, y, 3.0)), unet(x, t, y, 3.0))


def test_from_unet_copies_encoder_and_embedding() -> None:
    unet = randomize_(LatentUNet3D(load_preset("tiny").unet))
    control = IRControlNet.from_unet(unet)
    for name, value in unet.encoder.state_dict().items():
        assert torch.equal(control.encoder.state_dict()[name], value)
    for name, value in unet.embedding.state_dict().items():
        assert torch.equal(control.embedding.state_dict()[name], value)
    assert all(torch.count_nonzero(p) == 0 for p in control.condition_conv.parameters())
    assert all(torch.count_nonzero(p) == 0 for p in control.zero_convs.parameters())


def make_denoiser(with_control: bool = True) -> LatentDenoiser:
    preset = load_preset("tiny")
    unet = LatentUNet3D(preset.unet)
    control = IRControlNet.from_unet(unet, preset.control) if with_control else None
    den = LatentDenoiser(unet, control, preset.diffusion)
    return randomize_(den).eval()


def test_condition_dropout_rate_and_values() -> None:
    den = make_denoiser(with_control=False)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(50, 4, 1, 2, 2) + 10.0  # far from the null latent so dropped elements are recognisable
    dropped = 0
    draws = 200
    for _ in range(draws):
        out, mask = den.condition_dropout(y, p=0.1, generator=g)
        assert torch.equal(out[~mask], y[~mask])
        assert torch.equal(out[mask], den.null_like(y)[mask])
        dropped += int(mask.sum())
    n = draws * y.shape[0]
    assert abs(dropped / n - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)  # binomial tolerance (4 sigma)
    assert den.condition_dropout(y, p=0.0, generator=g)[1].sum() == 0


def test_guidance() -> None:
    den = make_denoiser()
    x, t, y = inputs()
    calls = []
    den.unet.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        cond = den(x, t, y, 3.0)
        assert torch.equal(den.guided(x, t, y, 3.0, guidance_scale=1.0), cond)
        assert len(calls) == 2  # w = 1 skips the unconditional pass
        uncond = den(x, t, y, 3.0, drop_mask=torch.ones(2, dtype=torch.bool))
        assert torch.equal(uncond, den(x, t, den.null_like(y), 3.0))
        assert not torch.allclose(uncond, cond)
        guided = den.guided(x, t, y, 3.0, guidance_scale=2.5)
        assert torch.allclose(guided, uncond + 2.5 * (cond - uncond), atol=1e-6)
        # A per-element drop mask only affects the dropped element.
        mixed = den(x, t, y, 3.0, drop_mask=torch.tensor([True, False]))
        assert torch.allclose(mixed[0], uncond[0], atol=1e-6) and torch.allclose(mixed[1], cond[1], atol=1e-6)


def test_denoiser_without_control_is_plain_unet() -> None:
    den = make_denoiser(with_control=False)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(den(x, t, y, 3.0), den.unet(x, t, y, 3.0))
