"""The network kinds table: a new kind is one row (saved, located, loaded and built through it), every shipped file
belongs to a row, and a weights file records its network's config plus what inference reads, no more."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from thinslice.checkpoints.bundle import (
    DEFAULT_BUNDLE_DIR,
    has_weights,
    load_model,
    locate_weights,
    read_manifest,
    save_model,
    weights_path,
)
from thinslice.checkpoints.files import loaded_preset, read_metadata, record_of
from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade import degrade
from thinslice.errors import ThinsliceError
from thinslice.infer import upsample
from thinslice.models import kinds
from thinslice.models.factory import build_baseline, build_denoiser, build_model, build_planes, build_vae
from thinslice.models.kinds import NetworkKind, network_kind, network_kinds, register_kind
from thinslice.presets import load_preset


@dataclass
class ToyConfig:
    channels: int = 3
    kernel: tuple[int, int, int] = (1, 3, 3)


class ToyNet(nn.Module):
    """A plug-in network: its config is no preset section, it carries it as ``.config``."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.conv = nn.Conv3d(1, config.channels, config.kernel)


TOY = NetworkKind("toy", ("toy",), ToyNet, "train-toy", variant="toy-v{}.safetensors", config_type=ToyConfig)


@pytest.fixture
def toy(monkeypatch):
    """The toy kind registered for one test (the table restored afterwards)."""
    monkeypatch.setattr(kinds, "_KINDS", dict(kinds._KINDS))
    return register_kind(TOY)


def test_a_new_kind_is_one_row_saved_located_loaded_and_built_through_it(toy, tmp_path) -> None:
    torch.manual_seed(0)
    net = build_model("toy", ToyConfig(channels=5))
    assert isinstance(net, ToyNet) and net.conv.out_channels == 5
    run = tmp_path / "run"
    digest = save_model(net, "toy", "tiny", run / "final")
    assert (run / "final" / "toy.safetensors").is_file() and has_weights("toy", run / "final")
    assert locate_weights(run, "toy") == run / "final"  # a training run: its final/ folder
    assert locate_weights(run / "final" / "toy.safetensors", ("toy",)) == run / "final"
    loaded = load_model("toy", run)
    assert isinstance(loaded, ToyNet) and loaded.config == net.config and not loaded.training
    for name, value in net.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name])
    record = record_of(loaded)
    assert record is not None and record.kind == "toy" and record.content_hash == digest
    assert json.loads(read_metadata(weights_path(run, "toy"))["preset_config"]) == {
        "name": "tiny", "toy": {"channels": 5, "kernel": [1, 3, 3]}}
    save_model(net, "toy", "tiny", run / "final" / toy.file_name(2))
    assert toy.variants_in(run / "final") == (2,)
    assert load_model("toy", run, variant=2).config == net.config


def test_a_missing_or_clashing_kind_is_a_one_line_error(toy, tmp_path) -> None:
    with pytest.raises(ThinsliceError, match=r"no trained weights for 'toy'.*`thinslice train-toy \.\.\.`"):
        locate_weights(tmp_path, "toy")
    with pytest.raises(ThinsliceError, match="unknown network kind 'nope'"):
        locate_weights(tmp_path, "nope")
    with pytest.raises(ThinsliceError, match="registered already"):
        register_kind(NetworkKind("toy", ("toy",), ToyNet, "train-other", config_type=ToyConfig))
    with pytest.raises(ThinsliceError, match="pass its ToyConfig"):
        build_model("toy", "tiny")


def test_the_table_has_a_row_for_every_shipped_file() -> None:
    shipped = sorted(DEFAULT_BUNDLE_DIR.glob("*.safetensors"))
    listed = read_manifest().get("weights", {})
    for name in [p.name for p in shipped] + list(listed):
        owners = [row for row in network_kinds() if row.owns(name)]
        assert len(owners) == 1, f"{name} belongs to {len(owners)} rows of the kinds table"
        if (DEFAULT_BUNDLE_DIR / name).is_file():
            assert read_metadata(DEFAULT_BUNDLE_DIR / name)["thinslice_kind"] == owners[0].name
    assert {"vae", "denoiser", "baseline", "planes"} <= {row.name for row in network_kinds()}


@pytest.mark.parametrize(("kind", "build"), [("vae", build_vae), ("denoiser", build_denoiser),
                                              ("baseline", build_baseline), ("planes", build_planes)])
def test_a_file_records_its_network_and_what_inference_reads(kind, build, tmp_path) -> None:
    """Not the whole preset: the row's sections and needs; what is recorded reads back as the preset's."""
    preset = load_preset("tiny")
    save_model(build(preset), kind, preset, tmp_path)
    row = network_kind(kind)
    record = json.loads(read_metadata(tmp_path / row.file)["preset_config"])
    assert set(record) == {"name", *row.sections, *(n.partition(".")[0] for n in row.needs)}
    model = load_model(kind, tmp_path, preset="tiny")
    have = loaded_preset(model)
    for need in (*row.sections, *row.needs):
        section, _, field = need.partition(".")
        mine, want = getattr(have, section), getattr(preset, section)
        assert (getattr(mine, field) == getattr(want, field)) if field else (mine == want)


def test_the_locator_prefers_an_explicit_file_then_the_folder_then_the_shipped_one(tmp_path) -> None:
    save_model(build_planes("tiny"), "planes", "tiny", tmp_path / "a")
    other = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(tmp_path / "a" / "planes.safetensors", other)
    assert weights_path(other, "planes") == other
    assert weights_path(tmp_path / "a", "planes") == tmp_path / "a" / "planes.safetensors"
    assert locate_weights(None, "planes") == DEFAULT_BUNDLE_DIR or not has_weights("planes")
    with pytest.raises(ThinsliceError, match="is a file; pass the folder"):
        locate_weights(other, "planes")
    with pytest.raises(ThinsliceError, match="not found") as err:
        locate_weights(tmp_path / "missing", "planes")
    assert "\n" not in str(err.value)


@pytest.mark.slow  # about 10-50 s on 2 cores; `pytest -m 'not slow'` skips it in a quick loop
@pytest.mark.skipif(not read_manifest(), reason="no weights ship in this checkout")
def test_shipped_networks_saved_again_give_the_same_outputs(tmp_path) -> None:
    """A slim record carries everything inference reads: each shipped network re-saved in the current format runs
    (with adaptation, which reads the training patch and plane sampling) exactly as the shipped file does."""
    for path in DEFAULT_BUNDLE_DIR.glob("*.safetensors"):
        row = next(r for r in network_kinds() if r.owns(path.name))
        model = load_model(row.name, path)
        record = record_of(model)
        assert record is not None
        extra = {k: v for k, v in record.metadata.items() if k == "vae_hash"}
        save_model(model, row.name, record.preset, tmp_path / path.name, extra)
    thick = degrade(make_chest_phantom(shape=(32, 48, 48), spacing=(3.0, 3.0, 1.25), seed=4), factor=4)
    runs = [("planes", {}), ("planes", {"adapt": True, "adapt_steps": 2}), ("cnn", {"adapt": True, "adapt_steps": 2})]
    if has_weights("denoiser"):
        runs.append(("ldm", {"progress": False}))
    for method, options in runs:
        if not has_weights("baseline" if method == "cnn" else "planes"):
            continue
        shipped = upsample(thick, 1.25, method, **options).slices_first()
        again = upsample(thick, 1.25, method, checkpoint=str(tmp_path), **options).slices_first()
        assert np.array_equal(shipped, again), method
