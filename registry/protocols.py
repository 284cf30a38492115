"""Measurement protocols: the conditions a benchmark result was measured under.

Two results are comparable only when they were measured the same way: the same
kind of job (``verify`` for ``convert --verify``, ``bench`` for ``llmops bench``),
metric family, eval text, context, chunks, scored positions, baseline, backend,
threads, device and tool versions; for a task's accuracy (``TASK.METRIC``), the task,
its config and data, split, limit, shots and harness version. A protocol is a small JSON object; its key is
the sha256 of its canonical JSON, stored (and indexed) beside every result.

The registry knows no file format: callers build the protocol from what they ran
and pass it as plain data. Results recorded before protocols existed carry
:data:`UNKNOWN`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

UNKNOWN: dict[str, Any] = {"kind": "unknown"}
SHORT = 12

# Metric -> family (what a gate or a table column measures).
FAMILIES = {
    "ppl": "accuracy", "kld": "accuracy", "top1": "accuracy", "kld_p99": "accuracy", "ppl_baseline": "accuracy",
    "ttft_ms": "latency", "prefill_tps": "latency", "decode_tps": "latency",
    "file_mb": "memory", "bits_per_weight": "memory", "load_s": "memory", "peak_rss_mb": "memory",
    "peak_vram_mb": "memory",
}
# Metrics measured against a baseline model: their protocol names the baseline's bytes.
BASELINE_METRICS = frozenset({"kld", "top1", "kld_p99", "ppl_baseline"})
# Task accuracy (``llmops bench --metrics tasks``) is named TASK.METRIC, e.g. hellaswag.acc_norm;
# these last parts are paired figures against the baseline.
TASK_BASELINE_SUFFIXES = ("_delta", "_delta_se")
TASK_BASELINE_METRICS = frozenset({"flip_rate"})
# What a comparison across formats may differ in: each format has its own runtime.
RUNTIME_FIELDS = ("backend", "tools")


def canonical(protocol: dict[str, Any]) -> str:
    """The one JSON text of a protocol: sorted keys, no spaces, ASCII."""
    return json.dumps(protocol, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def protocol_key(protocol: dict[str, Any] | None) -> str:
    """sha256 hex of the canonical JSON (``None`` is :data:`UNKNOWN`)."""
    return hashlib.sha256(canonical(protocol or UNKNOWN).encode()).hexdigest()


def short(key: str | None) -> str | None:
    return key[:SHORT] if key else None


def family_of(metric: str) -> str | None:
    if is_task_metric(metric):
        return "accuracy"
    return FAMILIES.get(metric)


def is_task_metric(metric: str) -> bool:
    """A task's figure: ``TASK.METRIC``."""
    return "." in metric


def against_baseline(metric: str) -> bool:
    """Whether a metric is measured against a baseline model (its protocol then names the baseline)."""
    if is_task_metric(metric):
        last = metric.rsplit(".", 1)[1]
        return last in TASK_BASELINE_METRICS or last.endswith(TASK_BASELINE_SUFFIXES)
    return metric in BASELINE_METRICS


def condition_key(protocol: dict[str, Any] | None) -> str:
    """The key of a protocol without its runtime (backend, tool versions): what must match
    between rows of one column when formats, and so runtimes, are compared."""
    p = {k: v for k, v in (protocol or UNKNOWN).items() if k not in RUNTIME_FIELDS}
    return protocol_key(p)


def summary(protocol: dict[str, Any] | None, metric: str | None = None, *, runtime: bool = True) -> str:
    """One short line a person reads: ``bench ppl, 16 chunks x 512, llama.cpp, 2 threads, cpu``."""
    p = protocol or UNKNOWN
    kind = p.get("kind", "unknown")
    head = " ".join(x for x in (kind, metric) if x)
    if kind == "unknown":
        return f"{head}, recorded without a protocol"
    parts = [head]
    family = p.get("family")
    if family == "accuracy" and p.get("measure") == "task":
        limit = p.get("limit")
        parts.append(f"{p.get('task', '?')} {p.get('split', '?')}" + (f" first {limit}" if limit else " all")
                     + f", {p.get('shots', 0)}-shot, {p.get('harness', 'lm-eval')}, data {str(p.get('data_sha256'))[:SHORT]}")
        if p.get("baseline_sha256"):
            parts.append(f"against {str(p['baseline_sha256'])[:SHORT]}")
    elif family == "accuracy":
        parts.append(f"{p.get('chunks', '?')} chunks x {p.get('ctx', '?')}")
        if p.get("baseline_sha256"):
            parts.append(f"against {str(p['baseline_sha256'])[:SHORT]}")
    elif family == "latency":
        parts.append(f"{p.get('prompt_tokens', '?')}-token prompt, {p.get('decode_tokens', '?')} decoded, "
                     f"median of {p.get('runs', '?')}")
    elif family == "memory" and p.get("measure") == "bytes":
        parts.append("file bytes")
        return ", ".join(parts)
    elif family == "memory":
        workload = p.get("workload")
        if isinstance(workload, dict):
            parts.append(f"during {workload.get('prompt_tokens', '?')}+{workload.get('decode_tokens', '?')}-token runs")
        else:
            parts.append("load only")
    if runtime and p.get("backend"):
        parts.append(str(p["backend"]))
    if p.get("threads") is not None:
        parts.append(f"{p['threads']} threads")
    if p.get("device"):
        parts.append(str(p["device"]))
    return ", ".join(parts)
