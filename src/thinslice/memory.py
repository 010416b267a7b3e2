"""Memory measured in one place: what this machine has available, this process's resident size, and the peak
resident memory of a block of code or of the whole process.

A base module (beside ``device.py`` and ``errors.py``) so that the readers' memory checks, the upsampling paths,
the benchmark, the cohort worker and the timing scripts all measure the same way.
"""

from __future__ import annotations

import os
import sys
import threading

_MB = 2**20


def available_memory() -> int:
    """Bytes of memory this process can take now (psutil's "available": free plus reclaimable cache)."""
    import psutil

    return int(psutil.virtual_memory().available)


def current_rss() -> int:
    """Resident bytes of this process now (from /proc on Linux: no import, so it also works in a child whose
    address space is capped)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return int(psutil.Process().memory_info().rss)


def process_peak_rss() -> int:
    """The highest resident bytes this process has had since it started, or on Linux since a :class:`PeakMemory`
    block last reset the kernel's high-water mark (``getrusage``'s ru_maxrss, which Linux reports in KiB and macOS
    in bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def process_peak_mb() -> float:
    """:func:`process_peak_rss` in MiB."""
    return process_peak_rss() / _MB


class PeakMemory:
    """Peak resident memory of this process while the ``with`` block runs, in MiB (``mb``).

    On Linux the kernel's high-water mark (VmHWM) is reset at the start and read at the end, which catches spikes
    between any two samples (and also lowers :func:`process_peak_rss` to the RSS at the start); elsewhere (or
    where /proc/self/clear_refs cannot be written) the RSS is sampled every 20 ms by a background thread.
    """

    def __init__(self, interval_s: float = 0.02) -> None:
        self.mb = 0.0
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak_mb(self) -> float:
        """The same as ``mb`` (the name the benchmark rows use)."""
        return self.mb

    def __enter__(self) -> PeakMemory:
        if _reset_high_water_mark():
            return self
        self.mb = current_rss() / _MB
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            return
        self.mb = _high_water_mark() / _MB

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.mb = max(self.mb, current_rss() / _MB)
            self._stop.wait(self._interval)


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS (Linux); False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return os.path.exists("/proc/self/status")


def _high_water_mark() -> int:
    """VmHWM of this process in bytes (0 when /proc does not say)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0
