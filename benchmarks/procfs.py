"""Memory figures read from Linux's /proc, with portable fallbacks where there is one.

Read by hand because no library we depend on exposes them: psutil has no high-water mark
(VmHWM) or data-segment size (VmData), and its total-memory reading needs a process object
we otherwise never build.
"""

from __future__ import annotations

import resource


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
