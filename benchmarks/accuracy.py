"""Perplexity, KL-divergence and top-1 agreement of an artifact against its source.

One implementation shared by every converter's ``--verify`` (a few chunks) and
``llmops bench`` (more chunks), for every backend: tokens come from the
artifact's own tokenizer (llama.cpp's for a GGUF, the Hugging Face tokenizer
otherwise), the same windows are fed to both models (see ``logits.py`` for the
llama.cpp-compatible windowing), and the metrics are streamed chunk by chunk.
Without a source only per-token NLLs leave the runner's process; with one, both
models' scored logits go through ``.npy`` files for the KL-divergence.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmops.benchmarks.logits import (
    RunnerSpec,
    Windows,
    backend_for,
    make_runner,
    make_windows,
    run_in_child,
    score_windows,
)
from llmops.benchmarks.metrics import StreamingAccuracy
from llmops.errors import LLMOpsError


def tokenize_with(spec: RunnerSpec, text: str, *, in_process: bool = False,
                  workdir: Path | None = None) -> tuple[np.ndarray, bool, int]:
    """(token ids, add_bos, bos id) as the artifact's own tokenizer gives them."""
    if in_process:
        r = make_runner(spec, vocab_only=True)
        return r.tokenize(text), r.add_bos, r.bos_id
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        out = Path(d) / "tokens.npy"
        text_file = Path(d) / "text.txt"
        text_file.write_text(text, encoding="utf-8")
        msg = run_in_child({"kind": "tokenize", "spec": spec.__dict__, "text_file": str(text_file),
                            "out": str(out)}, f"{spec.backend} tokenizer", d)
        return np.load(out), bool(msg["add_bos"]), int(msg["bos_id"])


def tokenize_with_gguf(gguf_path: str | Path, text: str, *, n_ctx: int = 512, in_process: bool = False,
                       workdir: Path | None = None) -> tuple[np.ndarray, bool, int]:
    """(token ids, add_bos, bos id) as llama.cpp tokenizes ``text`` for perplexity."""
    spec = RunnerSpec("llama.cpp", str(Path(gguf_path).resolve()), n_ctx, 1)
    return tokenize_with(spec, text, in_process=in_process, workdir=workdir)


def _score(spec: RunnerSpec, win: Windows, d: Path, tag: str, in_process: bool,
           keep_logits: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """(scored logits or None, per-token NLL) of every window, from the runner in a child process.

    The NLL is computed where the logits are made; the logits (50 MB a window) are written and
    read back only when ``keep_logits`` (a KL-divergence/top-1 comparison needs both models')."""
    last = win.n_ctx - 1
    out = d / f"{tag}.npy"
    if in_process:
        nll = score_windows(make_runner(spec), win.inputs, win.targets, win.first, last,
                            out if keep_logits else None)
    else:
        inputs, targets, nll_file = d / f"{tag}-inputs.npy", d / f"{tag}-targets.npy", d / f"{tag}-nll.npy"
        np.save(inputs, win.inputs)
        np.save(targets, win.targets)
        run_in_child({"kind": "logits", "spec": spec.__dict__, "inputs": str(inputs), "targets": str(targets),
                      "first": win.first, "last": last, "nll": str(nll_file),
                      "out": str(out) if keep_logits else None}, f"{spec.backend} runner", d)
        nll = np.load(nll_file)
    return (np.load(out, mmap_mode="r") if keep_logits else None), nll


def evaluate(
    artifact: str | Path,
    text: str,
    *,
    backend: str | None = None,
    source: str | Path | None = None,
    source_backend: str | None = None,
    chunks: int | None = 4,
    n_ctx: int = 512,
    threads: int | None = None,
    device: str = "cpu",
    in_process: bool = False,
    source_cache: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Metrics of ``artifact`` on ``text``; with ``source`` also KLD/top-1 against the source model.

    Returns ``{"kld", "kld_p99", "top1_agreement", "ppl_source", "ppl_output", "tokens", "chunks", "n_ctx"}``.
    """
    from llmops.evaltext import evaluation_part

    say = progress or (lambda _m: None)
    backend = backend or backend_for(artifact)
    text = evaluation_part(text)  # the calibration part is never scored
    spec = RunnerSpec(backend, str(Path(artifact).resolve()), n_ctx, threads, device)
    with tempfile.TemporaryDirectory(prefix="llmops-eval-") as dname:
        d = Path(dname)
        say(f"tokenizing the eval text with the artifact's tokenizer ({backend})")
        tokens, add_bos, bos_id = tokenize_with(spec, text, in_process=in_process, workdir=d)
        win = make_windows(tokens, n_ctx, chunks, add_bos, bos_id)
        say(f"evaluating {win.n_chunk} chunk(s) of {n_ctx} tokens with {backend}")
        out_logits, out_nll = _score(spec, win, d, "output", in_process, keep_logits=source is not None)
        src_logits = None
        if source is not None:
            sb = source_backend or backend_for(source)
            src_spec = RunnerSpec(sb, str(Path(source).resolve()), n_ctx, threads, device)
            cached = _cache_file(source_cache, source, win) if source_cache is not None else None
            if cached is not None and cached.is_file():
                say(f"source logits from cache ({cached.name})")
                src_logits = np.load(cached, mmap_mode="r")
            else:
                say(f"evaluating the same chunks with the source model ({source}) in {sb}")
                src_logits, _ = _score(src_spec, win, d, "source", in_process, keep_logits=True)
                if cached is not None:
                    _store(cached, d / "source.npy")
            assert out_logits is not None
            if src_logits.shape[-1] != out_logits.shape[-1]:
                raise LLMOpsError(f"vocabulary sizes differ: source {src_logits.shape[-1]}, "
                                  f"artifact {out_logits.shape[-1]}")
        acc = StreamingAccuracy()
        if src_logits is None:
            acc.add_nll(out_nll)
        else:
            assert out_logits is not None
            for i in range(win.n_chunk):
                acc.add(np.asarray(src_logits[i]), np.asarray(out_logits[i]), win.targets[i])
        del out_logits, src_logits
    res = acc.result()
    res.update(chunks=win.n_chunk, n_ctx=n_ctx)
    return res


def _cache_file(cache_dir: Path, source: str | Path, win: Windows) -> Path:
    """Source logits depend on the source's bytes and the exact windows fed to it, nothing else."""
    import hashlib

    from llmops.hashing import sha256_path

    key = hashlib.sha256()
    key.update(sha256_path(source).encode())
    key.update(np.ascontiguousarray(win.inputs).tobytes())
    key.update(f"{win.first}:{win.n_ctx}".encode())
    return Path(cache_dir) / f"logits-{key.hexdigest()[:32]}.npy"


def _store(cached: Path, produced: Path) -> None:
    import os
    import shutil

    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    try:
        shutil.copyfile(produced, tmp)
        os.replace(tmp, cached)
    finally:
        tmp.unlink(missing_ok=True)


def evaluate_gguf(gguf_path: str | Path, text: str, **kwargs: Any) -> dict[str, Any]:
    """``evaluate`` for a GGUF file (llama.cpp), kept for the converters' verify step."""
    return evaluate(gguf_path, text, backend="llama.cpp", **kwargs)
