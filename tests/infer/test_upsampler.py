"""One run, one object: the :class:`thinslice.Upsampler` that the CLI, batch, bench and Python users call."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from thinslice import Upsampler
from thinslice.checkpoints.bundle import save_model
from thinslice.cli.main import build_parser, main
from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade import degrade
from thinslice.errors import ThinsliceError
from thinslice.infer.planes import Planes
from thinslice.infer.upsample import upsample
from thinslice.io import read_volume, write_volume
from thinslice.models.factory import build_planes
from thinslice.presets import load_preset

SRC = Path(__file__).resolve().parents[2] / "src" / "thinslice"


@pytest.fixture(scope="module")
def planes_bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("planes")
    save_model(build_planes("tiny").eval(), "planes", "tiny", folder)
    return folder


def _thick(seed: int, slices: int = 40) -> object:
    thin = make_chest_phantom(shape=(slices, 32, 32), spacing=(4.5, 4.5, 1.25), seed=seed)
    return degrade(thin, factor=4, profile="gaussian")


def test_one_upsampler_loads_its_weights_once_for_many_volumes(planes_bundle, monkeypatch) -> None:
    loads = []
    real = Planes.load
    monkeypatch.setattr(Planes, "load", lambda self: (loads.append(1), real(self))[1])
    up = Upsampler("planes", spacing=1.25, checkpoint=str(planes_bundle), precision="fp32")
    volumes = [_thick(seed) for seed in (1, 2, 3)]
    results = [up(v) for v in volumes]
    assert len(loads) == 1
    for volume, result in zip(volumes, results, strict=True):
        alone = upsample(volume, 1.25, "planes", checkpoint=str(planes_bundle), precision="fp32")
        np.testing.assert_array_equal(result.volume.array, alone.array)  # the one-call form: the same voxels
        assert result.decision.method == "planes" and result.decision.spacing_mm == 1.25
        assert result.acquisition.profile == "gaussian"
    assert len(loads) == 1 + 3  # each one-call upsample loads again


def test_decide_snaps_the_spacing_and_says_why_auto_falls_back(planes_bundle) -> None:
    thick = _thick(1)  # 5 mm slices
    up = Upsampler("auto", checkpoint=str(planes_bundle))
    decision = up.decide(thick, 1.667)
    assert decision.spacing_mm == pytest.approx(5 / 3) and "taken as 1.66667 mm" in decision.notes[0]
    odd = up.decide(thick, 2.0)  # 5 / 2 is not a whole factor: planes cannot serve it
    assert odd.method == "cubic-dc" and odd.fallback and "auto: " in odd.fallback
    with pytest.raises(ThinsliceError, match="spacing"):
        up.decide(thick)  # neither the upsampler nor the call gives one


def test_options_are_checked_when_built(planes_bundle) -> None:
    with pytest.raises(ThinsliceError, match="unknown upsampling method 'nope'"):
        Upsampler("nope")
    with pytest.raises(ThinsliceError, match="does not use option"):
        Upsampler("cubic", profile="box")  # cubic models no slice profile
    with pytest.raises(ThinsliceError, match="must be int"):
        Upsampler("planes", adapt_steps="ten")  # a Python caller passes typed values
    with pytest.raises(ThinsliceError, match="positive number of mm"):
        Upsampler("cubic", spacing=0)
    lenient = Upsampler("cubic", strict=False, text=True, profile="box", seed="3")
    assert "does not use --profile, --seed; ignored" in lenient.decide(_thick(1), 1.25).notes[-1]
    typed = Upsampler("planes", strict=False, text=True, adapt_steps="12", checkpoint=str(planes_bundle))
    assert typed.options_of("planes")["adapt_steps"] == 12  # command-line text takes the declared type


def test_from_args_reads_the_command_line_and_its_quiet_flag(planes_bundle) -> None:
    args = build_parser().parse_args(["-q", "upsample", "in.nii.gz", "out.nii.gz", "--spacing", "1.25", "--method",
                                      "planes", "--checkpoint", str(planes_bundle), "--option", "orientations=coronal"])
    up = Upsampler.from_args(args)
    options = up.options_of("planes")
    assert options["orientations"] == "coronal" and options["progress"] is False and up.spacing == 1.25


def _flags(command: str) -> dict[str, tuple]:
    """Method flags of a command: option string -> (type name, choices, nargs), from its parser."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    titles = {"options of learned methods", "options of learned methods (ignored by linear/cubic)"}
    flags = {}
    for group in sub._action_groups:
        for action in group._group_actions:
            if group.title in titles or action.dest in ("profile", "thickness"):
                flags[action.option_strings[0]] = (getattr(action.type, "__name__", None), action.choices,
                                                   action.nargs, action.help)
    return flags


def test_batch_offers_exactly_the_method_flags_of_upsample() -> None:
    upsample_flags, batch_flags = _flags("upsample"), _flags("batch")
    assert len(upsample_flags) >= 14 and upsample_flags == batch_flags


def _write_inputs(folder: Path, seeds=(1, 2)) -> list[Path]:
    paths = []
    for seed in seeds:
        paths.append(write_volume(_thick(seed), folder / f"ct{seed}.nii.gz"))
    return paths


@pytest.mark.parametrize("method", ["cubic-dc", "planes"])
def test_cli_batch_and_python_give_the_same_voxels(method, planes_bundle, tmp_path) -> None:
    (path,) = _write_inputs(tmp_path / "in", seeds=(3,))
    extra = ["--checkpoint", str(planes_bundle)] if method == "planes" else []
    assert main(["upsample", str(path), str(tmp_path / "cli.nii.gz"), "--spacing", "1.25", "--method", method,
                 "--dtype", "float32", *extra]) == 0
    assert main(["-q", "batch", str(tmp_path / "in"), "--out", str(tmp_path / "batch"), "--spacing", "1.25",
                 "--method", method, "--dtype", "float32", *extra]) == 0
    options = {"checkpoint": str(planes_bundle)} if method == "planes" else {}
    python = Upsampler(method, **options)(read_volume(path), 1.25).volume
    cli, batch = read_volume(tmp_path / "cli.nii.gz"), read_volume(tmp_path / "batch" / "ct3.nii.gz")
    np.testing.assert_array_equal(cli.array, batch.array)
    np.testing.assert_array_equal(cli.array, python.array.astype(np.float32))


@pytest.fixture(scope="module")
def ldm_bundle(tmp_path_factory) -> Path:
    from thinslice.models.factory import build_denoiser
    from thinslice.models.vae import AutoencoderKL3D

    torch.manual_seed(0)
    preset = load_preset("tiny")
    folder = tmp_path_factory.mktemp("ldm")
    vae_hash = save_model(AutoencoderKL3D(preset.vae), "vae", preset, folder)
    save_model(build_denoiser(preset), "denoiser", preset, folder, {"vae_hash": vae_hash})
    return folder


def test_quiet_batch_prints_only_one_line_per_failed_case(ldm_bundle, tmp_path, capfd) -> None:
    folder = tmp_path / "in"
    _write_inputs(folder, seeds=(1,))
    (folder / "broken.nii.gz").write_bytes(b"not a volume")
    code = main(["-q", "batch", str(folder), "--out", str(tmp_path / "out"), "--spacing", "2.5", "--method", "ldm",
                 "--checkpoint", str(ldm_bundle), "--samples", "2"])
    out, err = capfd.readouterr()
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and re.match(r"thinslice batch: error: failed broken(\.nii\.gz)?: ", lines[0]), err
    assert (tmp_path / "out" / "ct1.nii.gz").is_file()  # the good case ran, without a progress bar


def test_snap_spacing_and_pipeline_building_live_in_one_module() -> None:
    """No other module snaps a spacing or builds and loads a method's pipeline: they ask an Upsampler."""
    snapping, building = set(), set()
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if re.search(r"(?<!def )\bsnap_spacing\(", text):
            snapping.add(path.relative_to(SRC).as_posix())
        if re.search(r"\.pipeline\(make_options\(|\bmake_options\(entry", text):
            building.add(path.relative_to(SRC).as_posix())
    assert snapping == {"infer/upsample.py"} and building == {"infer/upsample.py"}


def test_every_method_runs_the_shared_skeleton_and_keeps_no_state_between_calls() -> None:
    """Methods declare their named steps and override steps, never the skeleton itself; nothing a call computes
    is left on the class or the instance for the next call (a loaded pipeline serves many volumes)."""
    from thinslice.infer.pipeline import Pipeline
    from thinslice.infer.registry import UPSAMPLERS, available_methods

    available_methods()
    for entry in UPSAMPLERS.values():
        cls = entry.pipeline
        assert cls.__call__ is Pipeline.__call__, cls.name
        assert set(cls.steps) <= {"prior", "refine", "consistency", "spread"} and cls.steps[0] == "prior"
        mutable = [k for k, v in vars(cls).items() if isinstance(v, (dict, list, set)) and not k.startswith("__")]
        assert mutable == [], (cls.name, mutable)


def test_a_function_method_gets_the_acquisition(tmp_path) -> None:
    from thinslice.infer.registry import UPSAMPLERS, register_method

    seen = {}

    def toy(thick, spacing_mm, profile, thickness):
        seen.update(profile=profile, thickness=thickness)
        return upsample(thick, spacing_mm, "cubic")

    register_method("toy-fn", toy, options=("profile",))
    try:
        out = Upsampler("toy-fn", profile="box", thickness=6.0)(_thick(1), 1.25).volume
    finally:
        UPSAMPLERS.pop("toy-fn")
    assert seen == {"profile": "box", "thickness": 6.0} and out.num_slices > _thick(1).num_slices
