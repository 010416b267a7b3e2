"""Fitting a network to examples: the few-step loop behind ``--adapt`` (test-time fine-tuning on the input itself,
shared by the methods) and the LR schedule the training engine shares with it.

Here, beside the examples it fits to, because both inference (``--adapt``) and training (the schedule) use it and
neither may import the other: examples/ sits below both, and this module needs only torch and the autocast helpers
of :mod:`thinslice.device`. A plain loop rather than the training engine of :mod:`thinslice.train`: a few minutes of
fitting inside an inference call want no checkpoints, EMA, logging or Accelerate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from thinslice.device import autocast, autocast_dtype

# loss(model, batch on the model's device) -> scalar tensor
LossFn = Callable[[nn.Module, dict[str, Any]], torch.Tensor]
Net = TypeVar("Net", bound=nn.Module)  # fine_tune returns the network it was given


@dataclass(frozen=True)
class FineTune:
    """How to fit: at most ``steps`` AdamW steps and ``max_seconds`` seconds; linear warm-up, then cosine decay to
    ``min_lr_ratio`` x ``lr`` (1.0: constant); gradient norm clipped at ``grad_clip`` (None: not clipped)."""

    steps: int
    lr: float
    warmup: int = 0
    min_lr_ratio: float = 1.0
    grad_clip: float | None = None
    max_seconds: float = math.inf
    precision: str = "fp32"
    progress: bool = False

    def lr_at(self, step: int) -> float:
        return self.lr * warmup_cosine(self.warmup, self.steps, self.min_lr_ratio)(step)


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_steps``, then cosine decay to ``min_ratio`` at ``max_steps``.
    Here rather than in the training engine, which uses it too, so that ``--adapt`` shares it without importing
    training code."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def fine_tune(model: Net, batches: Iterator[dict[str, Any]], loss_fn: LossFn, plan: FineTune) -> Net:
    """Fit ``model`` in place on ``batches`` as ``plan`` says; returns it in eval mode."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    amp = autocast_dtype(plan.precision)
    optimiser = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=0.0)  # as the training engine
    deadline = time.perf_counter() + plan.max_seconds
    model.train()
    for step in tqdm(range(plan.steps), desc="adapt", unit="step", disable=not plan.progress, leave=False):
        for group in optimiser.param_groups:
            group["lr"] = plan.lr_at(step)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(batches).items()}
        with autocast(device, amp):
            loss = loss_fn(model, batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if plan.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), plan.grad_clip)
        optimiser.step()
        if time.perf_counter() > deadline:
            break
    return model.eval()
