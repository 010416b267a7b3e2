"""The one memory meter: a block's peak resident memory (kernel high-water mark or sampled), the process peak."""

from __future__ import annotations

import time

import numpy as np
import pytest

import thinslice.memory as memory
from thinslice.memory import PeakMemory, available_memory, current_rss, process_peak_mb

_BLOCK_MB = 64


def _hold_block() -> float:
    """Touch 64 MiB, keep them for 0.1 s (several sampling intervals), free them; the RSS before, in MiB."""
    before = current_rss() / 2**20
    block = np.ones((_BLOCK_MB, 2**20), dtype=np.uint8)
    time.sleep(0.1)
    assert int(block[:, ::4096].sum()) == _BLOCK_MB * 256
    del block
    return before


@pytest.mark.parametrize("sampled", [False, True])
def test_peak_memory_sees_a_block_freed_before_the_end(monkeypatch, sampled) -> None:
    if sampled:  # the fall-back where the kernel's high-water mark cannot be reset
        monkeypatch.setattr(memory, "_reset_high_water_mark", lambda: False)
    with PeakMemory() as peak:
        before = _hold_block()
    assert peak.mb >= before + 0.8 * _BLOCK_MB and peak.peak_mb == peak.mb
    assert peak.mb <= process_peak_mb() + 1.0  # a block's peak is never above the process's


def test_process_and_machine_figures_are_plausible() -> None:
    assert 0 < current_rss() / 2**20 <= process_peak_mb() + 1.0
    assert available_memory() > 0
