"""ONNX export of Mistral, Gemma 2, Gemma 3, Granite and Llama 3.1 rope scaling (tiny random models),
as tests/test_onnx.py does for Llama and Qwen 3: fp32 logits in plain onnxruntime against transformers (max |difference|
below 1e-3, test_onnx.py's fp32 bound), greedy decoding in onnxruntime-genai equal to transformers',
the transformers 5 config forms the builder needs adapted, and what the builder cannot take refused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from llmops.app.converting import convert
from llmops.core.errors import LLMOpsError

from test_onnx import SENTENCE, TOLERANCES, genai_greedy, torch_logits

ARCHS = ["mistral", "gemma2", "gemma3", "granite", "llama3"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_models: Callable[[str], Path]) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("onnx-archs")
    done: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in done:
            done[arch] = convert(tiny_models(arch), "onnx", root / arch, verify=False, threads=2).output
        return done[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_matches_transformers(arch: str, exported: Callable[[str], Path],
                                   tiny_models: Callable[[str], Path]) -> None:
    from transformers import AutoTokenizer

    from llmops.benchmarks.metrics import token_kld, top1_agreement
    from llmops.benchmarks.runner_onnx import OnnxRunner

    src = tiny_models(arch)
    tokens = np.asarray(AutoTokenizer.from_pretrained(src)(SENTENCE * 16)["input_ids"][:300], dtype=np.int32)
    assert len(tokens) == 300  # past Gemma's sliding window (256): the windowed layers really mask
    out = exported(arch)
    got = OnnxRunner(str(out), threads=2).logits(tokens)
    ref = torch_logits(src, tokens)
    max_abs, max_kld, min_top1 = TOLERANCES["onnx"]
    assert float(np.abs(got - ref).max()) < max_abs
    assert float(token_kld(ref, got).mean()) < max_kld
    assert float(top1_agreement(ref, got).mean()) > min_top1


@pytest.mark.parametrize("arch", ARCHS)
def test_genai_decodes_like_transformers(arch: str, exported: Callable[[str], Path],
                                         tiny_models: Callable[[str], Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_models(arch)
    prompt = AutoTokenizer.from_pretrained(src)("The quick brown fox jumps over")["input_ids"]
    new = genai_greedy(exported(arch), prompt, 8)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert new == ref[0, len(prompt):].tolist()


def test_transformers5_configs_adapted_for_the_builder(tiny_models: Callable[[str], Path]) -> None:
    from transformers import AutoConfig

    from llmops.converters.onnx.checks import adapt_config_for_builder

    g3 = AutoConfig.from_pretrained(tiny_models("gemma3"))
    assert set(g3.rope_parameters) == {"full_attention", "sliding_attention"}
    adapt_config_for_builder(g3)
    assert g3.rope_parameters["rope_type"] == "default" and g3.rope_theta == 1_000_000.0
    assert g3.rope_local_base_freq == 10_000.0
    phi = AutoConfig.from_pretrained(tiny_models("phi4_mini"))
    adapt_config_for_builder(phi)
    assert phi.rope_parameters["type"] == phi.rope_parameters["rope_type"] == "longrope"
    flat = AutoConfig.from_pretrained(tiny_models("mistral"))
    before = dict(flat.rope_parameters)
    adapt_config_for_builder(flat)
    assert flat.rope_parameters == {**before, "type": before["rope_type"]}


def test_olmo2_is_refused_up_front(tiny_models: Callable[[str], Path], tmp_path: Path) -> None:
    """The builder has no OLMo 2: a one-line error naming what is supported, before any file."""
    with pytest.raises(LLMOpsError) as e:
        convert(tiny_models("olmo2"), "onnx", tmp_path / "out", verify=False)
    msg = str(e.value)
    assert "\n" not in msg and "Olmo2ForCausalLM" in msg and "MistralForCausalLM" in msg
    assert list(tmp_path.iterdir()) == []


def test_smollm3_is_refused_up_front(tiny_models: Callable[[str], Path], tmp_path: Path) -> None:
    """The builder's SmolLM3 fails on (CPU, CUDA) or rotates (elsewhere) the RoPE-less layers: refused in
    one line saying why, before any file."""
    with pytest.raises(LLMOpsError) as e:
        convert(tiny_models("smollm3"), "onnx", tmp_path / "out", verify=False)
    msg = str(e.value)
    assert "\n" not in msg and "SmolLM3ForCausalLM" in msg and "RoPE-less layers" in msg
    assert "GraniteForCausalLM" in msg  # the supported ones are named
    assert list(tmp_path.iterdir()) == []
