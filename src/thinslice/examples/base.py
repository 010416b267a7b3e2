"""The one contract of every training-example sampler: an endless iterator of batches driven by one checkpointed
numpy generator.

Why one generator, owned here: everything random about an example (the volume, the crop, the degradation, the noise
seed a loss uses) is drawn from it in a fixed order, so saving its state with a training checkpoint
(:meth:`ExampleSampler.state_dict`, registered by :class:`thinslice.train.engine.Trainer`) makes a resumed run draw
exactly the batches of an uninterrupted one, and ``--adapt`` with the same seed fits to the same examples.
Subclasses say only how one batch is drawn (:meth:`ExampleSampler.next_batch`).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class ExampleSampler(ABC):
    """Endless iterator of training batches (``next(sampler)`` = :meth:`next_batch`) from ``self.rng``, seeded once."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)

    def use_stream(self, process: int, start_step: int = 0) -> None:
        """Draw from the example stream of training process ``process`` (several processes: each draws other
        examples). Process 0 keeps the stream of ``seed``, so that one process trains as it always did; process
        r > 0 draws from ``SeedSequence(seed, spawn_key=(r,))``. ``start_step`` > 0 gives a process that joins a
        resumed run (more processes than the checkpoint was written by) a stream of its own that none of the
        earlier processes drew from."""
        if process == 0 and start_step == 0:
            return  # the stream the sampler was made with
        key = (int(process),) if start_step == 0 else (int(process), int(start_step))
        self.rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=key))

    @abstractmethod
    def next_batch(self) -> Any:
        """One batch, drawn from ``self.rng`` only."""

    def state_dict(self) -> dict[str, Any]:
        """The generator's state: what a training checkpoint keeps of the sampler."""
        return {"bit_generator": copy.deepcopy(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream of a saved state (``"rng"``: the key planes checkpoints used before samplers shared
        this class, so that their runs still resume)."""
        self.rng.bit_generator.state = state["bit_generator"] if "bit_generator" in state else state["rng"]

    def __iter__(self) -> ExampleSampler:
        return self

    def __next__(self) -> Any:
        return self.next_batch()
