"""Accuracy metrics, written once for every format (memory sampling is the core's: ``llmops.core.procfs``).

All functions take logits as ``[tokens, vocab]`` arrays and work chunk by chunk, so
a whole evaluation never needs more than one chunk's logits per model in memory.

* per-token negative log-likelihood, perplexity = exp(mean NLL);
* KL-divergence KL(P_source || Q_artifact) per token, averaged (natural log, nats),
  the same quantity llama.cpp's ``perplexity --kl-divergence`` reports as "Mean KLD";
* top-1 agreement: how often the artifact's most likely next token equals the source's.

Sums are accumulated in float64.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64-accurate form (computed in float64 per row block)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, targets: np.ndarray, *, threads: int | None = None) -> np.ndarray:
    """NLL of ``targets[i]`` under ``logits[i]`` for each row i.

    Only the log-sum-exp of each row is needed, not the whole log-softmax: the exponentials
    are taken in float32 after subtracting the row maximum (each lies in (0, 1], relative
    error ~1e-7) and summed in float64, half the memory traffic of a float64 log-softmax.
    Rows are split over ``threads`` (default: every core; numpy's loops release the GIL), as
    llama-perplexity spreads its own log-softmax: a 49k vocabulary makes this ~0.1 s a chunk
    on one core, a tenth of the model's time. Each row's arithmetic is the same however the
    rows are split, so the result does not depend on the thread count."""
    x = np.asarray(logits, dtype=np.float32)
    t = np.asarray(targets, dtype=np.int64)
    n = min(threads or os.cpu_count() or 1, max(1, x.shape[0] // 64))
    if n <= 1:
        return _rows_nll(x, t)
    bounds = np.linspace(0, x.shape[0], n + 1).astype(int)
    parts = list(_pool(n).map(lambda ab: _rows_nll(x[ab[0]:ab[1]], t[ab[0]:ab[1]]), zip(bounds[:-1], bounds[1:])))
    return np.concatenate(parts)


def _rows_nll(x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    rows = np.arange(x.shape[0])
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1, dtype=np.float64)) + m[:, 0].astype(np.float64)
    return lse - x[rows, targets].astype(np.float64)


_POOLS: dict[int, Any] = {}


def _pool(n: int) -> Any:
    from concurrent.futures import ThreadPoolExecutor

    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="llmops-nll")
    return _POOLS[n]


def perplexity(nll: np.ndarray | list[float]) -> float:
    a = np.asarray(nll, dtype=np.float64)
    return float(math.exp(a.mean())) if a.size else float("nan")


def token_kld(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(P||Q) per row, P the reference (source) distribution."""
    lp = log_softmax(p_logits)
    lq = log_softmax(q_logits)
    kld = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return np.maximum(kld, 0.0)  # rounding can give -1e-17


def top1_agreement(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    return np.argmax(p_logits, axis=-1) == np.argmax(q_logits, axis=-1)


@dataclass
class StreamingAccuracy:
    """Accumulate PPL (both models), KLD and top-1 over chunks of scored positions."""

    count: int = 0
    nll_source: float = 0.0
    nll_output: float = 0.0
    kld_sum: float = 0.0
    top1_hits: int = 0
    kld_values: list[float] = field(default_factory=list)

    def add(self, source_logits: np.ndarray | None, output_logits: np.ndarray, targets: np.ndarray) -> None:
        n = len(targets)
        self.nll_output += float(token_nll(output_logits, targets).sum())
        if source_logits is not None:
            self.nll_source += float(token_nll(source_logits, targets).sum())
            k = token_kld(source_logits, output_logits)
            self.kld_sum += float(k.sum())
            self.kld_values.extend(k.tolist())
            self.top1_hits += int(top1_agreement(source_logits, output_logits).sum())
        self.count += n

    def add_nll(self, nll: np.ndarray) -> None:
        """Scored tokens whose NLL was computed where the logits were made (no comparison)."""
        a = np.asarray(nll, dtype=np.float64)
        self.nll_output += float(a.sum())
        self.count += int(a.size)

    def result(self) -> dict[str, float | None]:
        if self.count == 0:
            return {"kld": None, "top1_agreement": None, "ppl_source": None, "ppl_output": None, "tokens": 0}
        has_source = bool(self.kld_values)
        kv = np.asarray(self.kld_values) if has_source else None
        return {
            "kld": self.kld_sum / self.count if has_source else None,
            "kld_p99": float(np.percentile(kv, 99)) if kv is not None else None,
            "top1_agreement": self.top1_hits / self.count if has_source else None,
            "ppl_source": math.exp(self.nll_source / self.count) if has_source else None,
            "ppl_output": math.exp(self.nll_output / self.count),
            "tokens": self.count,
        }
