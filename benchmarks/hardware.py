"""The machine a measurement was taken on: CPU, ISA flags, RAM, GPU.

Read from /proc and nvidia-smi rather than from torch, so that profiling a
llama.cpp or onnxruntime run does not pay for importing torch.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from typing import Any

# The flags that change which kernels llama.cpp, onnxruntime and torch pick.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16")


def _ram_bytes() -> int | None:
    from llmops.core.procfs import kib_field

    return kib_field("/proc/meminfo", "MemTotal")


def _gpu() -> dict[str, Any]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {}
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
        head = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if out.returncode != 0 or not out.stdout.strip():
        return {}
    name, mem, driver = [x.strip() for x in out.stdout.strip().splitlines()[0].split(",")[:3]]
    cuda = None
    if "CUDA Version:" in head:
        cuda = head.split("CUDA Version:")[1].split()[0]
    return {"gpu_name": name, "gpu_memory_bytes": int(float(mem)) * 1024 * 1024, "gpu_driver": driver,
            "cuda_version": cuda}


def profile(threads: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """This machine's profile; ``cores`` is what the run may use (affinity, or --threads)."""
    from llmops.core.procfs import cpu_info

    model, flags = cpu_info()
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    prof: dict[str, Any] = {
        "cpu_model": model,
        "cores": min(threads, available) if threads else available,
        "isa_flags": sorted(f for f in ISA_FLAGS if f in flags),
        "ram_bytes": _ram_bytes(),
        "machine": platform.machine(),
    }
    if device == "cuda":
        prof.update(_gpu())
    return prof
