"""Perplexity, KL-divergence and top-1 agreement of an artifact against its source.

One implementation shared by every converter's ``--verify`` (a few chunks) and
``llmops bench`` (more chunks), for every backend: tokens come from the
artifact's own tokenizer (llama.cpp's for a GGUF, the Hugging Face tokenizer
otherwise), the same windows are fed to both models (see ``windows.py`` for the
llama.cpp-compatible windowing), and the metrics are streamed chunk by chunk.
Without a source only per-token NLLs leave the runner's process; with one, both
models' scored logits go through ``.npy`` files for the KL-divergence. Those working files go to
a scratch folder in the llmops cache (``llmops.core.settings.scratch``), never to a RAM-backed
``/tmp``, and are removed after each evaluation. The source's logits can be kept in a
size-capped cache (least recently used entries go first) so that benchmarking several
artifacts against one baseline computes them once. Scoring the windows is one progress phase per
model (``llmops.core.progress``), driven from the runner's child process.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmops.benchmarks.jobs import run_in_child, score_windows
from llmops.benchmarks.runners import RunnerSpec, backend_for, make_runner
from llmops.benchmarks.windows import Windows, leading_tokens, make_windows, windows_tokens
from llmops.benchmarks.metrics import StreamingAccuracy
from llmops.core.errors import LLMOpsError
from llmops.core.progress import Reporter, as_reporter, reporting
from llmops.core.settings import LOGITS_CACHE_ENV, logits_cache_limit_bytes, scratch

MIB = 1024 * 1024


def tokenize_with(spec: RunnerSpec, text: str, *, in_process: bool = False,
                  workdir: Path | None = None) -> tuple[np.ndarray, bool, int]:
    """(token ids, add_bos, bos id) as the artifact's own tokenizer gives them."""
    if in_process:
        r = make_runner(spec, vocab_only=True)
        return r.tokenize(text), r.add_bos, r.bos_id
    if workdir is None:
        with scratch("llmops-tokenize-") as d:
            return _tokenize_in_child(spec, text, d)
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        return _tokenize_in_child(spec, text, Path(d))


def _tokenize_in_child(spec: RunnerSpec, text: str, d: Path) -> tuple[np.ndarray, bool, int]:
    out = d / "tokens.npy"
    text_file = d / "text.txt"
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
           keep_logits: bool, say: Reporter, phase: str) -> tuple[np.ndarray | None, np.ndarray]:
    """(scored logits or None, per-token NLL) of every window, from the runner in a child process.

    The NLL is computed where the logits are made; the logits (50 MB a window) are written and
    read back only when ``keep_logits`` (a KL-divergence/top-1 comparison needs both models').
    The windows scored are the progress phase ``phase``; the child's events reach ``say`` as the
    ambient reporter (``run_in_child`` keeps its signature for the callers that wrap it)."""
    last = win.n_ctx - 1
    out = d / f"{tag}.npy"
    if in_process:
        nll = score_windows(make_runner(spec), win.inputs, win.targets, win.first, last,
                            out if keep_logits else None, progress=say, phase=phase)
    else:
        inputs, targets, nll_file = d / f"{tag}-inputs.npy", d / f"{tag}-targets.npy", d / f"{tag}-nll.npy"
        np.save(inputs, win.inputs)
        np.save(targets, win.targets)
        with reporting(say):
            run_in_child({"kind": "logits", "spec": spec.__dict__, "inputs": str(inputs), "targets": str(targets),
                          "first": win.first, "last": last, "nll": str(nll_file),
                          "out": str(out) if keep_logits else None, "phase": phase}, f"{spec.backend} runner", d)
        nll = np.load(nll_file)
    return (np.load(out, mmap_mode="r") if keep_logits else None), nll


def _tokenize_and_score(spec: RunnerSpec, text: str, chunks: int | None, d: Path, in_process: bool,
                        keep_logits: bool, say: Reporter, phase: str) -> tuple[Windows, np.ndarray | None, np.ndarray]:
    """The artifact's windows (cut from its own tokens), scored logits or None, and NLL, from one
    runner: in a child, the text is tokenized where it is scored (no second interpreter start
    or model load)."""
    if in_process:
        runner = make_runner(spec)
        tokens = leading_tokens(runner.tokenize, text, windows_tokens(chunks, spec.n_ctx))
        win = make_windows(tokens, spec.n_ctx, chunks, runner.add_bos, runner.bos_id)
        out = d / "output.npy"
        nll = score_windows(runner, win.inputs, win.targets, win.first, win.n_ctx - 1,
                            out if keep_logits else None, progress=say, phase=phase)
        return win, (np.load(out, mmap_mode="r") if keep_logits else None), nll
    text_file, out = d / "text.txt", d / "output.npy"
    inputs, targets, nll_file = d / "output-inputs.npy", d / "output-targets.npy", d / "output-nll.npy"
    text_file.write_text(text, encoding="utf-8")
    with reporting(say):
        msg = run_in_child({"kind": "perplexity", "spec": spec.__dict__, "text_file": str(text_file),
                            "chunks": chunks, "inputs": str(inputs), "targets": str(targets), "nll": str(nll_file),
                            "out": str(out) if keep_logits else None, "phase": phase}, f"{spec.backend} runner", d)
    win = Windows(np.load(inputs), np.load(targets), int(msg["first"]), spec.n_ctx, int(msg["n_tokens"]))
    return win, (np.load(out, mmap_mode="r") if keep_logits else None), np.load(nll_file)


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
    phase: str = "accuracy",
) -> dict[str, Any]:
    """Metrics of ``artifact`` on ``text``; with ``source`` also KLD/top-1 against the source model.

    ``phase`` names the progress phases of the windows scored (``verify`` for ``convert --verify``):
    ``<phase> (<backend>)`` for the artifact, ``<phase> source (<backend>)`` for the source.

    Returns ``{"kld", "kld_p99", "top1_agreement", "ppl_source", "ppl_output", "tokens", "chunks", "n_ctx"}``,
    plus ``"source_cache"`` (``{"dir", "entry", "hit", "limit_mb"}``) when ``source_cache`` names the
    folder of the source-logits cache, capped by ``LLMOPS_LOGITS_CACHE_MB`` (0: no caching).
    """
    from llmops.core.evaltext import evaluation_part

    say = as_reporter(progress)
    backend = backend or backend_for(artifact)
    text = evaluation_part(text)  # the calibration part is never scored
    spec = RunnerSpec(backend, str(Path(artifact).resolve()), n_ctx, threads, device)
    cache_info: dict[str, Any] | None = None
    with scratch("llmops-eval-") as d:
        if source is not None and (source_backend or backend_for(source)) == backend and same_bytes(artifact, source):
            # the artifact is its own baseline (``bench SRC --baseline SRC``): one scoring serves as
            # both, and none at all when the baseline's logits of these windows are cached
            return _evaluate_source_itself(spec, text, chunks, d, in_process, source_cache, say, phase)
        say(f"tokenizing the eval text and scoring up to {chunks if chunks is not None else 'all'} chunk(s) "
            f"of {n_ctx} tokens with {backend}")
        win, out_logits, out_nll = _tokenize_and_score(spec, text, chunks, d, in_process,
                                                       keep_logits=source is not None, say=say,
                                                       phase=f"{phase} ({backend})")
        src_logits = None
        if source is not None:
            sb = source_backend or backend_for(source)
            src_spec = RunnerSpec(sb, str(Path(source).resolve()), n_ctx, threads, device)
            cached = None
            if source_cache is not None:
                limit = logits_cache_limit_bytes()
                cache_info = {"dir": str(Path(source_cache).resolve()), "entry": None, "hit": False,
                              "limit_mb": limit / MIB}
                if limit > 0:
                    cached = _cache_file(source_cache, source, win)
                else:
                    say(f"source logits cache disabled ({LOGITS_CACHE_ENV}=0)")
            src_logits = _cache_hit(cached) if cached is not None else None
            if src_logits is not None:
                say(f"source logits from cache ({cached})")
                cache_info.update(entry=str(cached), hit=True)
            else:
                say(f"evaluating the same chunks with the source model ({source}) in {sb}")
                src_logits, _ = _score(src_spec, win, d, "source", in_process, keep_logits=True, say=say,
                                       phase=f"{phase} source ({sb})")
                if cached is not None and _store(cached, d / "source.npy", limit, say):
                    cache_info["entry"] = str(cached)
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
    if cache_info is not None:
        res["source_cache"] = cache_info
    return res


def same_bytes(a: str | Path, b: str | Path) -> bool:
    """Whether two artifacts are the same bytes (the same path, or equal sizes and sha256)."""
    from llmops.core.hashing import sha256_path, size_of

    pa, pb = Path(a).resolve(), Path(b).resolve()
    if pa == pb:
        return True
    return size_of(pa) == size_of(pb) and sha256_path(pa) == sha256_path(pb)


def _evaluate_source_itself(spec: RunnerSpec, text: str, chunks: int | None, d: Path, in_process: bool,
                            source_cache: Path | None, say: Reporter, phase: str) -> dict[str, Any]:
    """The evaluation of a source against itself: its windows (cut from its own tokens, in a
    tokenizer-only child), its logits from the baseline cache or scored once, and the figures of
    those logits against themselves (KL-divergence 0, top-1 1, the same perplexity twice)."""
    limit = logits_cache_limit_bytes() if source_cache is not None else 0
    cache_info = None if source_cache is None else {"dir": str(Path(source_cache).resolve()), "entry": None,
                                                    "hit": False, "limit_mb": limit / MIB}
    win = _windows_of(spec, text, chunks, d, in_process)
    cached = _cache_file(source_cache, spec.path, win) if source_cache is not None and limit > 0 else None
    logits = _cache_hit(cached) if cached is not None else None
    if logits is not None:
        say(f"{Path(spec.path).name} is the baseline: its logits from the cache ({cached})")
        cache_info.update(entry=str(cached), hit=True)
    else:
        say(f"{Path(spec.path).name} is the baseline: scoring {win.n_chunk} chunk(s) of {spec.n_ctx} tokens once "
            f"with {spec.backend}, for both")
        logits, _ = _score(spec, win, d, "source", in_process, keep_logits=True, say=say,
                           phase=f"{phase} ({spec.backend})")
        if cached is not None and _store(cached, d / "source.npy", limit, say):
            cache_info["entry"] = str(cached)
    acc = StreamingAccuracy()
    for i in range(win.n_chunk):
        chunk = np.asarray(logits[i])
        acc.add(chunk, chunk, win.targets[i])
    del logits
    res = acc.result()
    res.update(chunks=win.n_chunk, n_ctx=spec.n_ctx)
    if cache_info is not None:
        res["source_cache"] = cache_info
    return res


def _windows_of(spec: RunnerSpec, text: str, chunks: int | None, d: Path, in_process: bool) -> Windows:
    """The windows an evaluation of ``spec`` scores, from its tokenizer alone."""
    if in_process:
        runner = make_runner(spec, vocab_only=True)
        tokens = leading_tokens(runner.tokenize, text, windows_tokens(chunks, spec.n_ctx))
        return make_windows(tokens, spec.n_ctx, chunks, runner.add_bos, runner.bos_id)
    text_file, inputs, targets = d / "text.txt", d / "windows-inputs.npy", d / "windows-targets.npy"
    text_file.write_text(text, encoding="utf-8")
    msg = run_in_child({"kind": "windows", "spec": spec.__dict__, "text_file": str(text_file), "chunks": chunks,
                        "inputs": str(inputs), "targets": str(targets)}, f"{spec.backend} tokenizer", d)
    return Windows(np.load(inputs), np.load(targets), int(msg["first"]), spec.n_ctx, int(msg["n_tokens"]))


def _cache_file(cache_dir: Path, source: str | Path, win: Windows) -> Path:
    """Source logits depend on the source's bytes and the exact windows fed to it, nothing else."""
    import hashlib

    from llmops.core.hashing import sha256_path

    key = hashlib.sha256()
    key.update(sha256_path(source).encode())
    key.update(np.ascontiguousarray(win.inputs).tobytes())
    key.update(f"{win.first}:{win.n_ctx}".encode())
    return Path(cache_dir) / f"logits-{key.hexdigest()[:32]}.npy"


def _mib(n: int) -> str:
    return f"{n / MIB:.1f}" if n < 10 * MIB else f"{n / MIB:.0f}"


# A temporary file of the cache this old belongs to a process that died while writing it.
_STALE_TMP_S = 3600.0


def _cache_hit(cached: Path) -> np.ndarray | None:
    """The cached logits, memory-mapped, or None; a hit counts as a use for eviction."""
    try:
        logits = np.load(cached, mmap_mode="r")
    except (FileNotFoundError, ValueError, OSError):  # absent, evicted meanwhile, or truncated
        return None
    try:
        os.utime(cached)  # least recently used goes first: a hit moves the entry to the back
    except OSError:
        pass
    return logits


def _cache_usage(folder: Path) -> list[tuple[float, int, Path]]:
    """(last use, size, path) of every entry of the cache, least recently used first."""
    entries = []
    for p in folder.glob("logits-*"):
        try:
            st = p.stat()
        except OSError:
            continue
        if p.suffix == ".npy" or time.time() - st.st_mtime > _STALE_TMP_S:
            entries.append((st.st_mtime, st.st_size, p))
    return sorted(entries)


def _evict(folder: Path, budget: int, keep: Path | None = None) -> int:
    """Remove least recently used entries until the cache holds at most ``budget`` bytes;
    returns what it holds afterwards."""
    entries = [e for e in _cache_usage(folder) if e[2] != keep]
    total = sum(size for _, size, _ in entries)
    for _, size, p in entries:
        if total <= budget:
            break
        p.unlink(missing_ok=True)
        total -= size
    return total


def _store(cached: Path, produced: Path, limit: int, say: Callable[[str], None] | Reporter) -> bool:
    """Put ``produced`` into the cache as ``cached`` within ``limit`` bytes, evicting least
    recently used entries first. False when it is not cached (too large, or a disk error:
    the cache is an optimisation, never a reason for an evaluation to fail)."""
    say = as_reporter(say)
    size = produced.stat().st_size
    if size > limit:
        say.warn(f"source logits not cached: {_mib(size)} MiB is more than the cache's cap of "
                 f"{_mib(limit)} MiB ({LOGITS_CACHE_ENV})")
        return False
    folder = cached.parent
    tmp = cached.with_name(f"{cached.stem}.tmp{os.getpid()}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        held = _evict(folder, limit - size, keep=cached)
        try:
            os.link(produced, tmp)  # the scratch folder is in the same cache: no copy
        except OSError:
            import shutil

            shutil.copyfile(produced, tmp)
        os.replace(tmp, cached)
    except OSError as exc:
        say.warn(f"source logits not cached in {folder}: {exc}")
        return False
    finally:
        tmp.unlink(missing_ok=True)
    say(f"source logits cached at {cached} ({_mib(size)} MiB; the cache holds {_mib(held + size)} "
        f"of at most {_mib(limit)} MiB, set {LOGITS_CACHE_ENV} to change, 0 to disable)")
    return True


def evaluate_gguf(gguf_path: str | Path, text: str, **kwargs: Any) -> dict[str, Any]:
    """``evaluate`` for a GGUF file (llama.cpp), kept for the converters' verify step."""
    return evaluate(gguf_path, text, backend="llama.cpp", **kwargs)
