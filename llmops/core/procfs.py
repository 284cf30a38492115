"""What Linux's /proc says about this process and machine: memory figures and the CPU, with
portable fallbacks where there is one.

Read by hand because no library we depend on exposes them: psutil has no high-water mark
(VmHWM) or data-segment size (VmData), and its total-memory reading needs a process object
we otherwise never build.
"""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from functools import lru_cache


def kib_field(path: str, key: str) -> int | None:
    """Bytes of a ``Key:   N kB`` line of a /proc file (``/proc/self/status``, ``/proc/meminfo``),
    or None where the file or the line is missing (not Linux)."""
    try:
        with open(path, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """This process's own peak RSS. /proc's VmHWM belongs to the address space, which exec
    replaces; getrusage's ru_maxrss on Linux carries the parent's peak across fork+exec."""
    hwm = kib_field("/proc/self/status", "VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """Resident bytes now: /proc/self/statm's second field where there is one (the sampler reads it
    a hundred times a second, and importing psutil alone costs a small conversion 2 %), else psutil."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)


class PeakRSS:
    """Context manager sampling this process's resident set; ``.peak`` in bytes (at least the start value)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = current_rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._t is not None:
            self._t.join()
        self.peak = max(self.peak, current_rss())


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """(CPU model, ISA flags) from /proc/cpuinfo (x86 ``model name``/``flags``, Arm
    ``Hardware``/``Features``), else what ``platform`` knows and no flags."""
    model, flags = None, frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and model is None:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags
