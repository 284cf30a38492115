"""Perplexity / KL-divergence / top-1 metrics and the llama.cpp-compatible windowing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmops.benchmarks.windows import make_windows
from llmops.core.procfs import PeakRSS
from llmops.benchmarks.metrics import (
    StreamingAccuracy,
    log_softmax,
    perplexity,
    token_kld,
    token_nll,
    top1_agreement,
)
from llmops.core.errors import LLMOpsError

rng = np.random.default_rng(0)


def test_log_softmax_matches_naive() -> None:
    x = rng.normal(size=(5, 50)).astype(np.float32) * 10
    naive = np.log(np.exp(x.astype(np.float64)) / np.exp(x.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(log_softmax(x), naive, atol=1e-12)
    big = np.array([[1000.0, 0.0, -1000.0]])
    assert np.isfinite(log_softmax(big)).all()


def test_nll_and_perplexity() -> None:
    uniform = np.zeros((10, 32), dtype=np.float32)
    targets = rng.integers(0, 32, size=10)
    nll = token_nll(uniform, targets)
    np.testing.assert_allclose(nll, math.log(32))
    assert perplexity(nll) == pytest.approx(32.0)


def test_artifact_against_itself() -> None:
    logits = rng.normal(size=(64, 100)).astype(np.float32) * 3
    targets = rng.integers(0, 100, size=64)
    np.testing.assert_array_equal(token_kld(logits, logits), 0.0)
    assert top1_agreement(logits, logits).all()
    acc = StreamingAccuracy()
    acc.add(logits, logits, targets)
    r = acc.result()
    assert r["kld"] == 0.0 and r["top1_agreement"] == 1.0
    # both perplexities against one computed here from the definition (float64), not against each other
    x = logits.astype(np.float64)
    nll = np.log(np.exp(x).sum(-1)) - x[np.arange(64), targets]
    want = math.exp(nll.mean())
    assert r["ppl_source"] == pytest.approx(want, rel=1e-6)
    assert r["ppl_output"] == pytest.approx(want, rel=1e-6)


def test_kld_known_value_and_sign() -> None:
    p = np.log(np.array([[0.5, 0.5]]))
    q = np.log(np.array([[0.9, 0.1]]))
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert token_kld(p, q)[0] == pytest.approx(want)
    a = rng.normal(size=(20, 30))
    b = a + rng.normal(size=(20, 30)) * 0.1
    assert (token_kld(a, b) >= 0).all() and token_kld(a, b).mean() > 0


def test_streaming_equals_all_at_once() -> None:
    src = rng.normal(size=(90, 40))
    out = src + rng.normal(size=(90, 40)) * 0.3
    tg = rng.integers(0, 40, size=90)
    whole = StreamingAccuracy()
    whole.add(src, out, tg)
    parts = StreamingAccuracy()
    for a in range(0, 90, 25):
        parts.add(src[a:a + 25], out[a:a + 25], tg[a:a + 25])
    want = whole.result()
    # every figure is compared (an empty or partial result must not pass by comparing nothing)
    assert want.keys() == {"kld", "kld_p99", "top1_agreement", "ppl_source", "ppl_output", "tokens"}
    assert all(v is not None for v in want.values()) and want["tokens"] == 90
    for k, v in want.items():
        assert parts.result()[k] == pytest.approx(v, rel=1e-12), k


def test_windows_follow_llama_perplexity() -> None:
    tokens = np.arange(1, 2600, dtype=np.int32)  # 2599 tokens
    w = make_windows(tokens, 512, None, add_bos=True, bos_id=0)
    assert w.n_chunk == 5 and w.first == 256
    assert (w.inputs[:, 0] == 0).all()  # BOS replaces each window's first token
    np.testing.assert_array_equal(w.inputs[1, 1:], tokens[513:1024])
    assert w.targets.shape == (5, 255)  # n_ctx - first - 1 scored per window
    np.testing.assert_array_equal(w.targets[2], tokens[2 * 512 + 257: 3 * 512])
    w2 = make_windows(tokens, 512, 3, add_bos=False, bos_id=0)
    assert w2.n_chunk == 3 and w2.inputs[1, 0] == tokens[512]
    with pytest.raises(LLMOpsError, match="at least 1024"):
        make_windows(tokens[:1000], 512, 4, add_bos=False, bos_id=0)


def test_peak_rss_sees_an_allocation() -> None:
    # A fresh anonymous mapping, every page written: resident memory must grow by its size.
    # (A malloc'd block could reuse pages an earlier test freed but the heap kept resident,
    # and then RSS would not move at all.)
    import mmap
    import time

    size = 64 << 20
    with PeakRSS() as m:
        start = m.peak
        block = mmap.mmap(-1, size)
        for off in range(0, size, mmap.PAGESIZE):
            block[off] = 1
        deadline = time.monotonic() + 5.0  # the sampler polls every 10 ms; allow a loaded machine
        while m.peak < start + size // 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        block.close()
    assert m.peak >= start + size // 2


def test_token_nll_equals_the_log_softmax_of_the_target() -> None:
    # token_nll takes only a row's log-sum-exp, in float32 exponentials summed in float64
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((64, 5000)) * 8).astype(np.float32)
    targets = rng.integers(0, 5000, 64)
    want = -log_softmax(logits)[np.arange(64), targets]
    np.testing.assert_allclose(token_nll(logits, targets), want, rtol=1e-6)


def test_token_nll_is_the_same_on_any_number_of_threads() -> None:
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((511, 3000)) * 6).astype(np.float32)
    targets = rng.integers(0, 3000, 511)
    one = token_nll(logits, targets, threads=1)
    assert np.array_equal(one, token_nll(logits, targets, threads=2))
    assert np.array_equal(one, token_nll(logits, targets, threads=5))
    np.testing.assert_allclose(one, -log_softmax(logits)[np.arange(511), targets], rtol=1e-6)
