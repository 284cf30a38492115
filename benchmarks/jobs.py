"""What a runner child does: tokenize, score perplexity windows, answer a task evaluation's
loglikelihood requests, or time generation.

The parent side is :func:`run_in_child`; the protocol itself (job and reply files, progress,
crash reporting) is the core's (``llmops.core.child``). The windows scored and the timed runs are
progress phases the child reports and the parent's reporter shows.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmops.benchmarks.runners import LogitsRunner, RunnerSpec, make_runner
from llmops.core.child import run_child
from llmops.core.progress import as_reporter


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


def runner_job(job: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """The child side of every runner job (see ``llmops.core.child``)."""
    spec = RunnerSpec(**job["spec"])
    _cap_memory(spec.backend)
    if job["kind"] == "latency":
        from llmops.benchmarks.latency import measure

        return measure(spec, job, progress=say)
    if job["kind"] == "loglikelihood":  # a task evaluation's requests (lm_eval_model.RunnerLM)
        from llmops.benchmarks.lm_eval_model import loglikelihood_job

        return loglikelihood_job(job, say)
    if job["kind"] == "windows":  # the perplexity windows alone, from the tokenizer alone
        from llmops.benchmarks.windows import leading_tokens, make_windows, windows_tokens

        r = make_runner(spec, vocab_only=True)
        tokens = leading_tokens(r.tokenize, Path(job["text_file"]).read_text(encoding="utf-8"),
                                windows_tokens(job.get("chunks"), spec.n_ctx))
        win = make_windows(tokens, spec.n_ctx, job.get("chunks"), r.add_bos, r.bos_id)
        np.save(job["inputs"], win.inputs)
        np.save(job["targets"], win.targets)
        return {"first": win.first, "n_tokens": win.n_tokens}
    if job["kind"] == "tokenize":
        r = make_runner(spec, vocab_only=True)
        text = Path(job["text_file"]).read_text(encoding="utf-8")
        np.save(job["out"], r.tokenize(text))
        return {"add_bos": r.add_bos, "bos_id": r.bos_id, "vocab_size": r.vocab_size}
    runner = make_runner(spec)
    reply: dict[str, Any] = {"vocab_size": runner.vocab_size}
    if job["kind"] == "perplexity":
        # Tokenized where it is scored: one interpreter start and one model load, as
        # llama-perplexity does it; the windows go back for the source model to score too.
        from llmops.benchmarks.windows import leading_tokens, make_windows, windows_tokens

        tokens = leading_tokens(runner.tokenize, Path(job["text_file"]).read_text(encoding="utf-8"),
                                windows_tokens(job.get("chunks"), spec.n_ctx))
        win = make_windows(tokens, spec.n_ctx, job.get("chunks"), runner.add_bos, runner.bos_id)
        np.save(job["inputs"], win.inputs)
        np.save(job["targets"], win.targets)
        reply.update(add_bos=runner.add_bos, bos_id=runner.bos_id, n_tokens=win.n_tokens, first=win.first)
        inputs, targets, first, last = win.inputs, win.targets, win.first, win.n_ctx - 1
    else:
        inputs, targets, first, last = np.load(job["inputs"]), np.load(job["targets"]), job["first"], job["last"]
    nll = score_windows(runner, inputs, targets, first, last, job.get("out"), progress=say,
                        phase=job.get("phase") or "score")
    np.save(job["nll"], nll)
    return reply


def score_windows(runner: LogitsRunner, inputs: np.ndarray, targets: np.ndarray, first: int, last: int,
                  logits_out: str | Path | None = None, *, progress: Callable[[str], None] | None = None,
                  phase: str = "score") -> np.ndarray:
    """Per-token NLL ``[n_chunk, last - first]`` of each window's scored positions, computed where
    the logits are made; the logits themselves (``[n_chunk, last - first, vocab]`` float32, 50 MB
    a window for a 49k vocabulary) go to ``logits_out`` only when a comparison needs them. The
    windows are the progress phase ``phase`` of ``progress``."""
    from llmops.benchmarks.metrics import token_nll

    keep = None
    if logits_out is not None:
        keep = np.lib.format.open_memmap(logits_out, mode="w+", dtype=np.float32,
                                         shape=(inputs.shape[0], last - first, runner.vocab_size))
    nll = np.empty(targets.shape, dtype=np.float64)
    with as_reporter(progress).phase(phase, total=int(inputs.shape[0]), unit="chunk") as bar:
        for i in range(inputs.shape[0]):
            lg = runner.logits(inputs[i], first, last, view=True)  # used up before the next window
            nll[i] = token_nll(lg, targets[i])
            if keep is not None:
                keep[i] = lg
            bar.advance()
    if keep is not None:
        keep.flush()
        del keep
    return nll


def run_in_child(job: dict[str, Any], what: str, workdir: str | Path, timeout: float | None = None, *,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run a runner job in a child interpreter; native crashes and OOM kills become LLMOpsError.
    Its progress goes to ``progress``, else to the ambient reporter (``llmops.core.progress.reporting``)."""
    return run_child("llmops.benchmarks.jobs:runner_job", job, what, workdir, timeout=timeout, progress=progress)
