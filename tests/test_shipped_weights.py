"""The weights that ship inside the package: valid, paired, small enough, and usable by ``upsample`` as they are."""

from __future__ import annotations

import numpy as np
import pytest

from thinslice.checkpoints.bundle import (
    DEFAULT_BUNDLE_DIR,
    FILES,
    load_baseline,
    load_denoiser,
    load_vae,
    read_manifest,
)
from thinslice.checkpoints.files import record_of, weights_hash
from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade import degrade
from thinslice.infer import target_grid_volume, upsample
from thinslice.infer.consistency import consistency_residual_hu, thick_profile_operator
from thinslice.infer.upsample import default_method, get_method

SHIPPED_LIMIT_MB = 40.0
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
    assert default_method() == manifest["default_method"]
    for name in manifest.get("weights", {}):
        assert (DEFAULT_BUNDLE_DIR / name).is_file(), f"manifest lists {name} but it is not shipped"


def test_every_shipped_network_loads_and_the_denoisers_match_the_vae() -> None:
    if get_method("ldm").has_weights():
        vae_hash = weights_hash(DEFAULT_BUNDLE_DIR / FILES["vae"])
        assert record_of(load_vae(DEFAULT_BUNDLE_DIR)).content_hash == vae_hash
        for path in DEFAULT_BUNDLE_DIR.glob("denoiser*.safetensors"):
            steps = None if path.name == FILES["denoiser"] else int(path.stem.split("-")[1].removesuffix("step"))
            denoiser = load_denoiser(DEFAULT_BUNDLE_DIR, steps=steps)
            assert record_of(denoiser).metadata["vae_hash"] == vae_hash
    if get_method("cnn").has_weights():
        assert sum(p.numel() for p in load_baseline(DEFAULT_BUNDLE_DIR).parameters()) > 300_000


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


def test_a_preset_name_finds_the_shipped_weights_of_that_preset(tmp_path) -> None:
    """`thinslice encode --vae small` (as its help says) loads the shipped VAE; another preset is a clear error."""
    from thinslice.checkpoints.files import load_model, resolve_weights_path
    from thinslice.cli.main import main
    from thinslice.errors import ThinsliceError

    assert resolve_weights_path("small", "vae") == DEFAULT_BUNDLE_DIR / FILES["vae"]
    assert record_of(load_model("vae", "small")).content_hash == record_of(load_vae(DEFAULT_BUNDLE_DIR)).content_hash
    with pytest.raises(ThinsliceError, match="no shipped vae weights for preset 'paper'"):
        resolve_weights_path("paper", "vae")
    data = tmp_path / "data"
    data.mkdir()
    from thinslice.io import write_volume

    write_volume(make_chest_phantom(shape=(24, 64, 64), spacing=(3.0, 3.0, 1.25), seed=2), data / "ct.nii.gz")
    assert main(["encode", "--data", str(data), "--vae", "small", "--out", str(tmp_path / "cache"),
                 "--factors", "2", "--profiles", "gaussian"]) == 0
