"""Wall time and peak RSS of one command, each in a fresh process: the benchmarks' one measurement.

The command runs under a small launcher that waits for it and hands its peak RSS back through a
pipe. Measuring from the benchmark process itself would be wrong on Linux: exec records the
address space it replaces into the new program's ``ru_maxrss``, so every child would report at
least the benchmark's own (large) peak. The launcher's address space is a few MB.

The peak is of the whole process tree at once: while the command runs, the launcher adds up the
resident memory of it and its descendants every 10 ms (``llmops convert`` reads the tokenizer in a
child while it plans; GPTQModel runs in a child of ours), and the figure is the larger of that
sum's peak and the largest single process's own peak (``wait4``), which sampling could miss.
Only processes started after the launcher are looked at (higher ids), so a sample costs a few
tenths of a millisecond.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_LAUNCHER = r"""
import os, select, sys
base = os.getpid()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
page = os.sysconf("SC_PAGE_SIZE")

def tree_rss():
    parent, rss = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) <= base:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                parent[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{name}/statm", "rb") as f:
                rss[int(name)] = int(f.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            pass
    mine, total = {pid}, 0
    for p in sorted(parent):
        if p in mine or parent[p] in mine:
            mine.add(p)
            total += rss.get(p, 0)
    return total

fd = os.pidfd_open(pid)
poller = select.poll()
poller.register(fd, select.POLLIN)
peak = 0
while not poller.poll(10):
    peak = max(peak, tree_rss())
_, st, ru = os.wait4(pid, 0)
os.write(int(sys.argv[1]), str(max(peak // 1024, ru.ru_maxrss)).encode())
sys.exit(os.waitstatus_to_exitcode(st))
"""


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
