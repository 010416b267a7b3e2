"""The weights that ship inside the package: valid, paired, small enough, and usable by ``upsample`` as they are."""

from __future__ import annotations

import numpy as np
import pytest

from thinslice.checkpoints.bundle import (
    DEFAULT_BUNDLE_DIR,
    load_baseline,
    load_denoiser,
    load_planes,
    load_vae,
    read_manifest,
)
from thinslice.checkpoints.files import loaded_preset, record_of, weights_hash
from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade import degrade
from thinslice.degrade.operators import thick_profile_operator
from thinslice.infer import target_grid_volume, upsample
from thinslice.infer.consistency import consistency_residual_hu
from thinslice.infer.upsample import default_method, get_method
from thinslice.models.kinds import network_kind

# The package ships about 9 MB; the working tree that travels to a GPU for the one-call recipe is limited to
# 64 MiB with its data, so the weights stay small. The planes weights (all factors + per-factor) at most 5 MB.
SHIPPED_LIMIT_MB = 12.0
PLANES_LIMIT_MB = 5.0
manifest = read_manifest()
pytestmark = pytest.mark.skipif(not manifest, reason="no weights ship in this checkout")


@pytest.fixture(scope="module")
def thick():
    thin = make_chest_phantom(shape=(32, 64, 64), spacing=(3.0, 3.0, 1.25), seed=4)
    return degrade(thin, factor=4, profile="gaussian")


def test_size_manifest_and_default() -> None:
    files = sorted(DEFAULT_BUNDLE_DIR.glob("*.safetensors"))
    assert files, "a manifest without weights"
    total_mb = sum(f.stat().st_size for f in files) / 1e6
    assert total_mb < SHIPPED_LIMIT_MB, f"shipped weights are {total_mb:.1f} MB"
    planes_mb = sum(f.stat().st_size for f in DEFAULT_BUNDLE_DIR.glob("planes*.safetensors")) / 1e6
    assert planes_mb <= PLANES_LIMIT_MB, f"shipped planes weights are {planes_mb:.1f} MB"
    assert default_method() == manifest["default_method"]
    for name in manifest.get("weights", {}):
        assert (DEFAULT_BUNDLE_DIR / name).is_file(), f"manifest lists {name} but it is not shipped"


def test_every_shipped_network_loads_and_the_denoisers_match_their_first_stage() -> None:
    if get_method("ldm").has_weights():
        for path in DEFAULT_BUNDLE_DIR.glob("denoiser*.safetensors"):
            steps = network_kind("denoiser").variant_number(path.name)  # None: the default schedule
            denoiser = load_denoiser(DEFAULT_BUNDLE_DIR, steps=steps)
            latent = loaded_preset(denoiser).latent
            if latent.first_stage == "vae":
                vae_hash = weights_hash(DEFAULT_BUNDLE_DIR / network_kind("vae").file)
                assert record_of(load_vae(DEFAULT_BUNDLE_DIR)).content_hash == vae_hash
                assert record_of(denoiser).metadata["vae_hash"] == vae_hash
            else:  # the lossless wavelet stage: nothing to load, its strides are the record's
                assert record_of(denoiser).metadata["vae_hash"] == "haar-2x2x2" and latent.residual_scale > 0
            if latent.prior == "planes":
                assert (DEFAULT_BUNDLE_DIR / network_kind("planes").file).is_file()
    if get_method("cnn").has_weights():
        assert sum(p.numel() for p in load_baseline(DEFAULT_BUNDLE_DIR).parameters()) > 300_000
    # A specialist serves its factor (the x4/x5 network: both).
    for k in network_kind("planes").variants_in(DEFAULT_BUNDLE_DIR):
        assert k in load_planes(DEFAULT_BUNDLE_DIR, factor=k).factors


@pytest.mark.parametrize("method", ["ldm", "cnn", "planes"])
def test_shipped_method_upsamples_without_a_checkpoint(method, thick) -> None:
    if not get_method(method).has_weights():
        pytest.skip(f"no {method} weights shipped")
    options = {"steps": 4} if method == "ldm" and (DEFAULT_BUNDLE_DIR / "denoiser-4step.safetensors").is_file() else {}
    if method == "ldm":
        options["progress"] = False
    out = upsample(thick, 1.25, method=method, precision="bf16", **options)
    assert out.grid_differences(target_grid_volume(thick, 1.25)) == []
    assert np.all(np.isfinite(out.array))
    cubic = upsample(thick, 1.25, method="cubic")
    assert np.abs(out.array - cubic.array).mean() < 100.0  # a trained model stays near the data, in HU
    if method in ("ldm", "planes"):  # data consistency holds for the real model too
        a = thick_profile_operator(thick, 1.25, "gaussian")
        assert consistency_residual_hu(out.slices_first(), thick.slices_first(), a)["max_abs"] < 1.0


def test_a_preset_name_finds_the_shipped_weights_of_that_preset() -> None:
    """A preset name stands for the shipped weights of that preset (planes for small); a kind that is not shipped
    (the small preset's diffusion model runs on the lossless wavelet stage: no VAE ships) is a clear error."""
    from thinslice.checkpoints.bundle import load_model, weights_path
    from thinslice.errors import ThinsliceError

    shipped = DEFAULT_BUNDLE_DIR / network_kind("planes").file
    assert weights_path("small", "planes") == shipped
    assert record_of(load_model("planes", "small")).content_hash == weights_hash(shipped)
    for preset, kind in (("paper", "planes"), ("small", "vae")):
        with pytest.raises(ThinsliceError, match=f"no shipped {kind} weights for preset '{preset}'"):
            weights_path(preset, kind)
