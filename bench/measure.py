"""Wall time and peak RSS of one command, each in a fresh process: the benchmarks' one measurement.

The command runs under a small launcher that waits for it with ``wait4`` and hands its peak RSS
back through a pipe. Measuring from the benchmark process itself would be wrong on Linux: exec
records the address space it replaces into the new program's ``ru_maxrss``, so every child would
report at least the benchmark's own (large) peak. The launcher's address space is a few MB. The
figure covers the command and every process it waited for (GPTQModel runs in a child of ours).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_LAUNCHER = ("import os, sys; pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ); "
             "_, st, ru = os.wait4(pid, 0); os.write(int(sys.argv[1]), str(ru.ru_maxrss).encode()); "
             "sys.exit(os.waitstatus_to_exitcode(st))")


def measured(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of ``cmd``; exits with its stderr's tail when it fails."""
    env = dict(os.environ) if env is None else env
    with tempfile.TemporaryFile() as errf:  # a file, not a pipe: a chatty child cannot block on it
        r, w = os.pipe()
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(w), *cmd], cwd=cwd, env=env,
                             stdout=subprocess.DEVNULL, stderr=errf, pass_fds=(w,))
        os.close(w)
        p.wait()
        secs = time.perf_counter() - t0
        with os.fdopen(r, "rb") as rf:
            kib = rf.read().decode() or "0"
        if p.returncode != 0:
            errf.seek(0)
            err = errf.read().decode("utf-8", "replace")
            raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return secs, int(kib) * 1024
