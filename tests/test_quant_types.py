"""The further llama.cpp mixes (Q3_K_M, Q4_K_S, Q5_K_S, IQ4_NL, IQ4_XS, IQ3_M, IQ2_M): llama.cpp's
per-tensor choice, byte identity with its quantizer, outputs llama.cpp runs, the imatrix refusal.

The SmolLM2 checks are slow; the byte identity with F16 + ``llama_model_quantize`` is in the
fidelity subset (one F16 from llama.cpp's own converter, then every type).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from llmops.converters.gguf.quantize import FT, QT

NEW = ["Q3_K_M", "Q4_K_S", "Q5_K_S", "IQ4_NL", "IQ4_XS", "IQ3_M"]  # llama.cpp quantizes them without imatrix
BULK = {"Q3_K_M": "Q3_K", "Q4_K_S": "Q4_K", "Q5_K_S": "Q5_K", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
        "IQ3_M": "IQ3_S"}
PROMPT = "The quick brown fox jumps over the lazy dog. Perplexity measures how well a model predicts text."


def _model(n_layer: int, n_embd: int, n_ff: int, n_head: int, n_kv: int, *, n_expert: int = 0, tied: bool = True,
           qkv: bool = False, vocab: int = 1000) -> tuple[list[tuple[str, tuple[int, ...], QT]], dict[str, int]]:
    """A model's tensor list as the converter plans it (numpy shapes, F16 file types)."""
    hd = n_embd // n_head
    t: list[tuple[str, tuple[int, ...], QT]] = [("token_embd.weight", (vocab, n_embd), QT.F16),
                                                 ("output_norm.weight", (n_embd,), QT.F32)]
    if not tied:
        t.append(("output.weight", (vocab, n_embd), QT.F16))
    for i in range(n_layer):
        p = f"blk.{i}."
        t += [(p + "attn_norm.weight", (n_embd,), QT.F32), (p + "ffn_norm.weight", (n_embd,), QT.F32)]
        if qkv:
            t.append((p + "attn_qkv.weight", (n_embd + 2 * n_kv * hd, n_embd), QT.F16))
        else:
            t += [(p + "attn_q.weight", (n_embd, n_embd), QT.F16), (p + "attn_k.weight", (n_kv * hd, n_embd), QT.F16),
                  (p + "attn_v.weight", (n_kv * hd, n_embd), QT.F16)]
        t.append((p + "attn_output.weight", (n_embd, n_embd), QT.F16))
        if n_expert:
            t += [(p + "ffn_gate_inp.weight", (n_expert, n_embd), QT.F32),
                  (p + "ffn_gate_exps.weight", (n_expert, n_ff, n_embd), QT.F16),
                  (p + "ffn_up_exps.weight", (n_expert, n_ff, n_embd), QT.F16),
                  (p + "ffn_down_exps.weight", (n_expert, n_embd, n_ff), QT.F16)]
        else:
            t += [(p + "ffn_gate.weight", (n_ff, n_embd), QT.F16), (p + "ffn_up.weight", (n_ff, n_embd), QT.F16),
                  (p + "ffn_down.weight", (n_embd, n_ff), QT.F16)]
    hp = {"n_embd": n_embd, "n_ff": n_ff, "n_layer": n_layer, "n_head": n_head, "n_head_kv": n_kv,
          "n_expert": n_expert, "n_embd_head_k": hd, "n_embd_head_v": hd}
    return t, hp


# shapes that reach every branch the mixes have: GQA below and above 4, tied and untied heads, rows
# that are not a multiple of 256 (and of 32), fused QKV, 8 experts and 4, the 80-layer "70B" rule
MODELS = {
    "smollm2-like": ("llama", _model(30, 576, 1536, 9, 3)),
    "untied-gqa4": ("llama", _model(24, 512, 1376, 8, 2, tied=False)),
    "odd-vocab-gqa4": ("llama", _model(16, 256, 704, 4, 1, vocab=1001)),
    "odd-rows": ("qwen2", _model(4, 200, 300, 4, 4, vocab=333)),
    "fused-qkv": ("phi3", _model(8, 3072, 8192, 32, 32, qkv=True, tied=False)),
    "8-experts": ("llama", _model(8, 512, 1024, 8, 2, n_expert=8)),
    "4-experts": ("qwen2moe", _model(12, 512, 768, 8, 8, n_expert=4, tied=False)),
    "70b": ("llama", _model(80, 1024, 2816, 16, 2, tied=False)),
    "gemma2": ("gemma2", _model(6, 320, 1000, 4, 4)),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_type_choice_port_equals_llama_cpp(model: str) -> None:
    """The port of llama_tensor_get_type picks llama.cpp's types for every mix (without imatrix,
    the only case llama.cpp's exported helper computes)."""
    from llmops.converters.gguf.quantize import compute_types, llama_compute_types

    arch, (tensors, hp) = MODELS[model]
    for name, ftype in FT.items():
        if name in ("F32", "F16", "BF16"):
            continue
        ref = llama_compute_types(arch, ftype, tensors, hp)
        if ref is None:
            pytest.skip("this llama.cpp build does not export llama_quant_compute_types")
        ours = compute_types(arch, ftype, tensors, hp)
        assert {n: q.name for n, q in ours.items()} == {n: q.name for n, q in ref.items()}, name


def test_imatrix_changes_the_choice_as_llama_cpp_does() -> None:
    """With an importance matrix the first eighth of ffn_down stays IQ4_XS (not Q5_K) and Q4_0's
    becomes Q4_1: the branches llama.cpp's helper cannot show."""
    from llmops.converters.gguf.quantize import compute_types

    arch, (tensors, hp) = MODELS["smollm2-like"]
    without = compute_types(arch, FT["IQ4_XS"], tensors, hp)
    with_im = compute_types(arch, FT["IQ4_XS"], tensors, hp, has_imatrix=True)
    assert without["blk.0.ffn_down.weight"] == QT.Q5_K and with_im["blk.0.ffn_down.weight"] == QT.IQ4_XS
    assert without["blk.4.ffn_down.weight"] == QT.IQ4_XS
    q40 = compute_types(arch, FT["Q4_0"], tensors, hp, has_imatrix=True)
    assert q40["blk.0.ffn_down.weight"] == QT.Q4_1 and q40["blk.4.ffn_down.weight"] == QT.Q4_0


def test_targets() -> None:
    from llmops.converters.api import parse_target

    for quant in [*NEW, "IQ2_M"]:
        spec = parse_target(f"gguf-{quant.lower()}")
        assert (spec.format, spec.quant) == ("gguf", quant)


@pytest.mark.parametrize("quant", NEW)
def test_tiny_llama_converts_runs_and_equals_llama_quantize(tiny_models, tmp_path: Path, quant: str) -> None:
    import gguf

    from llmops.benchmarks.runner_llamacpp import LlamaCppRunner
    from llmops.converters.gguf.convert import convert_to_gguf
    from llmops.converters.gguf.quantize import llama_model_quantize
    from llmops.converters.gguf.targets import QUANTS
    from llmops.core.checkpoint import open_checkpoint

    ckpt = open_checkpoint(tiny_models("llama"))
    ours = convert_to_gguf(ckpt, quant, tmp_path)
    assert ours.one_pass and ours.path.name.endswith(f"-{quant}.gguf")
    assert BULK[quant] in set(ours.tensor_types.values()), ours.tensor_types
    f16 = convert_to_gguf(ckpt, "F16", tmp_path / "f16.gguf")
    llama_model_quantize(str(f16.path), str(tmp_path / "ref.gguf"), QUANTS[quant].ftype)
    a = {t.name: (t.tensor_type, t.data.tobytes()) for t in gguf.GGUFReader(ours.path).tensors}
    b = {t.name: (t.tensor_type, t.data.tobytes()) for t in gguf.GGUFReader(tmp_path / "ref.gguf").tensors}
    assert a.keys() == b.keys()
    assert [n for n in a if a[n] != b[n]] == []
    runner = LlamaCppRunner(str(ours.path), n_ctx=128, threads=2)
    logits = runner.logits(runner.tokenize(PROMPT))
    assert np.isfinite(logits).all() and logits.std() > 0


def test_iq2_m_without_imatrix_is_refused_like_llama_quantize(tiny_models, tmp_path: Path, cli) -> None:
    """llama-quantize refuses IQ2_M without an importance matrix (its IQ2_S tensors); so do we, as a
    usage error naming --imatrix, before any file exists."""
    from llmops.converters.gguf.convert import convert_to_gguf
    from llmops.converters.gguf.quantize import llama_model_quantize
    from llmops.core.checkpoint import open_checkpoint
    from llmops.core.errors import LLMOpsError, UsageError

    src = tiny_models("llama")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UsageError) as e:
        convert_to_gguf(open_checkpoint(src), "IQ2_M", out)
    assert e.value.exit_code == 2 and "--imatrix" in str(e.value) and "\n" not in str(e.value)
    assert list(out.iterdir()) == []
    r = cli("convert", src, "--to", "gguf-iq2_m", "-o", out, "--no-verify")
    assert r.code == 2 and "--imatrix" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert list(out.iterdir()) == []
    # llama.cpp's own verdict on the same model
    f16 = convert_to_gguf(open_checkpoint(src), "F16", tmp_path / "f16.gguf")
    with pytest.raises(LLMOpsError):
        llama_model_quantize(str(f16.path), str(tmp_path / "ref.gguf"), FT["IQ2_M"])


def test_iq3_m_needs_no_imatrix_as_in_llama_cpp(tiny_models, tmp_path: Path) -> None:
    """IQ3_M's tensors are IQ3_S and Q4_K, which llama.cpp makes without an importance matrix
    (tensor_requires_imatrix lists neither): accepted, as llama-quantize accepts it."""
    from llmops.converters.gguf.quantize import requires_imatrix

    assert not requires_imatrix("blk.0.attn_q.weight", QT.IQ3_S, FT["IQ3_M"])
    assert requires_imatrix("blk.0.attn_q.weight", QT.IQ2_S, FT["IQ2_M"])
    assert not requires_imatrix("token_embd.weight", QT.IQ2_S, FT["IQ2_M"])


# -- SmolLM2 (slow) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_f16(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    """SmolLM2 as F16 by llama.cpp's own convert_hf_to_gguf.py (once for every type)."""
    from llmops.app.reference import reference_converter_script

    try:
        script = reference_converter_script()
    except (OSError, subprocess.CalledProcessError, tarfile.TarError) as e:
        if os.environ.get("CI"):
            pytest.fail(f"cannot fetch the llama-cpp-python sdist: {e}")
        pytest.skip(f"cannot fetch the llama-cpp-python sdist: {e}")
    out = tmp_path_factory.mktemp("smollm2-ref") / "ref-f16.gguf"
    r = subprocess.run([sys.executable, str(script), str(smollm2), "--outtype", "f16", "--outfile", str(out)],
                       cwd=script.parent, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"})
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.fidelity
@pytest.mark.parametrize("quant", NEW)
def test_smollm2_byte_identical_to_f16_then_llama_quantize(smollm2, reference_f16, tmp_path, quant) -> None:
    """One pass from the checkpoint gives the tensors of "llama.cpp's converter to F16, then
    llama_model_quantize", byte for byte, and llama.cpp runs the result."""
    import gguf

    from llmops.app.converting import convert
    from llmops.benchmarks.runner_llamacpp import LlamaCppRunner
    from llmops.converters.gguf.quantize import llama_model_quantize
    from llmops.converters.gguf.targets import QUANTS

    ours = convert(smollm2, f"gguf-{quant.lower()}", tmp_path, verify=False).output
    llama_model_quantize(str(reference_f16), str(tmp_path / "ref.gguf"), QUANTS[quant].ftype)
    a = {t.name: (t.tensor_type, t.data.tobytes()) for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: (t.tensor_type, t.data.tobytes()) for t in gguf.GGUFReader(tmp_path / "ref.gguf").tensors}
    assert a.keys() == b.keys()
    assert [n for n in a if a[n] != b[n]] == []
    runner = LlamaCppRunner(str(ours), n_ctx=128, threads=2)
    ids = runner.tokenize(PROMPT)
    logits = runner.logits(ids)
    assert np.isfinite(logits).all()
    # a trained model, even at 3-4 bits, predicts an ordinary sentence far better than chance: the
    # mean log-probability of the actual next token is well above a uniform guess's, -log(vocab)
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    assert float(np.mean(lp[np.arange(len(ids) - 1), ids[1:]])) > -np.log(logits.shape[-1]) + 3
