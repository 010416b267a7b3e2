"""The training engine shared by every trainer (VAE, latent diffusion, CNN baseline), built on HF Accelerate.

A trainer supplies the networks to optimise, a ``loss_fn(models, batch, step) -> (loss, logs)``, an endless batch
iterator and optionally a ``validate_fn(models, step) -> dict``; the engine does the rest: AdamW with linear warm-up +
cosine decay, gradient clipping, EMA, mixed precision, TensorBoard scalars and slice images, a progress bar,
atomic checkpoints (``run_dir/checkpoints/step_XXXXXX/``, the last ``keep_checkpoints`` kept), exact resume, and the
best/final weights as self-describing safetensors files (``run_dir/best/<name>.safetensors``,
``run_dir/final/<name>.safetensors``; EMA weights when EMA is on).

Exact resume: a checkpoint holds models, optimiser, LR scheduler, EMA, step/best metric, the Python/numpy/torch RNG
states and the state of the batch iterator when it has ``state_dict``/``load_state_dict`` (e.g.
:class:`thinslice.examples.base.ExampleSampler` with its one numpy Generator), all as safetensors + JSON
(:mod:`thinslice.train.run_state`; never pickle, so a file planted in a run folder cannot run code on ``--resume``).
So N steps straight and N/2 + resume + N/2 give the same weights on CPU (tested).

Several processes (GPUs, CPU processes, machines): start any trainer with ``torchrun --nproc_per_node N -m
thinslice.cli.main train-...`` or ``accelerate launch``; models and optimiser go through ``accelerator.prepare``
(DDP: rank 0's initial weights are broadcast, gradients are averaged, so the weights stay identical), and process
r draws its own examples (:meth:`thinslice.examples.base.ExampleSampler.use_stream`; process 0 keeps the
one-process stream), so the effective batch is ``batch_size x num_processes``. The LR scheduler is stepped once per
optimiser step here (not prepared by Accelerate, which would step it once per process), so
``warmup_steps``/``max_steps`` always count optimiser steps. Only the main process logs, validates, writes
TensorBoard, ``metrics.jsonl``, the progress bar and the exported weights; the logged training scalars are means
over all processes. A checkpoint holds each process's generators and example stream (``rng_<r>``,
``sampler``/``sampler_<r>``) and the number of processes that wrote it: resumed with as many processes it continues
exactly; with another count the shared state (weights, optimiser, schedule, step) carries over, processes beyond
the old count start new example streams, and the effective batch changes (a one-line note says so).
``THINSLICE_RANK_HASHES=DIR`` makes every process write ``DIR/rank<r>.json`` (the SHA-256 of its final weights) at
the end of training: the check that the processes ended with the same weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from thinslice.errors import ThinsliceError
from thinslice.examples.fit import warmup_cosine  # the LR schedule, shared with --adapt
from thinslice.io.atomic import write_text_atomic
from thinslice.presets import Preset, TrainConfig
from thinslice.train.run_state import read_state, refuse_pickles, rng_state, set_rng_state, write_state

LossFn = Callable[[dict[str, nn.Module], Any, int], tuple[torch.Tensor, dict[str, float]]]
ValidateFn = Callable[[dict[str, nn.Module], int], dict[str, Any]]
ExportFn = Callable[[dict[str, nn.Module], Path], None]

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")
MIXED_PRECISION = ("no", "fp16", "bf16")
CHECKPOINT_PREFIX = "step_"
# Written into each checkpoint's trainer_state.json; checkpoints without it are Accelerate's pickle-based ones.
CHECKPOINT_FORMAT = "thinslice-state-2"


@dataclass
class EngineConfig:
    """How to train (not what): steps, optimiser, schedule, logging/checkpoint cadence, device."""

    run_dir: Path
    max_steps: int
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    val_every: int = 0
    checkpoint_every: int = 0
    log_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "no"
    # Validation key that picks the best checkpoint (e.g. "val/psnr"); mode "max" or "min".
    best_metric: str | None = None
    best_mode: str = "max"
    # DDP option needed when some parameters are unused in some steps (e.g. a discriminator before its warm-up).
    find_unused_parameters: bool = False
    progress: bool = True
    lr_scales: dict[str, float] = field(default_factory=dict)


class _TrainState:
    """Step counter and best metric, checkpointed with everything else."""

    def __init__(self) -> None:
        self.step = 0
        self.best: float | None = None
        self.best_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.best = state["best"]
        self.best_step = state["best_step"]


@dataclass
class TrainResult:
    step: int
    best: float | None
    best_step: int | None
    run_dir: Path
    models: dict[str, nn.Module]  # final weights (EMA where EMA is on), unwrapped, eval mode
    last_logs: dict[str, float] = field(default_factory=dict)


def train_config(base: TrainConfig, max_steps: int | None = None, batch_size: int | None = None,
                 lr: float | None = None, val_every: int | None = None) -> TrainConfig:
    """The preset's training settings with the command line's overrides."""
    tc = replace(base)
    if max_steps is not None:
        if max_steps < 1:
            raise ThinsliceError(f"--max-steps must be at least 1, got {max_steps}")
        tc.max_steps = int(max_steps)
    if batch_size is not None:
        if batch_size < 1:
            raise ThinsliceError(f"--batch-size must be at least 1, got {batch_size}")
        tc.batch_size = int(batch_size)
    if lr is not None:
        if not lr > 0:
            raise ThinsliceError(f"--lr must be positive, got {lr}")
        tc.lr = float(lr)
    if val_every is not None:
        tc.val_every = int(val_every)
    return tc


@dataclass(kw_only=True)
class RunOptions:
    """What every trainer takes from the command line; None means the preset's value. Trainers add their own."""

    run_dir: Path
    preset: Preset | str = "small"
    max_steps: int | None = None
    device: str = "auto"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int | None = None
    resume: bool = False
    batch_size: int | None = None
    lr: float | None = None
    ema_decay: float | None = None
    val_every: int | None = None
    val_crop: tuple[int, int, int] | None = None  # default: the trainer's own
    time_limit_s: float | None = None
    stop_at_step: int | None = None
    progress: bool = True


def run_settings(base: TrainConfig, opts: RunOptions) -> tuple[TrainConfig, int, float | None]:
    """Settings of one training run, shared by every trainer: the preset's ``base`` with the overrides in ``opts``,
    checked; returns (settings, seed, EMA decay)."""
    tc = train_config(base, opts.max_steps, opts.batch_size, opts.lr, opts.val_every)
    seed = tc.seed if opts.seed is None else int(opts.seed)
    ema_decay = tc.ema_decay if opts.ema_decay is None else float(opts.ema_decay)
    return tc, seed, ema_decay


TRAIN_RECORD = "train_config.json"


def engine_config(run_dir: Path, tc: TrainConfig, opts: RunOptions, seed: int,
                  ema_decay: float | None) -> EngineConfig:
    """How every trainer runs the engine: the run's settings and command-line options, best weights by val PSNR."""
    return EngineConfig(
        run_dir=run_dir, max_steps=tc.max_steps, lr=tc.lr, weight_decay=tc.weight_decay,
        warmup_steps=tc.warmup_steps, grad_clip=1.0, ema_decay=ema_decay or None, val_every=tc.val_every,
        checkpoint_every=tc.checkpoint_every, log_every=tc.log_every, seed=seed, device=opts.device,
        mixed_precision=opts.mixed_precision, best_metric="val/psnr", best_mode="max", progress=opts.progress,
    )


def check_run_record(run_dir: Path, record: dict[str, Any], resume: bool, keys: Sequence[str]) -> None:
    """A resumed run must use what it started with (VAE, schedule, control, preset architecture)."""
    path = Path(run_dir) / TRAIN_RECORD
    if not (resume and path.is_file()):
        return
    old = json.loads(path.read_text())
    for key in keys:
        if key in old and json.loads(json.dumps(record.get(key))) != old[key]:
            raise ThinsliceError(
                f"{run_dir} was started with {key} = {old[key]!r}, now {record.get(key)!r}; resume with the same "
                "settings (--vae/--steps/--no-control/--preset) or choose another --out folder"
            )


def fit_run(trainer: Trainer, opts: RunOptions, record: dict[str, Any], preset: Preset,
            summary: dict[str, Any] | None = None) -> TrainResult:
    """The shared tail of every trainer: record what the run was started with (``train_config.json``,
    ``preset.json``), train, and once ``max_steps`` is reached write ``final/summary.json``."""
    run_dir = trainer.run_dir
    if trainer.is_main:
        write_text_atomic(run_dir / TRAIN_RECORD, json.dumps(record, indent=1, default=str))
        write_text_atomic(run_dir / "preset.json", json.dumps(preset.to_dict(), indent=1))
    result = trainer.fit(resume=opts.resume, stop_at_step=opts.stop_at_step, time_limit_s=opts.time_limit_s)
    if result.step >= trainer.config.max_steps and trainer.is_main:
        final = {"step": result.step, **(summary or {}), "best_val_psnr": result.best, "best_step": result.best_step,
                 **{k: v for k, v in result.last_logs.items() if isinstance(v, float)}}
        write_text_atomic(run_dir / "final" / "summary.json", json.dumps(final, indent=1))
        best = f"{result.best:.2f} dB" if result.best is not None else "n/a"
        log.info("%s: final weights in %s (best val PSNR %s at step %s)", record.get("kind", "train"),
                 run_dir / "final", best, result.best_step)
    return result


def make_accelerator(device: str, mixed_precision: str, project_dir: Path | None,
                     find_unused_parameters: bool = False, log: bool = True):
    """An ``Accelerator`` for ``--device``/``--mixed-precision`` with a clear error for impossible combinations."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    if device not in DEVICES:
        raise ThinsliceError(f"unknown --device '{device}': use one of {', '.join(DEVICES)}")
    if mixed_precision not in MIXED_PRECISION:
        raise ThinsliceError(f"unknown --mixed-precision '{mixed_precision}': use one of {', '.join(MIXED_PRECISION)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ThinsliceError("--device cuda requested but no CUDA GPU is available; use --device cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ThinsliceError("--device mps requested but Apple MPS is not available; use --device cpu")
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available()
                              and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()))
    if mixed_precision == "fp16" and cpu:
        raise ThinsliceError("--mixed-precision fp16 needs a GPU; on CPU use bf16 or no")
    # Accelerate keeps process-wide state; a second trainer in the same (single) process with other settings would
    # be refused, so start from scratch when not distributed (tests, notebooks, scripts running several trainers).
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    _note_one_cpu_process()
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else None
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, log_with="tensorboard" if log else None,
                       project_dir=str(project_dir) if project_dir else None, kwargs_handlers=handlers)


def _note_one_cpu_process() -> None:
    """``accelerate launch --cpu --num_processes N`` starts one process (Accelerate runs several CPU processes only
    under mpirun) and says nothing; a run that expected N would train with 1/N of the batch it planned, so say it."""
    env = os.environ
    if (env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and "MASTER_PORT" in env
            and "WORLD_SIZE" not in env and "PMI_SIZE" not in env and "OMPI_COMM_WORLD_SIZE" not in env):
        log.warning("accelerate launch --cpu started one process, whatever --num_processes says; for several CPU "
                    "processes use torchrun --nproc_per_node N -m thinslice.cli.main ... (or accelerate launch "
                    "--multi_gpu --num_processes N ... --device cpu)")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def warmup_ema_fn(decay: float) -> Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], Any], None]:
    """EMA update whose decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates.

    torch's ``get_ema_multi_avg_fn`` uses the full decay from the first step, so a short run (a CPU hour, a
    few hundred steps) exports weights that are still mostly the initial ones; the warm-up (as in diffusers'
    EMAModel) lets the average follow the model early and smooth it later.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")

    @torch.no_grad()
    def update(ema_params: Sequence[torch.Tensor], model_params: Sequence[torch.Tensor], num_averaged: Any) -> None:
        n = float(num_averaged)
        step_decay = min(decay, (1.0 + n) / (10.0 + n))
        floating = [(e, m) for e, m in zip(ema_params, model_params, strict=True) if torch.is_floating_point(e)]
        if floating:
            torch._foreach_lerp_([e for e, _ in floating], [m for _, m in floating], 1.0 - step_decay)
        for e, m in zip(ema_params, model_params, strict=True):
            if not torch.is_floating_point(e):
                e.copy_(m)

    return update


class _Meter:
    """Training scalars averaged over the steps since the last log line."""

    def __init__(self) -> None:
        self.window: dict[str, list[float]] = {}
        self.since = time.time()
        self.last: dict[str, float] = {}

    def add(self, loss: float, logs: dict[str, float], grad_norm: float | None) -> None:
        self.window.setdefault("loss", []).append(loss)
        for k, v in logs.items():
            self.window.setdefault(k, []).append(v)
        if grad_norm is not None:
            self.window.setdefault("grad_norm", []).append(grad_norm)

    def flush(self, lr: float) -> dict[str, float]:
        now = time.time()
        n = len(self.window.get("loss", []))
        self.last = {f"train/{k}": float(np.mean(v)) for k, v in self.window.items()}
        self.last["train/lr"] = lr
        self.last["train/sec_per_step"] = (now - self.since) / max(1, n)
        self.window, self.since = {}, now
        return dict(self.last)


class Trainer:
    """Generic optimisation loop. See the module docstring for what it does and how resume works."""

    def __init__(
        self,
        models: dict[str, nn.Module],
        loss_fn: LossFn,
        batches: Iterable[Any],
        config: EngineConfig,
        validate_fn: ValidateFn | None = None,
        export_fn: ExportFn | None = None,
        trainable: list[str] | None = None,
    ) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.loss_fn = loss_fn
        self.validate_fn = validate_fn
        self.export_fn = export_fn
        self.trainable = list(trainable) if trainable is not None else list(models)
        unknown = set(self.trainable) - set(models)
        if unknown:
            raise ValueError(f"trainable names {sorted(unknown)} are not among the models {sorted(models)}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator = make_accelerator(config.device, config.mixed_precision, self.run_dir,
                                            config.find_unused_parameters, log=True)
        acc = self.accelerator
        self.device = acc.device
        self.is_main = acc.is_main_process

        names = list(models)
        prepared = acc.prepare(*[models[n] for n in names])
        prepared = prepared if isinstance(prepared, (list, tuple)) else (prepared,)
        self.models: dict[str, nn.Module] = dict(zip(names, prepared, strict=True))
        self.optimizer = acc.prepare(self._make_optimizer())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer,
            warmup_cosine(config.warmup_steps, config.max_steps, config.min_lr_ratio))
        # EMA copies of the trainable networks (on the same device).
        self.ema: dict[str, AveragedModel] = {}
        if config.ema_decay:
            for name in self.trainable:
                self.ema[name] = AveragedModel(acc.unwrap_model(self.models[name]),
                                               multi_avg_fn=warmup_ema_fn(config.ema_decay), use_buffers=True)
                self.ema[name].requires_grad_(False)
        self.state = _TrainState()
        self.batches = batches
        self.rank, self.world = acc.process_index, acc.num_processes
        if hasattr(batches, "use_stream"):
            batches.use_stream(self.rank)
        self._iter: Iterator[Any] | None = None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """One AdamW over all trainable parameters (per-model LR scale as parameter groups)."""
        config, groups = self.config, []
        for name in self.trainable:
            params = [p for p in self.models[name].parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": config.lr * config.lr_scales.get(name, 1.0), "name": name})
        if not groups:
            raise ValueError("no trainable parameters")
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)

    # ------------------------------------------------------------------------------------------- accessors
    def unwrapped(self, name: str) -> nn.Module:
        return self.accelerator.unwrap_model(self.models[name])

    def eval_models(self) -> dict[str, nn.Module]:
        """Networks as used for validation/export: EMA weights where EMA is on, the raw network otherwise."""
        out = {}
        for name in self.models:
            out[name] = self.ema[name].module if name in self.ema else self.unwrapped(name)
        return out

    def _agree(self, value: float, op: str = "min") -> float:
        """``value`` reduced over all processes (``min``, ``max`` or ``sum``): decisions that every process must take
        alike (stop now, this checkpoint is intact, the loss is finite), so none waits for the others forever."""
        if self.world == 1:
            return float(value)
        import torch.distributed as dist

        ops = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=ops[op])
        return float(t.item())

    def _mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        """Training scalars averaged over the processes (one all-reduce per log line)."""
        if self.world == 1 or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist(), strict=True)}

    def _write_rank_hash(self) -> None:
        """``THINSLICE_RANK_HASHES=DIR``: this process's final weights (and EMA) as one SHA-256 in
        ``DIR/rank<r>.json``, so that a test or a user can check that every process ended with the same weights."""
        folder = os.environ.get("THINSLICE_RANK_HASHES")
        if not folder:
            return
        digest = hashlib.sha256()
        for name in self.trainable:
            modules = [self.unwrapped(name), *([self.ema[name].module] if name in self.ema else [])]
            for module in modules:
                for key, value in module.state_dict().items():
                    digest.update(key.encode())
                    digest.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        Path(folder).mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(folder) / f"rank{self.rank}.json",
                          json.dumps({"rank": self.rank, "processes": self.world, "step": self.state.step,
                                      "sha256": digest.hexdigest()}))

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Atomic checkpoint: written to a hidden temp folder, then renamed to ``step_XXXXXX``."""
        acc = self.accelerator
        folder = self.run_dir / "checkpoints"
        final = folder / f"{CHECKPOINT_PREFIX}{self.state.step:06d}"
        tmp = folder / f".tmp_{final.name}"
        if self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        acc.wait_for_everyone()
        self._write_state(tmp)
        acc.wait_for_everyone()
        if self.is_main:
            info = {"format": CHECKPOINT_FORMAT, "step": self.state.step, "best": self.state.best,
                    "best_step": self.state.best_step, "num_processes": self.world,
                    "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()}}
            (tmp / "trainer_state.json").write_text(json.dumps(info, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(self.run_dir)[: -max(1, self.config.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _stateful(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the step, shared by all processes, by file name: the unwrapped networks,
        their EMA copies, the optimiser, the LR schedule and the mixed-precision scaler."""
        objects: dict[str, Any] = {f"model_{name}": self.unwrapped(name) for name in self.models}
        objects.update({f"ema_{name}": ema for name, ema in self.ema.items()})
        objects.update(optimizer=self.optimizer, scheduler=self.scheduler)
        if self.accelerator.scaler is not None:
            objects["scaler"] = self.accelerator.scaler
        return objects

    def _has_sampler_state(self) -> bool:
        return hasattr(self.batches, "state_dict") and hasattr(self.batches, "load_state_dict")

    @staticmethod
    def _sampler_file(rank: int) -> str:
        """Process 0's example stream keeps the one-process name, so one-process checkpoints read as before."""
        return "sampler" if rank == 0 else f"sampler_{rank}"

    def _write_state(self, folder: Path) -> None:
        """Every process writes its generators and example stream; the main process the shared state (see
        :mod:`.run_state`)."""
        write_state(folder, f"rng_{self.rank}", rng_state())
        if self._has_sampler_state():
            write_state(folder, self._sampler_file(self.rank), self.batches.state_dict())  # type: ignore[attr-defined]
        if self.is_main:
            for name, obj in self._stateful().items():
                write_state(folder, name, obj.state_dict())

    def _read_checkpoint(self, path: Path) -> tuple[dict[str, Any], dict[str, Any], Any, Any]:
        """Everything this process needs from checkpoint ``path``, read before anything is applied: its info, the
        shared states, and this process's generators and example stream (None for a process beyond the count that
        wrote the checkpoint). Refused in one line when written in another format or holding a pickle file (never
        read); a damaged or missing file raises."""
        info = json.loads((path / "trainer_state.json").read_text())
        refuse_pickles(path, older_format=info.get("format") != CHECKPOINT_FORMAT)
        states = {name: read_state(path, name) for name in self._stateful()}
        own = self.rank < int(info.get("num_processes", 1))
        rng = read_state(path, f"rng_{self.rank}") if own else None
        sampler = read_state(path, self._sampler_file(self.rank)) if own and self._has_sampler_state() else None
        return info, states, rng, sampler

    def _apply_checkpoint(self, info: dict[str, Any], states: dict[str, Any], rng: Any, sampler: Any) -> None:
        for name, obj in self._stateful().items():
            obj.load_state_dict(states[name])
        self.state.load_state_dict(info)
        if rng is not None:
            set_rng_state(rng)
            if sampler is not None:
                self.batches.load_state_dict(sampler)  # type: ignore[attr-defined]
            return
        # A process the checkpoint has no stream for (more processes than wrote it): new streams of its own.
        from accelerate.utils import set_seed

        set_seed(self.config.seed + self.rank + 7919 * self.state.step)
        if hasattr(self.batches, "use_stream"):
            self.batches.use_stream(self.rank, start_step=self.state.step)

    def load_checkpoint(self, path: Path) -> None:
        """Continue from checkpoint ``path`` (see :meth:`_read_checkpoint`)."""
        self._apply_checkpoint(*self._read_checkpoint(Path(path)))

    def _load_newest_intact(self, checkpoints: list[Path]) -> tuple[Path, int]:
        """Load the newest checkpoint that reads in every process; a damaged one (a disk filled or a copy cut short)
        is skipped with a one-line note, so ``--resume`` continues from the one before it instead of failing.
        Returns the checkpoint and the number of processes that wrote it."""
        for path in reversed(checkpoints):
            read, reason = None, ""
            try:
                read = self._read_checkpoint(path)
            except ThinsliceError:
                raise  # refused (another format, a pickle file): not a damaged copy to skip silently
            except Exception as exc:  # safetensors, JSON, OS and state-shape errors all mean "this one is unusable"
                reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
            if self._agree(float(read is not None), "min") > 0:
                assert read is not None
                try:
                    self._apply_checkpoint(*read)
                except Exception as exc:  # a state of the wrong shape: as damaged, in every process alike
                    reason = str(exc).strip().splitlines()[0][:120] or type(exc).__name__
                if self._agree(float(not reason), "min") > 0:
                    return path, int(read[0].get("num_processes", 1))
            self._say(f"--resume: checkpoint {path.name} is damaged ({reason or 'in another process'}); trying the "
                      "one before it", logging.WARNING)
        raise ThinsliceError(f"no intact checkpoint in {self.run_dir / 'checkpoints'}; start a new run (another --out)")

    def _drop_logged_rows_after(self, step: int) -> None:
        """metrics.jsonl rows past the resumed step were logged by the interrupted run and are logged again."""
        path = self.run_dir / "metrics.jsonl"
        if not (self.is_main and path.is_file()):
            return
        rows = path.read_text().splitlines()
        kept = [row for row in rows if row.strip() and json.loads(row).get("step", 0) <= step]
        if len(kept) != len(rows):
            write_text_atomic(path, "".join(row + "\n" for row in kept))

    # --------------------------------------------------------------------------------------------- logging
    def _log_scalars(self, values: dict[str, float], step: int) -> None:
        if not values:
            return
        self.accelerator.log(values, step=step)
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")

    def _log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        if not images or not self.is_main:
            return
        try:
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        except Exception:  # tracker missing: images are a nicety
            return
        for tag, img in images.items():
            arr = np.asarray(img, dtype=np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
            writer.add_image(tag, arr, step, dataformats="HW" if arr.ndim == 2 else "HWC")

    def _validate(self, step: int) -> dict[str, float]:
        if self.validate_fn is None:
            return {}
        results: dict[str, Any] = {}
        if self.is_main:
            models = self.eval_models()
            modes = {n: m.training for n, m in models.items()}
            for m in models.values():
                m.eval()
            with torch.no_grad():
                results = self.validate_fn(models, step) or {}
            for n, m in models.items():
                m.train(modes[n])
        self.accelerator.wait_for_everyone()
        scalars = {k: float(v) for k, v in results.items() if np.ndim(v) == 0}
        images = {k: v for k, v in results.items() if np.ndim(v) >= 2}
        self._log_scalars(scalars, step)
        self._log_images(images, step)
        key = self.config.best_metric
        if self.is_main and key and key in scalars:
            value = scalars[key]
            better = (self.state.best is None
                      or (value > self.state.best if self.config.best_mode == "max" else value < self.state.best))
            if better:
                self.state.best, self.state.best_step = value, step
                self._export(self.run_dir / "best")
        return scalars

    def _export(self, out_dir: Path) -> None:
        if self.export_fn is not None and self.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.export_fn(self.eval_models(), out_dir)

    # ---------------------------------------------------------------------------------------------- loop
    def fit(self, resume: bool = False, stop_at_step: int | None = None,
            time_limit_s: float | None = None) -> TrainResult:
        """Train to ``config.max_steps`` (or stop early at ``stop_at_step``/after ``time_limit_s``, checkpointing)."""
        cfg = self.config
        self._start(resume)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        end = cfg.max_steps if stop_at_step is None else min(cfg.max_steps, stop_at_step)
        bar = tqdm(total=cfg.max_steps, initial=self.state.step, disable=not (self.is_main and cfg.progress),
                   dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0, desc="train")
        meter = _Meter()
        t_start, saved_at = time.time(), -1
        try:
            while self.state.step < end:
                meter.add(*self._train_step(params))
                self.state.step += 1
                step = self.state.step
                bar.update(1)
                if cfg.log_every and (step % cfg.log_every == 0 or step == end):
                    logs = self._mean_over_processes(meter.flush(float(self.scheduler.get_last_lr()[0])))
                    meter.last = dict(logs)
                    self._log_scalars(logs, step)
                    bar.set_postfix(loss=f"{logs['train/loss']:.4g}")
                if cfg.val_every and step % cfg.val_every == 0:
                    meter.last.update(self._validate(step))
                timed_out = time_limit_s is not None and self._agree(time.time() - t_start > time_limit_s, "max") > 0
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == end or timed_out:
                    self.save_checkpoint()
                    saved_at = step
                if timed_out:
                    self._say(f"time limit reached at step {step}; continue with --resume")
                    break
        except KeyboardInterrupt:
            if self.world > 1:  # the processes stop at different points: no checkpoint they could write together
                self._say(f"interrupted at step {self.state.step}; --resume continues from the last checkpoint")
            elif self.state.step != saved_at and self.state.step > 0:
                self._say(f"interrupted: saving a checkpoint at step {self.state.step}")
                self.save_checkpoint()
            raise
        finally:
            bar.close()
        return self._finish(meter.last)

    def _say(self, message: str, level: int = logging.INFO) -> None:
        """One line from the main process only, through logging (so that ``-q`` silences it)."""
        if self.accelerator.is_main_process:
            log.log(level, message)

    def _start(self, resume: bool) -> None:
        """Resume from the newest intact checkpoint, or refuse to overwrite one, or seed a fresh run."""
        cfg, acc = self.config, self.accelerator
        existing = list_checkpoints(self.run_dir)
        if resume and existing:
            loaded, writers = self._load_newest_intact(existing)
            self._say(f"resumed from {loaded} (step {self.state.step})")
            if writers != self.world:
                self._say(f"--resume: {loaded.name} was written by {writers} process(es), this run has {self.world}: "
                          f"the effective batch is now {self.world} x --batch-size (was {writers} x); weights, "
                          "optimiser and schedule carry over, the example streams of the processes differ from an "
                          "uninterrupted run", logging.WARNING)
            self._drop_logged_rows_after(self.state.step)
        elif existing and not resume:
            raise ThinsliceError(
                f"{self.run_dir} already holds checkpoints (last: {existing[-1].name}); pass --resume to continue "
                "that run or choose another --out folder"
            )
        else:
            if resume:
                self._say(f"--resume: no checkpoint in {self.run_dir}/checkpoints, starting from step 0")
            from accelerate.utils import set_seed

            set_seed(cfg.seed + acc.process_index)
        if self.is_main:
            write_text_atomic(self.run_dir / "engine_config.json",
                              json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                                         indent=1))
        acc.init_trackers("tensorboard")
        self._iter = iter(self.batches)
        for m in self.models.values():
            m.train()

    def _train_step(self, params: list[torch.Tensor]) -> tuple[float, dict[str, float], float | None]:
        """One optimiser step (loss, backward, clipping, scheduler, EMA); returns loss, logs and grad norm."""
        cfg, acc, step = self.config, self.accelerator, self.state.step
        assert self._iter is not None
        batch = _to_device(next(self._iter), self.device)
        with acc.autocast():
            loss, logs = self.loss_fn(self.models, batch, step)
        finite = bool(torch.isfinite(loss))
        if self._agree(finite, "min") <= 0:  # every process stops alike
            value = loss.item() if not finite else "not finite in another process"
            raise ThinsliceError(f"loss became {value} at step {step}; lower the learning rate (--lr) or use "
                                 "--mixed-precision no, then --resume from the last checkpoint")
        self.optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        grad_norm = None
        if cfg.grad_clip and acc.sync_gradients:
            grad_norm = float(acc.clip_grad_norm_(params, cfg.grad_clip))
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        for name, ema in self.ema.items():
            ema.update_parameters(self.unwrapped(name))
        return float(loss.detach()), {k: float(v) for k, v in logs.items()}, grad_norm

    def _finish(self, last_logs: dict[str, float]) -> TrainResult:
        """At max_steps: a last validation when the step is off the grid, then the final export."""
        cfg = self.config
        if self.state.step >= cfg.max_steps:
            if cfg.val_every and self.state.step % cfg.val_every != 0 and self.validate_fn is not None:
                last_logs.update(self._validate(self.state.step))
            self._export(self.run_dir / "final")
        self._write_rank_hash()
        self.accelerator.end_training()
        models = self.eval_models()
        for m in models.values():
            m.eval()
        return TrainResult(self.state.step, self.state.best, self.state.best_step, self.run_dir, models, last_logs)
