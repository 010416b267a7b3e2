"""Thin grid, through-plane interpolation, the upsample registry and the upsample CLI."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from thinslice.cli.main import main
from thinslice.degrade import degrade
from thinslice.errors import ThinsliceError
from thinslice.infer import (
    UPSAMPLERS,
    available_methods,
    interpolate_slices,
    register_method,
    target_grid_volume,
    thin_grid,
    upsample,
)
from thinslice.io.volume import Volume


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("profile", ["box", "gaussian", "decimate"])
def test_upsample_grid_is_the_original_thin_grid(thin_phantom: Volume, k: int, profile: str) -> None:
    thick = degrade(thin_phantom, factor=k, profile=profile)
    out = upsample(thick, thin_phantom.slice_spacing, method="linear")
    n = thick.num_slices * k
    expected = thin_phantom.with_slices(thin_phantom.slices_first()[:n], thin_phantom.slice_spacing, 0.0)
    assert out.grid_differences(expected) == []
    assert out.slice_thickness == pytest.approx(thin_phantom.slice_spacing)
    assert target_grid_volume(thick, thin_phantom.slice_spacing).grid_differences(expected) == []


def _z_volume(values_of_z, n: int = 30, spacing: float = 5.0) -> Volume:
    z = 12.0 + np.arange(n) * spacing
    array = np.broadcast_to(values_of_z(z)[:, None, None], (n, 4, 3)).astype(np.float32)
    return Volume(array, spacing=(0.7, 0.7, spacing), origin=(1.0, 2.0, 12.0))


def test_linear_is_exact_on_a_linear_ramp_and_clamps_outside() -> None:
    thick = _z_volume(lambda z: 3.0 * z - 40.0)
    out = upsample(thick, 1.0, method="linear")
    z = out.slice_positions_mm()
    assert out.num_slices == 150 and z[0] == pytest.approx(12.0 - 2.0)
    expected = 3.0 * np.clip(z, 12.0, 12.0 + 29 * 5.0) - 40.0  # clamped beyond the first/last thick centres
    np.testing.assert_allclose(out.slices_first()[:, 2, 1], expected, atol=1e-3)


def test_cubic_is_exact_on_a_quadratic_in_the_interior() -> None:
    thick = _z_volume(lambda z: 0.02 * (z - 80.0) ** 2 - 30.0)
    out = upsample(thick, 1.25, method="cubic")
    z = out.slice_positions_mm()
    inside = (z > 12.0 + 10 * 5.0) & (z < 12.0 + 19 * 5.0)
    expected = 0.02 * (z[inside] - 80.0) ** 2 - 30.0
    np.testing.assert_allclose(out.slices_first()[inside, 0, 0], expected, atol=1e-3)
    linear = upsample(thick, 1.25, method="linear").slices_first()[inside, 0, 0]
    assert np.abs(linear - expected).max() > 0.05  # linear is not exact here: the test can tell them apart


def test_cubic_matches_map_coordinates_nearest() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(9, 5, 6)).astype(np.float32)
    centres = 10.0 + np.arange(9) * 4.0
    targets = np.linspace(6.0, 48.0, 37)
    out = interpolate_slices(data, centres, targets, method="cubic", chunk_rows=2)
    u = np.clip((targets - 10.0) / 4.0, 0, 8)
    coords = np.meshgrid(u, np.arange(5), np.arange(6), indexing="ij")
    expected = ndimage.map_coordinates(data.astype(np.float64), coords, order=3, mode="nearest")
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_thin_grid_counts_and_offsets() -> None:
    thick = _z_volume(lambda z: z, n=10, spacing=5.0)
    assert thin_grid(thick, 1.0) == (50, pytest.approx(-2.0))
    assert thin_grid(thick, 2.0) == (25, pytest.approx(-1.5))
    assert thin_grid(thick, 5.0) == (10, pytest.approx(0.0))
    with pytest.raises(ThinsliceError, match="coarser than the input"):
        thin_grid(thick, 6.0)


def test_registry_errors_and_plugins() -> None:
    thick = _z_volume(lambda z: z, n=6)
    assert {"linear", "cubic"} <= set(available_methods())
    with pytest.raises(ThinsliceError, match="available methods are .*cubic.*linear"):
        upsample(thick, 1.0, method="sinc")
    with pytest.raises(ThinsliceError, match="does not use option"):
        upsample(thick, 1.0, method="cubic", steps=10)
    assert upsample(thick, 1.0, method="cubic", steps=None).num_slices == 30  # None = not given

    seen = {}

    def fake(vol: Volume, spacing_mm: float, steps: int = 1) -> Volume:
        seen["steps"] = steps
        return upsample(vol, spacing_mm, method="linear")

    register_method("test-fake", fake, options=("steps",))
    try:
        out = upsample(thick, 2.5, method="test-fake", steps=7)
        assert seen == {"steps": 7} and out.num_slices == 12
    finally:
        UPSAMPLERS.pop("test-fake")


def test_cli_upsample(thin_phantom: Volume, tmp_path, capsys) -> None:
    from thinslice.io import read_volume, write_volume

    thick = degrade(thin_phantom, factor=4, profile="gaussian")
    src = tmp_path / "thick.nii.gz"
    write_volume(thick, src, dtype="float32")
    out = tmp_path / "up.nii.gz"
    assert main(["upsample", str(src), str(out), "--spacing", "1.25", "--method", "cubic", "--steps", "5"]) == 0
    captured = capsys.readouterr()
    assert "48 slices" in captured.out and "--steps" in captured.err  # the unused option is reported as ignored
    up = read_volume(out)
    expected = upsample(thick, 1.25, method="cubic")
    assert up.grid_differences(expected) == []
    np.testing.assert_allclose(up.array, np.rint(expected.array), atol=1.0)

    assert main(["upsample", str(src), str(src), "--spacing", "1.25"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert main(["upsample", str(src), str(out), "--spacing", "1.25", "--method", "nope", "--overwrite"]) == 2
    assert "available methods are" in capsys.readouterr().err


def test_every_registered_method_comes_from_a_listed_module() -> None:
    """Methods are listed, not found by a text search: every registered pipeline is defined in the registry itself
    or in a module of METHOD_MODULES, and every listed module registers at least one pipeline."""
    from thinslice.infer.upsample import METHOD_MODULES, UPSAMPLERS, method_modules

    available_methods()
    origins = {entry.pipeline.__module__ for entry in UPSAMPLERS.values()}
    assert origins <= {"thinslice.infer.registry", *method_modules()}
    assert set(METHOD_MODULES) <= origins
    assert {"cnn", "ldm", "planes"} <= set(available_methods())
