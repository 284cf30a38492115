"""The config defaults the GGUF converter fills in equal transformers' own classes' defaults."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from llmops.converters.gguf.hf_defaults import DEFAULTS, with_defaults

SHAPES = [  # (hidden, heads, layers): widths whose head width differs from every class default
    (256, 4, 1), (384, 6, 7), (640, 5, 12),
]


def _rope_of(c: dict[str, Any]) -> Any:
    """RoPE settings as transformers 5 holds them (a top-level ``rope_theta`` moves inside)."""
    rope = dict(c.get("rope_parameters") or {})
    if c.get("rope_theta") is not None and "full_attention" not in rope:
        rope.setdefault("rope_theta", c["rope_theta"])
    return rope


@pytest.mark.parametrize("model_type", sorted(DEFAULTS))
@pytest.mark.parametrize("shape", SHAPES)
def test_defaults_equal_transformers(model_type: str, shape: tuple[int, int, int]) -> None:
    from transformers import AutoConfig

    hidden, heads, layers = shape
    given = {"hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": layers,
             "intermediate_size": 512, "vocab_size": 1000}
    theirs = AutoConfig.for_model(model_type, **given).to_dict()
    ours = with_defaults({"model_type": model_type, **given}, model_type)
    for key in DEFAULTS[model_type]:
        if key == "rope_parameters":
            assert _rope_of(ours) == theirs["rope_parameters"]
        else:
            assert ours[key] == theirs[key], key


def test_given_fields_win_and_rope_theta_is_added() -> None:
    c = with_defaults({"hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 2,
                       "head_dim": 64, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama")
    assert c["head_dim"] == 64 and c["num_key_value_heads"] == 32
    assert c["rope_theta"] == 10000.0 and c["rope_scaling"]["rope_type"] == "llama3"
    q = with_defaults({"hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 2}, "qwen3")
    assert q["head_dim"] == 128  # Qwen3's default, not 1024 / 16
    assert with_defaults({"a": 1}, "unknown") == {"a": 1}


def test_with_transformers_rope_scaling_config() -> None:
    """A Llama 3.1 config with only ``rope_scaling`` gets the class's theta, as transformers gives it."""
    from transformers import AutoConfig

    given = {"hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 512,
             "vocab_size": 1000, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    ours = with_defaults(copy.deepcopy(given), "llama")
    theirs = AutoConfig.for_model("llama", **given).to_dict()["rope_parameters"]  # changes ``given``
    assert theirs["rope_theta"] == ours["rope_theta"]
