"""The one memory meter: a block's peak resident memory (kernel high-water mark or sampled), the process peak."""

from __future__ import annotations

import mmap
import time

import numpy as np
import pytest

import thinslice.memory as memory
from thinslice.memory import PeakMemory, available_memory, current_rss, process_peak_mb

_BLOCK_MB = 64


def _hold_block() -> float:
    """Touch 64 MiB of fresh pages, keep them for 0.1 s (several sampling intervals), free them; the RSS before, in
    MiB. An anonymous mapping, not numpy: after a long test session the allocator may hand back memory that is
    already resident, which would not raise the RSS at all."""
    before = current_rss() / 2**20
    with mmap.mmap(-1, _BLOCK_MB * 2**20) as block:
        view = np.frombuffer(block, dtype=np.uint8)
        view[::4096] = 1  # one write per page makes every page resident
        time.sleep(0.1)
        assert int(view[::4096].sum()) == _BLOCK_MB * 256
        del view
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
