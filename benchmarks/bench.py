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
METRICS = ("memory", "latency", "accuracy", "tasks")
UNITS = {"file_mb": "MiB", "bits_per_weight": "bit", "load_s": "s", "peak_rss_mb": "MiB", "peak_vram_mb": "MiB",
         "ttft_ms": "ms", "prefill_tps": "tok/s", "decode_tps": "tok/s", "ppl": None, "kld": "nat", "top1": None,
         "ppl_baseline": None, "kld_p99": "nat"}
# task figures (``TASK.METRIC``) by their last part
TASK_UNITS = {"delta": "pt", "delta_se": "pt", "n": "questions"}


def unit_of(metric: str) -> str | None:
    if "." in metric:
        last = metric.rsplit(".", 1)[1]
        return next((u for suffix, u in TASK_UNITS.items() if last == suffix or last.endswith("_" + suffix)), None)
    return UNITS.get(metric)


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
    tasks: Any = None  # tasks.TaskOptions for the "tasks" metric
    task_suite: Any = None  # the tasks.TaskSuite built for them, shared by every artifact of a run


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
    if "tasks" in opts.metrics:
        from llmops.benchmarks.task_scores import score_tasks
        from llmops.benchmarks.tasks import TaskOptions, TaskSuite

        if opts.task_suite is None:
            opts.task_suite = TaskSuite(opts.tasks or TaskOptions(), say)
        task_spec = RunnerSpec(backend, str(path), opts.task_suite.opts.ctx, opts.threads, opts.device)
        res = score_tasks(path, task_spec, opts.task_suite, baseline=opts.baseline, progress=say)
        metrics.update(res["metrics"])
        details.update(res["details"])
    return {"metrics": metrics, "details": details}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (smaller x, smaller y): the size/accuracy trade-off."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front


PLOT_DPI = 110
LABEL_FONT = 10


def tradeoff_plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """File size against perplexity, marker area by decode speed, the Pareto front drawn through;
    alias holders (``row["aliases"]``) drawn as stars and named ``@alias`` in their labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = tradeoff_figure(rows)
    fig.savefig(path, dpi=PLOT_DPI, facecolor="white")
    plt.close(fig)
    return Path(path)


def tradeoff_figure(rows: list[dict[str, Any]]):  # noqa: ANN201 - matplotlib Figure
    """The trade-off plot as a figure whose point labels are placed: no label overlaps another
    label, a marker, the title or the legend, and every label stays inside the axes (a label
    with no free place becomes a number, spelled out under the plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    pts = [(float(r["file_mb"]), float(r["ppl"])) for r in rows]
    front = set(pareto_front(pts))
    fig, ax = plt.subplots(figsize=(8, 5.6), dpi=PLOT_DPI)
    # the layout is fixed before the labels are placed: moving the axes afterwards would move them
    fig.subplots_adjust(left=0.1, right=0.97, top=0.86, bottom=0.2)
    speeds = [float(r.get("decode_tps") or 0) for r in rows]
    top = max(speeds) or 1.0
    areas = []
    for i, r in enumerate(rows):
        holder = bool(r.get("aliases"))
        area = (60 + 400 * (speeds[i] / top)) * (2.2 if holder else 1.0)
        areas.append(area)
        ax.scatter(*pts[i], s=area, marker="*" if holder else "o", alpha=0.8,
                   color="#d62728" if i in front else "#1f77b4", edgecolors="black", linewidths=0.6, zorder=3)
    fr = sorted(pts[i] for i in front)
    handles = []
    if len(fr) > 1:
        (line,) = ax.plot([p[0] for p in fr], [p[1] for p in fr], "--", color="#d62728", zorder=2)
        handles.append((line, "Pareto front"))
    handles.append((Line2D([], [], ls="", marker="o", color="#d62728", mec="black"), "on the front"))
    if len(front) < len(rows):
        handles.append((Line2D([], [], ls="", marker="o", color="#1f77b4", mec="black"), "off the front"))
    if any(r.get("aliases") for r in rows):
        handles.append((Line2D([], [], ls="", marker="*", ms=12, color="#999999", mec="black"), "alias holder"))
    legend = fig.legend([h for h, _ in handles], [t for _, t in handles], loc="lower center", ncol=len(handles),
                        frameon=False, bbox_to_anchor=(0.5, 0.06))
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("size / accuracy / speed\n(marker area: decode tok/s)", fontsize=11, pad=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.3 if len(rows) > 1 else 0.5, y=0.35 if len(rows) > 1 else 0.5)
    labels = [_point_label(r, speeds[i]) for i, r in enumerate(rows)]
    fig.canvas.draw()
    _place_labels(fig, ax, pts, areas, labels, extra=[ax.title, legend], lines=fr if len(fr) > 1 else [])
    return fig


def _point_label(row: dict[str, Any], speed: float) -> str:
    head = str(row["label"]) + "".join(f" @{a}" for a in row.get("aliases") or [])
    return head + (f"\n{speed:.0f} tok/s" if speed else "")


def _place_labels(fig, ax, pts: list[tuple[float, float]], areas: list[float], labels: list[str],  # noqa: ANN001
                  extra: list, lines: list[tuple[float, float]] | None = None) -> None:  # noqa: ANN001
    """Each label at the first of a ring of offsets (then wider rings) where its box is inside
    the axes and clear of every marker, every label placed before it, ``extra`` (artists) and
    the polyline through ``lines`` (data points: the Pareto front); a thin leader line when it
    had to move away, which later labels keep clear of too. Labels with nowhere to go are numbered."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72.0
    inside = ax.get_window_extent(renderer).padded(-3)
    centres = [ax.transData.transform(p) for p in pts]
    path = [tuple(ax.transData.transform(p)) for p in lines or []]
    segments: list[tuple[tuple[float, float], tuple[float, float]]] = list(zip(path, path[1:]))
    radii = [(a ** 0.5) / 2 for a in areas]  # marker size is area in points^2: its diameter squared
    blocked = [Bbox.from_bounds(cx - r * px - 2, cy - r * px - 2, 2 * (r * px + 2), 2 * (r * px + 2))
               for (cx, cy), r in zip(centres, radii)]
    blocked += [a.get_window_extent(renderer).padded(3) for a in extra if a is not None]
    notes: list[str] = []
    # the crowded first: points with the most neighbours nearby pick their places first
    order = sorted(range(len(pts)), key=lambda i: -sum(
        1 for j in range(len(pts)) if ((centres[i] - centres[j]) ** 2).sum() < (120 * px) ** 2))
    for i in order:
        r = radii[i] + 3
        ann = ax.annotate(labels[i], pts[i], textcoords="offset points", xytext=(0, 0), fontsize=LABEL_FONT,
                          zorder=4)
        spot = _free_spot(ann, renderer, r, inside, blocked, Text, segments)
        if spot is None:  # nowhere to go: a number here, the label under the plot
            notes.append(f"[{len(notes) + 1}] {labels[i].replace(chr(10), ', ')}")
            ann.set_text(f"[{len(notes)}]")
            spot = _free_spot(ann, renderer, r, inside, blocked, Text, segments)
            if spot is None:
                ann.remove()
                continue
        box, far = spot
        if far:  # the same text, with a leader line to its point
            text, at, ha, va = ann.get_text(), ann.xyann, ann.get_ha(), ann.get_va()
            ann.remove()
            ax.annotate(text, pts[i], textcoords="offset points", xytext=at, ha=ha, va=va, fontsize=LABEL_FONT,
                        zorder=4, arrowprops={"arrowstyle": "-", "color": "#777777", "lw": 0.6, "shrinkA": 1,
                                              "shrinkB": radii[i] + 1})
            near = (min(max(centres[i][0], box.x0), box.x1), min(max(centres[i][1], box.y0), box.y1))
            segments.append((tuple(centres[i]), near))
        blocked.append(box.padded(2))
    if notes:
        fig.text(0.01, 0.005, "   ".join(notes), fontsize=LABEL_FONT - 1, va="bottom", wrap=True)


# (dx, dy) directions in units of the marker radius, and how the text hangs from its anchor
_RING = ((1, 0.7, "left", "bottom"), (1, -0.7, "left", "top"), (-1, 0.7, "right", "bottom"),
         (-1, -0.7, "right", "top"), (1.2, 0, "left", "center"), (-1.2, 0, "right", "center"),
         (0, 1, "center", "bottom"), (0, -1, "center", "top"))


def _free_spot(ann, renderer, r: float, inside, blocked: list, text_cls,  # noqa: ANN001, ANN202
               segments: list | None = None):
    """(box, far) of the first free place for ``ann`` around its point, or None; ``far`` when it
    is off the first ring (a leader line then shows whose label it is)."""
    for ring, scale in enumerate((1.0, 1.8, 2.8, 4.0, 5.5)):
        for dx, dy, ha, va in _RING:
            ann.xyann = (dx * (r * scale + 2), dy * (r * scale + 2))
            ann.set_ha(ha)
            ann.set_va(va)
            ann.update_positions(renderer)  # the text's own transform follows its offset
            box = text_cls.get_window_extent(ann, renderer)
            if inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1) and \
                    not any(box.overlaps(b) for b in blocked) and \
                    not any(_crosses(box.padded(2), a, b) for a, b in segments or []):
                return box, ring > 0
    return None


def _crosses(box, a: tuple[float, float], b: tuple[float, float]) -> bool:  # noqa: ANN001 - a Bbox
    """Whether the segment a-b passes through the box (Liang-Barsky clipping, display units)."""
    (x0, y0), (x1, y1) = a, b
    dx, dy = x1 - x0, y1 - y0
    lo, hi = 0.0, 1.0
    for p, q in ((-dx, x0 - box.x0), (dx, box.x1 - x0), (-dy, y0 - box.y0), (dy, box.y1 - y0)):
        if p == 0:
            if q < 0:
                return False
            continue
        t = q / p
        if p < 0:
            lo = max(lo, t)
        else:
            hi = min(hi, t)
        if lo > hi:
            return False
    return True
