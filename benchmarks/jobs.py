"""What a runner child does: tokenize, score perplexity windows, or time generation.

The parent side is :func:`run_in_child`; the protocol itself (job and reply files, progress,
crash reporting) is the core's (``llmops.core.child``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmops.benchmarks.runners import LogitsRunner, RunnerSpec, make_runner
from llmops.core.child import run_child


# Cap, in MiB, on what a runner child may allocate once its runtime is imported
# (``llmops bench --max-memory``): a runaway model must not take the machine, or a shared
# CI runner, down with it. Past the cap its allocations fail and the child errors out or
# dies, which the parent reports as one line.
MAX_MEMORY_ENV = "LLMOPS_RUNNER_MAX_MEMORY_MB"
_RUNTIME_MODULES = {"llama.cpp": ("llama_cpp",), "torch": ("torch", "transformers"), "gptq": ("torch", "transformers"),
                    "onnx": ("onnxruntime",)}


def _cap_memory(backend: str) -> None:
    """Import the backend's runtime first (its start-up is not the model's memory), then cap the
    data segment (RLIMIT_DATA: heap and private mappings, not the mapped libraries)."""
    limit = os.environ.get(MAX_MEMORY_ENV)
    if not limit:
        return
    import importlib
    import resource

    for mod in _RUNTIME_MODULES.get(backend, ()):
        importlib.import_module(mod)
    from llmops.core.procfs import kib_field

    used = kib_field("/proc/self/status", "VmData") or 0
    cap = used + int(float(limit) * 1024 * 1024)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))


def runner_job(job: dict[str, Any], _say: Callable[[str], None]) -> dict[str, Any]:
    """The child side of every runner job (see ``llmops.core.child``)."""
    spec = RunnerSpec(**job["spec"])
    _cap_memory(spec.backend)
    if job["kind"] == "latency":
        from llmops.benchmarks.latency import measure

        return measure(spec, job)
    if job["kind"] == "tokenize":
        r = make_runner(spec, vocab_only=True)
        text = Path(job["text_file"]).read_text(encoding="utf-8")
        np.save(job["out"], r.tokenize(text))
        return {"add_bos": r.add_bos, "bos_id": r.bos_id, "vocab_size": r.vocab_size}
    runner = make_runner(spec)
    nll = score_windows(runner, np.load(job["inputs"]), np.load(job["targets"]), job["first"], job["last"],
                        job.get("out"))
    np.save(job["nll"], nll)
    return {"vocab_size": runner.vocab_size}


def score_windows(runner: LogitsRunner, inputs: np.ndarray, targets: np.ndarray, first: int, last: int,
                  logits_out: str | Path | None = None) -> np.ndarray:
    """Per-token NLL ``[n_chunk, last - first]`` of each window's scored positions, computed where
    the logits are made; the logits themselves (``[n_chunk, last - first, vocab]`` float32, 50 MB
    a window for a 49k vocabulary) go to ``logits_out`` only when a comparison needs them."""
    from llmops.benchmarks.metrics import token_nll

    keep = None
    if logits_out is not None:
        keep = np.lib.format.open_memmap(logits_out, mode="w+", dtype=np.float32,
                                         shape=(inputs.shape[0], last - first, runner.vocab_size))
    nll = np.empty(targets.shape, dtype=np.float64)
    for i in range(inputs.shape[0]):
        lg = runner.logits(inputs[i], first, last)
        nll[i] = token_nll(lg, targets[i])
        if keep is not None:
            keep[i] = lg
    if keep is not None:
        keep.flush()
        del keep
    return nll


def run_in_child(job: dict[str, Any], what: str, workdir: str | Path, timeout: float | None = None) -> dict[str, Any]:
    """Run a runner job in a child interpreter; native crashes and OOM kills become LLMOpsError."""
    return run_child("llmops.benchmarks.jobs:runner_job", job, what, workdir, timeout=timeout)
