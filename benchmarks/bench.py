"""``llmops bench``: memory, latency and accuracy of one artifact, whatever its format.

The runner for each format runs in a child process (see ``jobs.py``), so a
native crash or an out-of-memory kill is a one-line error naming the artifact.
Accuracy is the same evaluation ``convert --verify`` uses; latency and memory
come from ``latency.py``. Speeds are medians of several runs after a warm-up. Working files
(the prompt's token ids) go to the scratch folder in the llmops cache, not to ``/tmp``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmops.benchmarks.runners import RunnerSpec, backend_for

from llmops.benchmarks.jobs import run_in_child
from llmops.core.settings import scratch

MIB = 1024 * 1024
METRICS = ("memory", "latency", "accuracy")
UNITS = {"file_mb": "MiB", "bits_per_weight": "bit", "load_s": "s", "peak_rss_mb": "MiB", "peak_vram_mb": "MiB",
         "ttft_ms": "ms", "prefill_tps": "tok/s", "decode_tps": "tok/s", "ppl": None, "kld": "nat", "top1": None,
         "ppl_baseline": None, "kld_p99": "nat"}


@dataclass
class BenchOptions:
    metrics: set[str] = field(default_factory=lambda: set(METRICS))
    device: str = "cpu"
    threads: int | None = None
    text: str | None = None
    ctx: int = 512
    chunks: int | None = 16
    baseline: Path | None = None
    runs: int = 3
    prompt_tokens: int = 512
    decode_tokens: int = 128
    cache_dir: Path | None = None  # the baseline-logits cache (capped by LLMOPS_LOGITS_CACHE_MB); None: no caching


def _median(values: list[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


def bench_artifact(path: str | Path, opts: BenchOptions, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """All requested metrics of one artifact, as ``{"metrics": {name: value}, "details": {...}}``."""
    from llmops.core.artifact_info import describe
    from llmops.benchmarks.accuracy import evaluate, tokenize_with
    from llmops.core.hashing import size_of

    say = progress or (lambda _m: None)
    path = Path(path).resolve()
    backend = backend_for(path)
    info = describe(path)
    metrics: dict[str, float] = {"file_mb": size_of(path) / MIB}
    if info.bits_per_weight:
        metrics["bits_per_weight"] = info.bits_per_weight
    details: dict[str, Any] = {"backend": backend, "device": opts.device, "format": info.format, "quant": info.quant,
                               "threads": opts.threads}
    spec = RunnerSpec(backend, str(path), opts.ctx, opts.threads, opts.device)
    if opts.metrics & {"memory", "latency"}:
        with scratch("llmops-bench-") as d:
            prompt_file = d / "prompt.npy"
            if "latency" in opts.metrics:
                if not opts.text:
                    raise ValueError("latency needs a prompt text")
                tokens, _, _ = tokenize_with(spec, opts.text[: opts.prompt_tokens * 12], workdir=d)
                np.save(prompt_file, tokens[: opts.prompt_tokens])
            else:
                np.save(prompt_file, np.zeros(1, dtype=np.int32))
            say(f"{path.name}: timing load{', prefill and decode' if 'latency' in opts.metrics else ''} with {backend}")
            r = run_in_child({"kind": "latency", "spec": spec.__dict__, "prompt": str(prompt_file),
                              "decode_tokens": opts.decode_tokens, "runs": opts.runs,
                              "latency": "latency" in opts.metrics}, f"{backend} runner for {path.name}", d)
        metrics["load_s"] = r["load_s"]
        metrics["peak_rss_mb"] = r["peak_rss_bytes"] / MIB
        if r.get("peak_vram_bytes"):
            metrics["peak_vram_mb"] = r["peak_vram_bytes"] / MIB
        if "latency" in opts.metrics:
            for key in ("ttft_ms", "prefill_tps", "decode_tps"):
                metrics[key] = _median(r[key])
                details[key] = {"median": metrics[key], "min": min(r[key]), "max": max(r[key]), "runs": r[key]}
            details.update(prompt_tokens=r["prompt_tokens"], decode_tokens=r["decode_tokens"], runs=r["runs"])
    if "accuracy" in opts.metrics:
        if not opts.text:
            raise ValueError("accuracy needs an eval text")
        say(f"{path.name}: perplexity on {opts.chunks or 'all'} chunk(s) of {opts.ctx} tokens")
        res = evaluate(path, opts.text, backend=backend, source=opts.baseline, chunks=opts.chunks, n_ctx=opts.ctx,
                       threads=opts.threads, device=opts.device, source_cache=opts.cache_dir, progress=say)
        metrics["ppl"] = res["ppl_output"]
        if res.get("kld") is not None:
            metrics.update(kld=res["kld"], top1=res["top1_agreement"], kld_p99=res["kld_p99"],
                           ppl_baseline=res["ppl_source"])
        details.update(chunks=res["chunks"], ctx=res["n_ctx"], scored_tokens=res["tokens"])
        if res.get("source_cache") is not None:
            details["baseline_logits_cache"] = res["source_cache"]
    return {"metrics": metrics, "details": details}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (smaller x, smaller y): the size/accuracy trade-off."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front


def tradeoff_plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """File size against perplexity, marker area by decode speed, the Pareto front drawn through."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["file_mb"], r["ppl"]) for r in rows]
    front = set(pareto_front(pts))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    speeds = [r.get("decode_tps") or 0 for r in rows]
    top = max(speeds) or 1
    for i, r in enumerate(rows):
        ax.scatter(r["file_mb"], r["ppl"], s=60 + 400 * (speeds[i] / top), alpha=0.75,
                   color="#d62728" if i in front else "#1f77b4", edgecolors="black", linewidths=0.5, zorder=3)
        label = r["label"] + (f"\n{speeds[i]:.0f} tok/s" if speeds[i] else "")
        ax.annotate(label, (r["file_mb"], r["ppl"]), textcoords="offset points", xytext=(8, 6), fontsize=8)
    fr = sorted((pts[i] for i in front))
    if len(fr) > 1:
        ax.plot([p[0] for p in fr], [p[1] for p in fr], "--", color="#d62728", label="Pareto front", zorder=2)
        ax.legend()
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("size / accuracy / speed (marker area: decode tok/s)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
