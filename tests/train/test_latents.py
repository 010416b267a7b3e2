"""Latent cache: HR + simulated-thick latents, reuse, and refusal of stale caches."""

from __future__ import annotations

import os

import pytest
import torch

from thinslice.checkpoints.bundle import save_model
from thinslice.cli.main import main
from thinslice.data.phantom import make_chest_phantom
from thinslice.errors import ThinsliceError
from thinslice.io import write_volume
from thinslice.models.factory import build_vae
from thinslice.train.latents import LatentCache, build_latent_cache


@pytest.fixture()
def setup(tmp_path):
    vol = make_chest_phantom(shape=(16, 32, 32), spacing=(6.0, 6.0, 1.25), seed=2)
    src = tmp_path / "thin.nii.gz"
    write_volume(vol, src)
    torch.manual_seed(0)
    vae = build_vae("tiny")
    vae.set_scaling_factor(1.5)
    weights = tmp_path / "vae.safetensors"
    digest = save_model(vae, "vae", "tiny", weights)
    return tmp_path, src, vae.eval(), weights, digest


def test_cli_encode_then_load_and_detect_stale(setup):
    tmp_path, src, vae, weights, digest = setup
    out = tmp_path / "cache"
    assert main(["encode", "--data", str(src), "--vae", str(weights), "--out", str(out), "--factors", "2",
                 "--profiles", "gaussian", "--device", "cpu", "--tile", "16", "32", "32"]) == 0
    cache = LatentCache.load(out, digest)
    assert cache.scaling_factor == 1.5 and len(cache.hr()) == 1
    (pair,) = cache.pairs(factor=2.0, profile="gaussian")
    tensors = cache.read(pair)
    assert tensors["hr"].shape == tensors["lr"].shape and tensors["hr"].shape[0] == 4
    hr = cache.read(cache.hr()[0])["hr"]
    assert hr.shape == (4, 16, 16, 16)  # tiny VAE: stride (1, 2, 2)
    # The LR latent differs from the HR one (it was degraded) but not wildly.
    assert 0 < float((tensors["lr"] - tensors["hr"]).abs().mean()) < float(tensors["hr"].abs().mean())

    with pytest.raises(ThinsliceError, match="another|made with VAE weights"):
        LatentCache.load(out, "0123456789abcdef")
    # Same size, new content and mtime: stale.
    vol = make_chest_phantom(shape=(16, 32, 32), spacing=(6.0, 6.0, 1.25), seed=3)
    write_volume(vol, src, overwrite=True)
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ThinsliceError, match="stale"):
        LatentCache.load(out, digest)


def test_rebuild_reuses_valid_entries(setup):
    tmp_path, src, vae, _, digest = setup
    out = tmp_path / "cache"
    messages: list[str] = []
    build_latent_cache([src], vae, digest, out, factors=[], tile=(16, 32, 32), progress=messages.append)
    assert messages == ["encode: thin__hr.safetensors"]
    messages.clear()
    cache = build_latent_cache([src], vae, digest, out, factors=[], tile=(16, 32, 32), progress=messages.append)
    assert messages == [] and len(cache.entries) == 1  # nothing re-encoded
    build_latent_cache([src], vae, "otherhash", out, factors=[], tile=(16, 32, 32), progress=messages.append)
    assert any("another VAE" in m for m in messages) and messages[-1] == "encode: thin__hr.safetensors"
