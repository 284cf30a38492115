"""The task figures of ``llmops bench --metrics tasks``: one artifact's, and the paired
comparison with a baseline on the same questions.

Named ``TASK.METRIC`` (``hellaswag.acc_norm``): lm-eval's figures as it reports them
(``acc`` and ``acc_norm`` as fractions, ``*_stderr`` its standard errors, ``n`` the questions
scored), and against ``--baseline`` the paired figures: ``*_delta`` the mean per-question
difference in points (100 × (artifact − baseline)), ``*_delta_se`` its standard error
sqrt(var(d)/N) (sample variance of the per-question differences d), and ``flip_rate`` the
share of questions whose chosen answer changed (the choice ``acc_norm`` scores where the task
has it, else ``acc``'s). A baseline's per-question results are cached under the llmops cache
by everything that decides them (its sha256, backend, device, lm-eval's version, each task's
config, data, limit, shots and context).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmops.benchmarks.runners import RunnerSpec, backend_for
from llmops.benchmarks.tasks import TaskResult, TaskSuite
from llmops.core.errors import LLMOpsError
from llmops.core.progress import Reporter, as_reporter
from llmops.core.settings import cache_dir

PAIRED = ("delta", "delta_se")


def metric_prefix(task: str) -> str:
    """A task's name as the first part of a metric name a gate can name: lowercase letters,
    digits and underscores."""
    p = re.sub(r"[^a-z0-9_]", "_", task.lower())
    return p if p[:1].isalpha() or p[:1] == "_" else f"t_{p}"


def paired(result: TaskResult, base: TaskResult) -> dict[str, float]:
    """Per-metric mean difference (points) and its standard error over the questions both
    answered, and the flip rate of the chosen answers."""
    common = sorted(set(result.questions) & set(base.questions), key=lambda q: (len(q), q))
    if not common:
        raise LLMOpsError(f"{result.task}: the artifact and the baseline answered no question in common")
    out: dict[str, float] = {}
    for metric in result.metrics:
        a = [result.questions[q]["values"].get(metric) for q in common]
        b = [base.questions[q]["values"].get(metric) for q in common]
        if any(v is None for v in a + b):
            continue
        d = 100.0 * (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
        out[f"{metric}_delta"] = float(d.mean())
        out[f"{metric}_delta_se"] = float(math.sqrt(d.var(ddof=1) / len(d))) if len(d) > 1 else float("nan")
    key = "answer_norm" if result.primary == "acc_norm" else "answer"
    flips = [result.questions[q][key] != base.questions[q][key] for q in common]
    out["flip_rate"] = float(np.mean(flips))
    out["paired_n"] = float(len(common))
    return out


def _cache_key(suite: TaskSuite, spec: RunnerSpec, sha256: str, task: str) -> str:
    import lm_eval

    o = suite.opts
    ident = {"model_sha256": sha256, "backend": spec.backend, "device": spec.device, "lm_eval": lm_eval.__version__,
             "task": task, **suite.identity(task), "limit": o.limit, "shots": o.num_fewshot, "ctx": o.ctx}
    ident.pop("data_file")
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _cache_file(key: str) -> Path:
    return cache_dir() / "tasks" / "results" / f"{key[:32]}.json"


def _cached(key: str) -> TaskResult | None:
    try:
        data = json.loads(_cache_file(key).read_text(encoding="utf-8"))
        return TaskResult(**data["result"]) if data.get("key") == key else None
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _store(key: str, result: TaskResult) -> None:
    from llmops.core.atomic import write_bytes_atomic

    try:
        write_bytes_atomic(_cache_file(key), json.dumps({"key": key, "result": result.to_dict()}).encode())
    except (OSError, LLMOpsError):
        pass  # a cache: never a reason for a benchmark to fail


def baseline_results(suite: TaskSuite, spec: RunnerSpec, *, progress: Reporter, phase: str) -> tuple[dict[str, TaskResult], dict[str, bool]]:
    """The baseline's results per task, from the cache where they are there; (results, hit per task)."""
    sha = suite.sha256(spec.path)
    keys = {t: _cache_key(suite, spec, sha, t) for t in suite.opts.tasks}
    found = {t: r for t, k in keys.items() if (r := _cached(k)) is not None}
    missing = [t for t in suite.opts.tasks if t not in found]
    if found:
        progress(f"baseline task results from the cache: {', '.join(sorted(found))}")
    if missing:
        fresh = suite.evaluate(spec, tasks=missing, progress=progress, phase=phase)
        for t, r in fresh.items():
            _store(keys[t], r)
        found.update(fresh)
    return found, {t: t not in missing for t in suite.opts.tasks}


def score_tasks(path: Path, spec: RunnerSpec, suite: TaskSuite, *, baseline: Path | None = None,
                progress: Callable[[str], None] | Reporter | None = None) -> dict[str, Any]:
    """The task figures of one artifact (against ``baseline`` when given), as bench's
    ``{"metrics", "details"}``. An artifact with the baseline's bytes takes the baseline's results."""
    import lm_eval

    say = as_reporter(progress)
    base: dict[str, TaskResult] | None = None
    hits: dict[str, bool] = {}
    results = None
    if baseline is not None:
        bspec = RunnerSpec(backend_for(baseline), str(baseline), spec.n_ctx, spec.threads, spec.device)
        base, hits = baseline_results(suite, bspec, progress=say, phase=f"tasks baseline ({bspec.backend})")
        if bspec.backend == spec.backend and suite.sha256(path) == suite.sha256(baseline):
            say(f"{path.name} has the baseline's bytes: its task results are the baseline's")
            results = base
    if results is None:
        say(f"{path.name}: {', '.join(suite.opts.tasks)} with lm-eval {lm_eval.__version__} through {spec.backend}")
        results = suite.evaluate(spec, progress=say, phase=f"tasks ({spec.backend})")
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    for name, r in results.items():
        p = metric_prefix(name)
        metrics.update({f"{p}.{m}": v for m, v in r.metrics.items()})
        metrics.update({f"{p}.{m}_stderr": v for m, v in r.stderr.items()})
        metrics[f"{p}.n"] = float(r.n)
        d = {"prefix": p, "n": r.n, "shots": r.shots, "limit": suite.opts.limit, "ctx": suite.opts.ctx,
             "split": r.split, "version": r.version, "config_sha256": r.config_sha256, "data_file": r.data_file,
             "data_sha256": r.data_sha256, "output_type": r.output_type, "primary": r.primary,
             "harness": f"lm-eval {lm_eval.__version__}"}
        if base is not None:
            stats = paired(r, base[name])
            d.update(paired_n=int(stats.pop("paired_n")), baseline_cached=hits.get(name, False))
            metrics.update({f"{p}.{k}": v for k, v in stats.items()})
        details[name] = d
    # the folders lm-eval's own command line takes as --include_path to score the same tasks
    return {"metrics": metrics, "details": {"tasks": details, "task_include_path": [str(p) for p in suite.include]}}
