"""SmolLM2-135M end to end: byte identity with llama.cpp's own tools, perplexity, tokenization.

Slow (deselected by default): ``pytest -m slow tests/test_gguf_slow.py``.
llama.cpp's reference converter comes from llama-cpp-python's source distribution,
fetched with pip into a cache folder at test time (never part of this project).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
# byte identity with llama.cpp, tokenizer identity and the reference perplexities run in CI too
fidelity = pytest.mark.fidelity



def _reference(script: Path, src: Path, outtype: str, out: Path) -> Path:
    """Run llama.cpp's converter with its own gguf-py (the one it ships with)."""
    r = subprocess.run([sys.executable, str(script), str(src), "--outtype", outtype, "--outfile", str(out)],
                       cwd=script.parent, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"})  # its own gguf-py
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _same_file(ours: Path, ref: Path) -> bool:
    from test_archs import _sha256, _where_they_differ

    assert _sha256(ours) == _sha256(ref), _where_they_differ(ours, ref)
    return True


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> dict[str, Path]:
    from llmops.app.converting import convert

    d = tmp_path_factory.mktemp("smollm2-gguf")
    return {q: convert(smollm2, f"gguf-{q.lower()}", d, verify=False).output for q in ("F32", "F16", "Q8_0", "Q4_K_M")}


@fidelity
@pytest.mark.parametrize(("quant", "outtype"), [("F16", "f16"), ("Q8_0", "q8_0")])
def test_byte_identical_to_reference_converter(outputs, reference_converter, smollm2, tmp_path, quant, outtype):
    ref = _reference(reference_converter, smollm2, outtype, tmp_path / f"ref-{outtype}.gguf")
    assert _same_file(outputs[quant], ref)


@fidelity
def test_q4_k_m_byte_identical_to_f16_then_llama_quantize(outputs, reference_converter, smollm2, tmp_path):
    from llmops.converters.gguf.quantize import llama_model_quantize

    f16 = _reference(reference_converter, smollm2, "f16", tmp_path / "ref-f16.gguf")
    llama_model_quantize(str(f16), str(tmp_path / "ref-q4km.gguf"), 15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    # the whole file: tensor order (llama.cpp's loader's), keys and their order, data
    assert _same_file(outputs["Q4_K_M"], tmp_path / "ref-q4km.gguf")


# wikitext-2 test, ctx 512, first 16 chunks, second half of each chunk scored (llama-perplexity's method)
@fidelity
@pytest.mark.parametrize(("quant", "want", "tol"), [("F32", 28.80, 0.05), ("Q8_0", 28.95, 0.10), ("Q4_K_M", 30.34, 0.20)])
def test_wikitext_perplexity(outputs, eval_text, quant, want, tol):
    from llmops.benchmarks.accuracy import evaluate_gguf

    res = evaluate_gguf(outputs[quant], eval_text, chunks=16, n_ctx=512)
    assert res["chunks"] == 16 and res["tokens"] == 16 * 255
    assert abs(res["ppl_output"] - want) <= tol, res["ppl_output"]


@fidelity
def test_tokenization_equals_hf_on_wikitext(outputs, eval_text, smollm2):
    from transformers import AutoTokenizer

    from llmops.benchmarks.accuracy import tokenize_with_gguf

    ids, add_bos, _ = tokenize_with_gguf(outputs["F16"], eval_text)
    assert not add_bos  # SmolLM2 adds no BOS
    hf = AutoTokenizer.from_pretrained(smollm2)(eval_text, add_special_tokens=True)["input_ids"]
    assert len(ids) == len(hf)
    assert ids.tolist() == hf


def test_verification_against_source(smollm2, eval_text, tmp_path):
    from llmops.app.converting import convert

    rec = convert(smollm2, "gguf-q8_0", tmp_path, eval_text=eval_text)
    v = rec.verification
    assert v is not None
    assert 0 < v["kld"] < 0.01 and v["top1_agreement"] > 0.95
    assert abs(v["ppl_output"] - v["ppl_source"]) / v["ppl_source"] < 0.02
