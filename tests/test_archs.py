"""GGUF conversion of the architectures beyond the core families, on tiny random models.

Each is checked three ways: llama.cpp's F32 logits against transformers' (the tolerance of
``tests/test_gguf_convert.py``: below 2e-4 of the logit scale, float32 throughout), the GGUF keys
and generated tensors llama.cpp reads for what makes the architecture different, and (fidelity,
slow: it fetches llama.cpp's converter) byte identity with llama.cpp's convert_hf_to_gguf.py on
the same checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from test_gguf_convert import PROMPT, _hf_logits, _ids

# (tiny architecture, config overrides, prompt repetitions, llama.cpp context)
CASES: dict[str, tuple[str, dict[str, Any], int, int]] = {
    "llama3": ("llama3", {}, 1, 128),
    "llama_tied": ("llama_tied", {}, 1, 128),
    "mistral": ("mistral", {}, 1, 128),
    "olmo2": ("olmo2", {}, 1, 128),
    "granite": ("granite", {}, 1, 128),
    "smollm3": ("smollm3", {}, 1, 128),
    # short factors: llama.cpp's context (128) within the original 512, a short prompt in transformers
    "phi4_mini": ("phi4_mini", {}, 1, 128),
    # long factors: both past an original context of 64 (llama.cpp by its context, transformers
    # by the prompt's length)
    "phi4_mini_long": ("phi4_mini", {"original_max_position_embeddings": 64}, 5, 256),
    # Gemma 2 with every Gemma-specific value away from its default; the window (8) is shorter
    # than the prompt, so the sliding layers (0: sliding, 1: global) really mask
    "gemma2_custom": ("gemma2", {"attn_logit_softcapping": 20.0, "final_logit_softcapping": 10.0,
                                 "sliding_window": 8}, 1, 128),
    "gemma3_custom": ("gemma3", {"final_logit_softcapping": 10.0, "sliding_window": 8}, 1, 128),
}
NEW_ARCHS = ["llama3", "llama_tied", "mistral", "olmo2", "granite", "smollm3", "phi4_mini"]
# Mixture-of-experts models: their logits are compared with transformers' in test_gguf_convert.py;
# here only their bytes against llama.cpp's converter (experts stacked into ``*_exps``, router,
# shared expert and its gate).
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.fixture(scope="session")
def variant(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model per case, built once per session (folder ``tiny-<case>``: general.name)."""
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            from llmops.app.tiny_models import tiny_model

            arch, overrides, _, _ = CASES.get(case) or (case, {}, 1, 128)
            made[case] = tiny_model(arch, tmp_path_factory.mktemp("arch") / f"tiny-{case.replace('_', '-')}",
                                    overrides=overrides)
        return made[case]

    return get


def _convert(src: Path, out: Path, quant: str = "F32") -> Path:
    from llmops.converters.gguf.convert import convert_to_gguf
    from llmops.core.checkpoint import open_checkpoint

    return convert_to_gguf(open_checkpoint(src), quant, out).path


def _fields(path: Path) -> dict[str, Any]:
    import gguf

    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}


def _tensor(path: Path, name: str) -> np.ndarray:
    import gguf

    return next(np.array(t.data) for t in gguf.GGUFReader(path).tensors if t.name == name)


def _tensor_names(path: Path) -> set[str]:
    import gguf

    return {t.name for t in gguf.GGUFReader(path).tensors}


def _logits_case(src: Path, gguf_path: Path, reps: int, n_ctx: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    from tokenizers import Tokenizer

    from llmops.benchmarks.runner_llamacpp import LlamaCppRunner

    ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode(PROMPT * reps).ids if reps > 1 else _ids(src)
    runner = LlamaCppRunner(str(gguf_path), n_ctx=n_ctx, threads=2, kv_f32=True)
    assert runner.tokenize(PROMPT * reps).tolist() == ids
    return runner.logits(np.asarray(ids)), _hf_logits(src, ids), ids


@pytest.mark.parametrize("case", list(CASES))
def test_f32_matches_transformers(variant, tmp_path: Path, case: str) -> None:
    src = variant(case)
    _, _, reps, n_ctx = CASES[case]
    got, want, ids = _logits_case(src, _convert(src, tmp_path / "m.gguf"), reps, n_ctx)
    scale = float(np.abs(want).max())
    # the tolerance of tests/test_gguf_convert.py: float32 weights and KV cache, so only the
    # accumulation order differs
    assert np.abs(got - want).max() < 2e-4 * scale, (np.abs(got - want).max(), scale)
    assert (got.argmax(-1) == want.argmax(-1)).all()


# -- what each architecture adds, as llama.cpp reads it ---------------------------------------------


def test_llama3_rope_freqs_are_transformers_scaling(variant, tmp_path: Path) -> None:
    """``rope_freqs`` holds the divisor of each base frequency: transformers' llama3 rule."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    src = variant("llama3")
    path = _convert(src, tmp_path / "m.gguf")
    cfg = AutoConfig.from_pretrained(src)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    base = cfg.rope_parameters["rope_theta"]
    plain = 1.0 / (base ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    factors = _tensor(path, "rope_freqs.weight")
    np.testing.assert_allclose(factors, (plain / scaled).numpy(), rtol=1e-5)
    assert {1.0, 8.0} <= set(np.round(factors, 4).tolist()) and len(set(np.round(factors, 4).tolist())) > 2
    f = _fields(path)
    assert f["llama.rope.freq_base"] == pytest.approx(500000.0)
    assert "llama.rope.scaling.type" not in f  # the factors carry the scaling


def test_tied_embeddings_have_no_output_tensor(variant, tmp_path: Path) -> None:
    for case in ("llama_tied", "smollm3", "phi4_mini"):
        names = _tensor_names(_convert(variant(case), tmp_path / f"{case}.gguf"))
        assert "token_embd.weight" in names and "output.weight" not in names, case
    assert "output.weight" in _tensor_names(_convert(variant("mistral"), tmp_path / "mistral.gguf"))


def test_granite_multipliers(variant, tmp_path: Path) -> None:
    f = _fields(_convert(variant("granite"), tmp_path / "m.gguf"))
    assert f["general.architecture"] == "granite"
    assert f["granite.embedding_scale"] == pytest.approx(12.0)
    assert f["granite.residual_scale"] == pytest.approx(0.22)
    assert f["granite.attention.scale"] == pytest.approx(0.0625)
    assert f["granite.logit_scale"] == pytest.approx(4.0)


def test_olmo2_norms(variant, tmp_path: Path) -> None:
    path = _convert(variant("olmo2"), tmp_path / "m.gguf")
    names = _tensor_names(path)
    assert _fields(path)["general.architecture"] == "olmo2"
    for leaf in ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"):
        assert f"blk.1.{leaf}.weight" in names, leaf
    assert not any(n.endswith(("attn_norm.weight", "ffn_norm.weight")) for n in names)  # no pre-norms


def test_smollm3_architecture(variant, tmp_path: Path) -> None:
    f = _fields(_convert(variant("smollm3"), tmp_path / "m.gguf"))
    assert f["general.architecture"] == "smollm3" and f["smollm3.block_count"] == 4


def test_phi4_mini_partial_rotary_and_longrope(variant, tmp_path: Path) -> None:
    from llmops.app.tiny_models import ARCHITECTURES

    path = _convert(variant("phi4_mini"), tmp_path / "m.gguf")
    f = _fields(path)
    rope = ARCHITECTURES["phi4_mini"]["rope_scaling"]
    assert f["phi3.rope.dimension_count"] == 48  # 0.75 of a 64-wide head
    assert f["phi3.rope.scaling.original_context_length"] == 512
    assert f["phi3.rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(4096 / 512) / math.log(512)))
    np.testing.assert_array_equal(_tensor(path, "rope_factors_short.weight"), np.float32(rope["short_factor"]))
    np.testing.assert_array_equal(_tensor(path, "rope_factors_long.weight"), np.float32(rope["long_factor"]))


@pytest.mark.parametrize("case", ["gemma2_custom", "gemma3_custom"])
def test_gemma_keys(variant, tmp_path: Path, case: str) -> None:
    f = _fields(_convert(variant(case), tmp_path / "m.gguf"))
    arch = f["general.architecture"]
    assert f[f"{arch}.attention.sliding_window"] == 8
    assert f[f"{arch}.final_logit_softcapping"] == pytest.approx(10.0)
    if arch == "gemma2":
        assert f["gemma2.attn_logit_softcapping"] == pytest.approx(20.0)
    else:
        assert f["gemma3.rope.freq_base"] == pytest.approx(1_000_000.0)  # global layers
        assert f["gemma3.rope.freq_base_swa"] == pytest.approx(10_000.0)  # sliding layers


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_query_scale_is_head_dim(variant, tmp_path: Path, arch: str) -> None:
    """llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B),
    with no GGUF key to say otherwise, as llama.cpp's converter writes none: a checkpoint whose
    ``query_pre_attn_scalar`` is another value converts as the reference converts it, and runs
    in llama.cpp with llama.cpp's scale, which transformers' logits then do not match."""
    from llmops.app.tiny_models import tiny_model

    src = tiny_model(arch, tmp_path / f"tiny-{arch}-qscale", overrides={"query_pre_attn_scalar": 32})
    path = _convert(src, tmp_path / "m.gguf")
    assert not [k for k in _fields(path) if k.endswith(("attention.scale", "query_pre_attn_scalar"))]
    got, want, _ = _logits_case(src, path, 1, 128)
    assert np.abs(got - want).max() > 1e-2 * np.abs(want).max()


def test_mistral_sliding_window_is_not_applied_by_llama_cpp(variant, tmp_path: Path) -> None:
    """llama.cpp's Llama architecture has no sliding window and its converter writes none for
    Mistral: within the window the logits agree; past it transformers masks and llama.cpp does not."""
    from llmops.app.tiny_models import tiny_model

    src = tiny_model("mistral_swa", tmp_path / "tiny-mistral-swa")
    path = _convert(src, tmp_path / "m.gguf")
    assert not [k for k in _fields(path) if "sliding_window" in k]
    got, want, ids = _logits_case(src, path, 1, 128)
    window = 8
    assert len(ids) > window
    scale = float(np.abs(want).max())
    assert np.abs(got[:window] - want[:window]).max() < 2e-4 * scale
    assert np.abs(got[window:] - want[window:]).max() > 1e-2 * scale


# -- byte identity with llama.cpp's converter ------------------------------------------------------


# llama.cpp's converter names a BPE pre-tokenizer only by the hash of its ids on a check text,
# which a tokenizer trained for a tiny test model never has; it would stop there. The driver
# hands it the name our converter chose (from tokenizer.json's structure) and changes nothing
# else: every other key and every tensor is the reference converter's own.
_DRIVER = """
import os, runpy, sys
script, pre = sys.argv.pop(1), sys.argv.pop(1)
here = os.path.dirname(script)
sys.path[:0] = [here, os.path.join(here, "gguf-py")]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


def _reference(script: Path, src: Path, outtype: str, out: Path, pre: str) -> Path:
    import os
    import subprocess
    import sys

    driver = out.with_name("reference_driver.py")
    driver.write_text(_DRIVER, encoding="utf-8")
    r = subprocess.run([sys.executable, str(driver), str(script), pre, str(src), "--outtype", outtype,
                        "--outfile", str(out)], cwd=script.parent, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"})  # its own gguf-py
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def with_sentencepiece(src: Path, dest: Path, text: str) -> Path:
    """``src`` with a SentencePiece ``tokenizer.model`` in place of its byte-level BPE files, trained
    here on ``text`` (a few seconds) with Gemma's layout of special ids (pad 0, eos 1, bos 2,
    unk 3) and byte fallback, as llama.cpp's converter reads Gemma 2's vocabulary from it only."""
    import json
    import shutil

    import sentencepiece as spm

    shutil.copytree(src, dest)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (dest / name).unlink(missing_ok=True)
    cfg = json.loads((dest / "config.json").read_text())
    corpus = dest.with_name(dest.name + "-corpus.txt")
    corpus.write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(dest / "tokenizer"), vocab_size=int(cfg["vocab_size"]),
        model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2)
    (dest / "tokenizer.vocab").unlink()
    cfg.update(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    (dest / "config.json").write_text(json.dumps(cfg))
    # Gemma's: a BOS first, no EOS
    (dest / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))
    return dest


@pytest.mark.slow
@pytest.mark.fidelity
@pytest.mark.parametrize("case", [
    *NEW_ARCHS, "phi4_mini_long", "gemma3_custom",
    "gemma2_custom", *MOE_ARCHS,
])
def test_byte_identical_to_reference_converter(variant, reference_converter: Path, tmp_path: Path,
                                               eval_text_path: Path, case: str) -> None:
    src = variant(case)
    if case == "gemma2_custom":
        src = with_sentencepiece(src, tmp_path / src.name, eval_text_path.read_text(encoding="utf-8")[:300_000])
    ours = _convert(src, tmp_path / "ours.gguf", "F16")
    ref = _reference(reference_converter, src, "f16", tmp_path / "ref.gguf",
                     str(_fields(ours)["tokenizer.ggml.pre"]))
    assert _sha256(ours) == _sha256(ref), _where_they_differ(ours, ref)


def minimal_config(src: Path, dest: Path) -> Path:
    """``src`` with each config.json field transformers' class would fill in with the same value
    left out: what ``save_pretrained`` of a model at those values, or an older hand-written
    config, holds (a Llama-7B-shaped one has no ``head_dim``, a Qwen3 one may have none at 128)."""
    import copy
    import json
    import shutil

    from transformers import AutoConfig

    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    keep = {"architectures", "model_type", "hidden_size", "num_attention_heads", "num_hidden_layers",
            "vocab_size", "intermediate_size", "torch_dtype", "dtype", "transformers_version"}

    def filled(c: dict[str, Any]) -> dict[str, Any]:
        c = copy.deepcopy(c)
        return AutoConfig.for_model(c.pop("model_type"), **c).to_dict()

    full = filled(cfg)
    for key in [k for k in cfg if k not in keep]:
        rest = {k: v for k, v in cfg.items() if k != key}
        if filled(rest) == full:
            cfg = rest
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.slow
@pytest.mark.fidelity
@pytest.mark.parametrize("case", ["llama3", "mistral", "qwen3", "olmo2", "granite", "smollm3", "phi4_mini", "gemma3_custom",
                                  "qwen3_moe"])
def test_byte_identical_with_minimal_config(variant, reference_converter: Path, tmp_path: Path, case: str) -> None:
    """A config.json that leaves out what its class defaults to converts as llama.cpp's converter
    (which reads it through transformers) converts it."""
    import json

    src = minimal_config(variant(case), tmp_path / f"tiny-{case}-min")
    left_out = set(json.loads((variant(case) / "config.json").read_text())) - set(
        json.loads((src / "config.json").read_text()))
    assert left_out  # the case tests something
    ours = _convert(src, tmp_path / "ours.gguf", "F16")
    ref = _reference(reference_converter, src, "f16", tmp_path / "ref.gguf", str(_fields(ours)["tokenizer.ggml.pre"]))
    assert _sha256(ours) == _sha256(ref), (sorted(left_out), _where_they_differ(ours, ref))


def _sha256(path: Path) -> str:
    from llmops.core.hashing import sha256_file

    return sha256_file(path)


def _where_they_differ(ours: Path, ref: Path) -> str:
    """The first difference of two GGUFs: tensors, key values and types, key order."""
    import gguf

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
    ta = {t.name: (t.tensor_type.name, t.data.tobytes()) for t in a.tensors}
    tb = {t.name: (t.tensor_type.name, t.data.tobytes()) for t in b.tensors}
    if list(ta) != list(tb):
        return f"tensors differ: {list(ta)} vs {list(tb)}"
    if bad := [n for n in ta if ta[n] != tb[n]]:
        return f"tensor data or types differ: {bad}"
    fa, fb = _fields(ours), _fields(ref)
    if values := {k: (fa.get(k), fb.get(k)) for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}:
        return f"key values differ (ours, reference): {values}"
    types = [k for k in a.fields if a.fields[k].types != b.fields[k].types]
    if types:
        return f"key types differ: {types}"
    return f"key order differs: {list(a.fields)} vs {list(b.fields)}"
