"""3D VAE: shapes per preset, strides, tiling, weights files, training on the phantom."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from thinslice.checkpoints.bundle import load_model, save_model
from thinslice.checkpoints.files import convert_weights, read_metadata, weights_hash
from thinslice.cli.main import main
from thinslice.errors import ThinsliceError
from thinslice.models.factory import build_vae
from thinslice.models.intensity import hu_to_model
from thinslice.models.tiling import decode_volume, encode_volume
from thinslice.models.vae import AutoencoderKL3D, VAEConfig, count_parameters


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_shapes_tiny_and_small(preset):
    torch.manual_seed(0)
    vae = build_vae(preset).eval()
    x = torch.rand(1, 1, 8, 32, 32) * 2 - 1
    with torch.no_grad():
        recon, mean, logvar = vae(x)
    sd, sh, sw = vae.total_stride
    assert recon.shape == x.shape
    assert mean.shape == logvar.shape == (1, 4, 8 // sd, 32 // sh, 32 // sw)


def test_paper_preset_size_and_forward():
    vae = build_vae("paper").eval()
    n = count_parameters(vae)
    assert 45e6 < n < 60e6, n
    assert vae.total_stride == (2, 8, 8)  # 8x in-plane compression
    x = torch.zeros(1, 1, 4, 32, 32)
    with torch.no_grad():
        mean, _ = vae.encode(x)
    assert mean.shape == (1, 4, 2, 4, 4)


def test_per_axis_strides_keep_slice_axis():
    vae = AutoencoderKL3D(VAEConfig(channels=(8, 8, 8), strides=((1, 2, 2), (1, 2, 2)), norm_num_groups=4)).eval()
    with torch.no_grad():
        mean, _ = vae.encode(torch.zeros(1, 1, 5, 16, 16))
        assert mean.shape[2:] == (5, 4, 4)
        assert vae.decode(mean).shape[2:] == (5, 16, 16)


def test_bad_shapes_and_configs_raise():
    vae = build_vae("small")
    with pytest.raises(ThinsliceError, match="not divisible"):
        vae.encode(torch.zeros(1, 1, 7, 32, 32))
    with pytest.raises(ThinsliceError, match="strides"):
        VAEConfig(channels=(8, 16, 32), strides=((1, 2, 2),), norm_num_groups=4)


def test_scaled_latent_round_trip():
    torch.manual_seed(0)
    vae = build_vae("tiny").eval()
    vae.set_scaling_factor(2.5)
    x = torch.rand(1, 1, 4, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, _ = vae.encode(x)
        z = vae.encode_latent(x)
        torch.testing.assert_close(z, mean * 2.5)
        torch.testing.assert_close(vae.decode_latent(z), vae.decode(mean))


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    vae = build_vae("tiny")
    x = torch.rand(1, 1, 4, 16, 16) * 2 - 1
    grads = []
    for flag in (False, True):
        vae.zero_grad()
        vae.config.gradient_checkpointing = flag
        recon, _, _ = vae(x, sample_posterior=False)
        recon.abs().mean().backward()
        grads.append(vae.encoder.conv_in.conv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def _pad_air(hu: np.ndarray, stride) -> torch.Tensor:
    x = torch.from_numpy(hu_to_model(hu.astype(np.float32)))[None, None]
    shape = [int(np.ceil(n / s) * s) for n, s in zip(hu.shape, stride, strict=True)]
    pad = []
    for n, p in zip(reversed(hu.shape), reversed(shape), strict=True):
        pad += [0, p - n]
    return F.pad(x, pad, value=-1.0)


def test_tiled_single_tile_equals_whole_model(thin_phantom):
    torch.manual_seed(0)
    vae = build_vae("small").eval()
    hu = thin_phantom.slices_first()[:10, :40, :36]  # not divisible by the (2, 4, 4) stride
    latent = encode_volume(vae, hu, tile=(10, 40, 36), scaled=False)
    with torch.no_grad():
        whole = vae.encode(_pad_air(hu, vae.total_stride))[0][0]
    assert latent.shape == whole.shape == (4, 5, 10, 9)
    torch.testing.assert_close(latent, whole, atol=1e-5, rtol=1e-4)
    image = decode_volume(vae, latent, out_shape=hu.shape, tile=(10, 40, 36), scaled=False)
    assert image.shape == hu.shape


def test_tiled_matches_whole_with_overlapping_tiles(thin_phantom):
    """Tile positions, padding and blending: with normalisation layers removed (their per-tile statistics are the
    one thing tiling cannot reproduce), many overlapping tiles must reproduce the whole-volume result closely."""
    torch.manual_seed(0)
    vae = build_vae("tiny").eval()
    for module in list(vae.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, torch.nn.Identity())
    hu = thin_phantom.slices_first()[:20, :62, :58]
    x = _pad_air(hu, vae.total_stride)
    with torch.no_grad():
        whole_latent = vae.encode(x)[0][0]
        whole_image = vae.decode(whole_latent[None])[0, 0].clamp(-1, 1).numpy()[:20, :62, :58]
    tiled_latent = encode_volume(vae, hu, tile=(16, 48, 48), overlap=0.5, scaled=False)
    assert tiled_latent.shape == whole_latent.shape
    rel = float((tiled_latent - whole_latent).abs().mean() / whole_latent.abs().mean())
    assert rel < 0.02, rel
    # Decode tiles must be larger than the decoder's receptive field along the tiled axes (in-plane here).
    tiled_image = hu_to_model(decode_volume(vae, whole_latent, out_shape=hu.shape, tile=(20, 48, 48), overlap=0.5,
                                            scaled=False))
    err = float(np.abs(tiled_image - whole_image).mean())
    assert err < 0.12 * float(np.abs(whole_image - whole_image.mean()).mean()), err


def test_weights_round_trip_and_wrong_preset(tmp_path):
    torch.manual_seed(0)
    vae = build_vae("tiny")
    vae.set_scaling_factor(0.7)
    path = tmp_path / "vae.safetensors"
    digest = save_model(vae, "vae", "tiny", path)
    meta = read_metadata(path)
    assert meta["thinslice_kind"] == "vae" and meta["preset"] == "tiny" and weights_hash(path) == digest
    assert json.loads(meta["preset_config"])["vae"]["scaling_factor"] == 0.7
    loaded = load_model("vae", path, preset="tiny")
    assert loaded.scaling_factor == pytest.approx(0.7)
    for k, v in vae.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    with pytest.raises(ThinsliceError, match=r"preset 'tiny'.*but preset 'small'.*pass --preset tiny"):
        load_model("vae", path, preset="small")
    with pytest.raises(ThinsliceError, match="'vae' weights, but 'unet'"):
        load_model("unet", path)
    with pytest.raises(ThinsliceError, match="not found"):
        load_model("vae", tmp_path / "missing.safetensors")


def test_half_precision_copy_is_smaller_and_loads_as_float32(tmp_path):
    torch.manual_seed(0)
    vae = build_vae("tiny")
    full = tmp_path / "vae.safetensors"
    save_model(vae, "vae", "tiny", full)
    half = tmp_path / "half" / "vae.safetensors"
    digest = convert_weights(full, half, torch.float16, metadata={"note": "fp16 copy"})
    assert half.stat().st_size < 0.6 * full.stat().st_size
    meta = read_metadata(half)
    assert meta["content_hash"] == digest != weights_hash(full) and meta["note"] == "fp16 copy"
    loaded = load_model("vae", half, preset="tiny")
    for k, v in vae.state_dict().items():
        got = loaded.state_dict()[k]
        assert got.dtype == v.dtype
        torch.testing.assert_close(got, v, atol=1e-3, rtol=1e-3)
    with pytest.raises(ThinsliceError, match="overwrite its input"):
        convert_weights(full, full)


def test_train_vae_cli_lowers_loss(tmp_path, thin_phantom):
    from thinslice.io import write_volume

    data = tmp_path / "thin.nii.gz"
    write_volume(thin_phantom, data)
    before = data.read_bytes()
    assert main(["train-vae", "--data", str(data), "--preset", "tiny", "--out", str(data), "--max-steps", "1"]) == 2
    assert data.read_bytes() == before  # an --out that is the input file is refused, the input untouched
    out = tmp_path / "run"
    rc = main(["train-vae", "--data", str(data), "--preset", "tiny", "--out", str(out), "--max-steps", "12",
               "--device", "cpu", "--seed", "0"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    psnrs = [r["val/psnr"] for r in rows if "val/psnr" in r]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    assert psnrs[-1] > psnrs[0]
    final = load_model("vae", out)  # run folder -> final/vae.safetensors
    summary = json.loads((out / "final" / "summary.json").read_text())
    assert final.scaling_factor == pytest.approx(summary["scaling_factor"]) and final.scaling_factor != 1.0
    assert (out / "best" / "vae.safetensors").is_file()
    assert any((out / "tensorboard").iterdir())
    # Same folder again without --resume: refused with a one-line error.
    assert main(["train-vae", "--data", str(data), "--preset", "tiny", "--out", str(out), "--max-steps", "16",
                 "--device", "cpu"]) == 2


@pytest.mark.parametrize("strides", [(2, 2, 2), (1, 2, 2)])
def test_haar_first_stage_is_lossless_through_tiled_encode_decode(strides) -> None:
    """The wavelet first stage: orthonormal (energy kept), exactly invertible, and usable by the tiled whole-volume
    encode/decode in place of the VAE (odd sizes padded and cropped back)."""
    from thinslice.data.phantom import make_chest_phantom
    from thinslice.models.tiling import decode_volume, encode_volume
    from thinslice.models.wavelet import HaarFirstStage, WaveletConfig

    stage = HaarFirstStage(WaveletConfig(strides=strides))
    x = torch.randn(1, 1, 6, 10, 8)
    z, logvar = stage.encode(x)
    assert z.shape == (1, 8 if strides[0] == 2 else 4, 6 // strides[0], 5, 4) and not logvar.any()
    assert float(z.pow(2).sum()) == pytest.approx(float(x.pow(2).sum()), rel=1e-5)
    assert torch.allclose(stage.decode(z), x, atol=1e-5)
    hu = make_chest_phantom((21, 40, 36), (2.0, 2.0, 1.5), seed=1).slices_first()
    latent = encode_volume(stage, hu, tile=(8, 16, 16))
    back = decode_volume(stage, latent, out_shape=hu.shape, tile=(8, 16, 16))
    assert back.shape == hu.shape and np.abs(back - np.clip(hu, -1024, 3071)).max() < 0.05
    with pytest.raises(ThinsliceError, match="divisible"):
        stage.encode(torch.zeros(1, 1, 3, 5, 4))
