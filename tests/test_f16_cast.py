"""The fast float16 cast gives numpy's bits (what llama.cpp's converter writes) for every input."""

from __future__ import annotations

import numpy as np

from llmops.converters.gguf.quantize import f16_to_f32, to_f16


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16)


def test_to_f16_equals_numpy_on_every_finite_range() -> None:
    rng = np.random.default_rng(7)
    parts = [rng.normal(0, 0.02, 1 << 18), rng.normal(0, 1e-6, 1 << 16), rng.normal(0, 1e-9, 1 << 16),
             rng.uniform(-7e4, 7e4, 1 << 16),  # past float16's range: infinities
             np.array([0.0, -0.0, 65504, 65519.99, 65520, -65520, 6e-8, 2.98e-8, 2.99e-8, 5.96e-8, np.inf, -np.inf])]
    random_bits = rng.integers(0, 2 ** 32, 1 << 18, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([p.astype(np.float32) for p in parts] + [random_bits[~np.isnan(random_bits)]])
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    assert np.array_equal(_bits(to_f16(x)), _bits(expected))
    assert np.array_equal(_bits(to_f16(x, finite=True)), _bits(expected))  # the checked data's path
    assert np.array_equal(_bits(to_f16(x.reshape(-1, 4)[:, :2])), _bits(expected.reshape(-1, 4)[:, :2]))


def test_to_f16_keeps_numpys_nan_payloads() -> None:
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FA00000, 0xFF812345, 0x3F800000],
                    dtype=np.uint32).view(np.float32)
    assert np.array_equal(_bits(to_f16(nans)), _bits(nans.astype(np.float16)))


def test_f16_to_f32_equals_numpy_on_every_half_but_nan() -> None:
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    theirs = every.astype(np.float32)
    keep = ~np.isnan(theirs)
    ours = f16_to_f32(every)
    assert np.array_equal(ours[keep].view(np.uint32), theirs[keep].view(np.uint32))
    assert np.isnan(ours[~keep]).all()
    fast = f16_to_f32(every[keep], finite=True)  # the vectorised path, for halves known not NaN
    assert np.array_equal(fast.view(np.uint32), theirs[keep].view(np.uint32))
    for n in range(1, 40):  # every tail length the vectorised loop leaves
        assert np.array_equal(f16_to_f32(every[:n], finite=True).view(np.uint32), theirs[:n].view(np.uint32))
