"""Every trainer on two CPU processes, started by torchrun (gloo: the same DDP path as several GPUs).

Each launch checks what several processes must not get wrong: exit 0, one set of checkpoints and final weights
(written by the main process, each process's generators and example stream inside), the same weights in every
process at the end (``THINSLICE_RANK_HASHES``), each log line and warning once, and resume: a two-process checkpoint
continued with two processes gives the weights of an uninterrupted run, with one process it continues with a note on
the changed effective batch, and a one-process checkpoint continues with two. Launches are few (each costs the
imports of two processes), so each test combines several checks.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import thinslice
from thinslice.cli.main import main
from thinslice.data.phantom import make_chest_phantom
from thinslice.train.engine import list_checkpoints

TINY = ["--preset", "tiny", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """One small thin-slice phantom: the least a trainer needs (a launch stays a few seconds)."""
    from thinslice.io import write_volume

    folder = tmp_path_factory.mktemp("ddp_data")
    write_volume(make_chest_phantom(shape=(40, 48, 48), spacing=(4.5, 4.5, 1.25), seed=1), folder / "ct1.nii.gz")
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(args: list[str], hashes: Path) -> str:
    """``thinslice ARGS`` on two CPU processes via torchrun; returns stderr (asserting exit 0)."""
    src = str(Path(thinslice.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "THINSLICE_RANK_HASHES": str(hashes),
           "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "thinslice.cli.main", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def _lines(stderr: str) -> list[str]:
    """Our own log lines (not the progress bar's)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("thinslice ")]


def _same_weights_in_both(hashes: Path, step: int) -> str:
    """Both processes ended at ``step`` with the same weights; returns their hash."""
    ranks = [json.loads((hashes / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in ranks] == [step, step] and ranks[0]["processes"] == 2
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    return ranks[0]["sha256"]


def _once_each(stderr: str, *expected: str) -> None:
    """No log line twice (only the main process logs), and each expected one there exactly once."""
    lines = _lines(stderr)
    assert len(lines) == len(set(lines)), lines
    for text in expected:
        assert sum(text in line for line in lines) == 1, (text, lines)


def _one_run_written(run: Path, writers: int, final: str) -> None:
    """One set of checkpoints, each with every process's generators and example stream, one TensorBoard log and
    one set of final weights."""
    checkpoints = list_checkpoints(run)
    assert checkpoints and not list((run / "checkpoints").glob(".tmp_*"))
    for ckpt in checkpoints:
        assert json.loads((ckpt / "trainer_state.json").read_text())["num_processes"] == writers
        for r in range(writers):
            assert (ckpt / f"rng_{r}.safetensors").is_file()
            assert (ckpt / ("sampler.json" if r == 0 else f"sampler_{r}.json")).is_file()
    if writers == 2:  # the two processes drew different examples
        last = checkpoints[-1]
        assert (last / "sampler.json").read_text() != (last / "sampler_1.json").read_text()
    assert len(list((run / "tensorboard").rglob("events.out.tfevents.*"))) == 1
    assert [p.name for p in (run / "final").glob("*.safetensors")] == [final]


@pytest.mark.slow  # two launches (about 25 s on two idle cores)
def test_planes_on_two_processes_resumes_exactly_and_on_one(tmp_path, data, capfd) -> None:
    """train-planes (one factor's heads per step: the DDP case of unused parameters): two processes, then resume of
    its step-3 checkpoint with two (bit-exact) and with one (continues, says the effective batch changed)."""
    run = tmp_path / "planes"
    args = ["train-planes", "--data", str(data), *TINY, "--precision", "fp32"]
    err = _launch([*args, "--out", str(run)], tmp_path / "h_straight")
    straight = _same_weights_in_both(tmp_path / "h_straight", 6)
    _once_each(err, "final weights in")
    _one_run_written(run, 2, "planes.safetensors")
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]  # logged once per step

    for name in ("two", "one"):
        shutil.copytree(run, tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints" / "step_000006")
        shutil.rmtree(tmp_path / name / "final")
    err = _launch([*args, "--out", str(tmp_path / "two"), "--resume"], tmp_path / "h_resumed")
    assert _same_weights_in_both(tmp_path / "h_resumed", 6) == straight
    _once_each(err, "resumed from", "final weights in")
    assert "effective batch" not in err

    capfd.readouterr()
    assert main([*args, "--out", str(tmp_path / "one"), "--resume"]) == 0
    err = capfd.readouterr().err
    assert "written by 2 process(es), this run has 1: the effective batch is now 1 x --batch-size" in err
    state = json.loads((tmp_path / "one" / "checkpoints" / "step_000006" / "trainer_state.json").read_text())
    assert state["num_processes"] == 1 and (tmp_path / "one" / "final" / "planes.safetensors").is_file()


def test_baseline_one_process_checkpoint_continues_on_two(tmp_path, data, capfd) -> None:
    """train-baseline: a one-process run's checkpoint resumed by two processes (the second starts a new example
    stream); the lone warning of a run without --val is printed once."""
    run = tmp_path / "cnn"
    args = ["train-baseline", "--data", str(data), *TINY, "--out", str(run)]
    assert main([*args, "--max-steps", "1"]) == 0
    capfd.readouterr()
    err = _launch([*args, "--max-steps", "2", "--resume"], tmp_path / "h")
    _same_weights_in_both(tmp_path / "h", 2)
    _once_each(err, "no --val volumes", "written by 1 process(es), this run has 2", "final weights in")
    state = json.loads((list_checkpoints(run)[-1] / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["num_processes"] == 2
    assert (list_checkpoints(run)[-1] / "sampler_1.json").is_file()


@pytest.mark.parametrize("trainer", [["train-vae"], ["train", "--first-stage", "haar"]], ids=["vae", "haar"])
def test_vae_and_diffusion_on_two_processes(tmp_path, data, trainer) -> None:
    """train-vae (two networks under DDP with the patch GAN off) and the latent diffusion trainer on Haar latents
    (prior pairs built in each process, logged once)."""
    run = tmp_path / "run"
    err = _launch([*trainer, "--data", str(data), *TINY, "--out", str(run), "--max-steps", "2"], tmp_path / "h")
    _same_weights_in_both(tmp_path / "h", 2)
    final = "vae.safetensors" if trainer[0] == "train-vae" else "denoiser.safetensors"
    _one_run_written(run, 2, final)
    _once_each(err, "no --val volumes", "final weights")
    if trainer[0] == "train":
        assert any("prior pairs" in line for line in _lines(err))


def test_each_process_draws_its_own_examples(data) -> None:
    """Process 0 keeps the one-process stream (one-process runs unchanged), process 1 draws other examples, and a
    process joining a resumed run draws a stream of its own."""
    from thinslice.examples.planes import PlaneSampler
    from thinslice.presets import load_preset

    preset = load_preset("tiny")
    vol = make_chest_phantom(shape=(40, 48, 48), spacing=(4.5, 4.5, 1.25), seed=1)

    def first_batch(process: int | None, start: int = 0) -> np.ndarray:
        sampler = PlaneSampler([vol], preset.planes_data, preset.degradation, preset.planes, 2, seed=3)
        if process is not None:
            sampler.use_stream(process, start)
        return next(sampler)["hr"].numpy()

    plain = first_batch(None)
    assert np.array_equal(first_batch(0), plain)
    other = [first_batch(1), first_batch(1, start=3), first_batch(2)]
    assert all(not np.array_equal(b, plain) for b in other)
    assert not np.array_equal(other[0], other[1]) and not np.array_equal(other[0], other[2])
