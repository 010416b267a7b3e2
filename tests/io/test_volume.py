import numpy as np
import pytest

from thinslice.data.phantom import make_chest_phantom
from thinslice.errors import ThinsliceError
from thinslice.io.volume import Volume
from thinslice.presets import PRESET_NAMES, load_preset


def test_2d_image_rejected():
    with pytest.raises(ThinsliceError, match="3D"):
        Volume(np.zeros((4, 4), np.float32), spacing=(1, 1, 1))


def test_missing_spacing_rejected():
    with pytest.raises(ThinsliceError, match="spacing"):
        Volume(np.zeros((4, 4, 4), np.float32), spacing=(1, 0, 1))


def test_slice_axis_from_geometry_not_array_order():
    # thick axis is index axis i (the last numpy axis): a sagittally stacked volume
    vol = Volume(np.zeros((10, 20, 30), np.float32), spacing=(5.0, 0.8, 0.8))
    assert vol.slice_axis == 0
    assert vol.slices_first().shape == (30, 10, 20)
    # isotropic: the axis along patient head-feet wins
    direction = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], float)  # index j runs along patient z
    iso = Volume(np.zeros((10, 20, 30), np.float32), spacing=(1, 1, 1), direction=direction)
    assert iso.slice_axis == 1


def test_with_slices_moves_origin_along_slice_direction():
    vol = Volume(np.zeros((10, 4, 4), np.float32), spacing=(1, 1, 2), origin=(0, 0, 10))
    new = vol.with_slices(np.zeros((3, 4, 4)), slice_spacing=6.0, first_slice_offset_mm=2.0)
    assert new.spacing == (1.0, 1.0, 6.0)
    assert np.allclose(new.origin, (0, 0, 12))


def test_phantom_contains_lung_soft_tissue_bone():
    vol = make_chest_phantom(shape=(24, 64, 64), spacing=(4.5, 4.5, 2.5), seed=3)
    a = vol.array
    assert (a < -700).mean() > 0.2  # air + lungs
    assert ((a > -50) & (a < 100)).mean() > 0.1  # soft tissue
    assert (a > 300).any()  # bone


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_load(name):
    preset = load_preset(name)
    assert preset.name == name
    assert len(preset.vae.strides) == len(preset.vae.channels) - 1


def test_unknown_preset_message():
    with pytest.raises(ThinsliceError, match="tiny, small, paper"):
        load_preset("huge")


def test_thin_result_keeps_the_slice_axis_of_its_thick_input():
    from thinslice.infer.consistency import make_consistent
    from thinslice.infer.upsample import upsample

    # a coronal stack: 4 mm slices along index axis j; once upsampled to 0.8 mm the result is isotropic
    rng = np.random.default_rng(0)
    thick = Volume(rng.normal(0, 100, (12, 10, 12)).astype(np.float32), spacing=(0.8, 4.0, 0.8))
    assert thick.slice_axis == 1
    thin = upsample(thick, 0.8, method="cubic")
    assert np.allclose(thin.spacing, (0.8, 0.8, 0.8)) and thin.slice_axis == 1
    assert thin.shape_ijk == (12, 50, 12)
    consistent, _report = make_consistent(thin, thick, "gaussian", None)
    assert consistent.slice_axis == 1 and consistent.shape_ijk == thin.shape_ijk
