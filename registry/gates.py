"""Promotion gates: ``METRIC OP NUMBER`` parsed strictly, evaluated against measured values.

MLflow's own gate primitive (``MetricThreshold`` / ``validate_evaluation_results``)
compares an evaluation against a baseline model's evaluation; our gates compare
recorded benchmark metrics (and ratios against the alias holder) with fixed
thresholds in any direction, and a missing metric must fail with a hint, so the
small evaluator lives here.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import asdict, dataclass
from typing import Any

from llmops.core.errors import UsageError

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}
# METRIC is a name (ppl, kld_ratio) or a task's figure TASK.NAME (hellaswag.acc_norm_delta)
_GATE = re.compile(r"^\s*(?P<metric>(?:[a-z_][a-z0-9_]{0,63}\.)?[a-z][a-z0-9_]{0,63})\s*(?P<op><=|>=|==|!=|<|>)\s*"
                   r"(?P<value>[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)\s*$")

# Where each metric comes from, for the hint on a missing one.
HINTS = {
    "ppl": "llmops bench REF --metrics accuracy",
    "kld": "llmops bench REF --metrics accuracy --baseline SOURCE",
    "top1": "llmops bench REF --metrics accuracy --baseline SOURCE",
    "decode_tps": "llmops bench REF --metrics latency",
    "prefill_tps": "llmops bench REF --metrics latency",
    "ttft_ms": "llmops bench REF --metrics latency",
    "peak_rss_mb": "llmops bench REF --metrics memory",
    "load_s": "llmops bench REF --metrics memory",
    **{f"prod_{m}": "llmops serve models:/NAME@staging (requests through it), then llmops monitor NAME"
       for m in ("requests", "error_rate", "client_error_rate", "cancelled", "p50_latency_ms", "p95_latency_ms",
                 "p50_ttft_ms", "p95_ttft_ms", "tokens_per_s")},
}


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


# A task's figures (llmops bench --metrics tasks), by the part after the task's name.
TASK_HINTS = {
    "delta": "llmops bench REF --metrics tasks --tasks {task} --baseline SOURCE",
    "delta_se": "llmops bench REF --metrics tasks --tasks {task} --baseline SOURCE",
    "flip_rate": "llmops bench REF --metrics tasks --tasks {task} --baseline SOURCE",
}
TASK_HINT = "llmops bench REF --metrics tasks --tasks {task}"


def hint_for(metric: str) -> str:
    """The command that measures ``metric`` (the base name of a ``*_ratio``)."""
    if "." in metric:
        task, name = metric.split(".", 1)
        hint = next((h for suffix, h in TASK_HINTS.items() if name == suffix or name.endswith("_" + suffix)), TASK_HINT)
        return hint.format(task=task)
    return HINTS.get(metric, "llmops bench REF")


def parse_gate(text: str) -> Gate:
    m = _GATE.match(text or "")
    if not m:
        raise UsageError(f"invalid gate {text!r}: expected 'METRIC OP NUMBER' with OP one of {' '.join(OPS)}, "
                         "e.g. 'ppl_ratio <= 1.05' or 'hellaswag.acc_norm_delta >= -1.0'")
    value = float(m.group("value"))
    if not math.isfinite(value):
        raise UsageError(f"invalid gate {text!r}: threshold must be a finite number")
    return Gate(m.group("metric"), m.group("op"), value)


@dataclass(frozen=True)
class Provenance:
    """Which results a measured value comes from: the protocol's key (short) and a summary."""

    protocol: str | None
    summary: str


@dataclass
class GateResult:
    gate: str
    metric: str
    op: str
    threshold: float
    measured: float | None
    passed: bool
    note: str | None = None
    protocol: str | None = None  # the short key of the protocol the measured value was read under
    protocol_summary: str | None = None  # e.g. "bench ppl, 16 chunks x 512, llama.cpp, 2 threads, cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(gates: list[Gate], metrics: dict[str, float], provenance: dict[str, Provenance] | None = None,
             notes: dict[str, str] | None = None) -> list[GateResult]:
    """Each gate against its metric; ``provenance`` says which protocol each value was read under,
    ``notes`` why a metric has no value (e.g. no comparable result of the alias holder)."""
    provenance, notes = provenance or {}, notes or {}
    results = []
    for g in gates:
        value = metrics.get(g.metric)
        base = g.metric[: -len("_ratio")] if g.metric.endswith("_ratio") else g.metric
        prov = provenance.get(g.metric) or provenance.get(base)
        where = (prov.protocol, prov.summary) if prov is not None else (None, None)
        if value is None:
            note = notes.get(g.metric)
            if note is None:
                hint = hint_for(base)
                note = (f"no {g.metric} recorded: run `{hint}`"
                        + (" for this version and the alias holder" if g.metric.endswith("_ratio") else ""))
            results.append(GateResult(str(g), g.metric, g.op, g.threshold, None, False, note, *where))
            continue
        ok = bool(OPS[g.op](value, g.threshold)) and math.isfinite(value)
        results.append(GateResult(str(g), g.metric, g.op, g.threshold, value, ok, None, *where))
    return results
