"""The values transformers' config classes give the fields a ``config.json`` leaves out.

``save_pretrained`` writes only what differs from the class defaults, so a real Llama-2-7B
or Qwen3 folder may carry no ``head_dim``, ``rms_norm_eps`` or ``rope_theta``. llama.cpp's
converter reads the config through ``AutoConfig(...).to_dict()``, which fills them in; so
does everything that loads the model with transformers. Reading the bare JSON instead would
write different keys, and for Qwen3 (whose default ``head_dim`` is 128, not width / heads) a
wrong model. Importing transformers for this would cost seconds on every conversion (it
imports torch), so the defaults of the supported classes are kept here as data;
``tests/test_hf_defaults.py`` checks them against transformers' own classes.

Only the fields the GGUF families read are listed. Each entry is a constant or a function of
the config (a derived default such as ``head_dim = hidden_size // num_attention_heads``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Default = Any  # a value, or a callable of the (partly filled) config returning one


def _width_per_head(c: dict[str, Any]) -> int:
    return int(c["hidden_size"]) // int(c["num_attention_heads"])


def _all_heads(c: dict[str, Any]) -> int:
    return int(c["num_attention_heads"])


def _every(n: int) -> Callable[[dict[str, Any]], list[str]]:
    """Layer types where every ``n``-th layer attends globally and the rest in a window."""
    def types(c: dict[str, Any]) -> list[str]:
        return ["full_attention" if (i + 1) % n == 0 else "sliding_attention"
                for i in range(int(c["num_hidden_layers"]))]
    return types


def _gemma3_types(c: dict[str, Any]) -> list[str]:
    return _every(int(c.get("sliding_window_pattern") or 6))(c)


def _no_rope_layers(c: dict[str, Any]) -> list[int]:
    n = int(c["no_rope_layer_interval"])
    return [int((i + 1) % n != 0) for i in range(int(c["num_hidden_layers"]))]


def _rope(theta: float) -> dict[str, Any]:
    return {"rope_theta": theta, "rope_type": "default"}


_LLAMA_LIKE = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_parameters": _rope(10000.0)}

DEFAULTS: dict[str, dict[str, Default]] = {
    "llama": {**_LLAMA_LIKE, "num_key_value_heads": _all_heads, "head_dim": _width_per_head},
    "mistral": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_parameters": _rope(10000.0),
                "num_key_value_heads": 8, "head_dim": _width_per_head, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_parameters": _rope(10000.0),
              "num_key_value_heads": 32},
    "qwen3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_parameters": _rope(10000.0),
              "num_key_value_heads": 32, "head_dim": 128},
    "gemma2": {"max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_parameters": _rope(10000.0),
               "num_key_value_heads": 4, "head_dim": 256, "sliding_window": 4096,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "layer_types": _every(2)},
    "gemma3_text": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "num_key_value_heads": 4,
                    "head_dim": 256, "sliding_window": 4096, "layer_types": _gemma3_types,
                    "rope_parameters": {"sliding_attention": _rope(10000.0), "full_attention": _rope(1000000.0)}},
    "phi3": {"max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "num_key_value_heads": _all_heads,
             "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 1.0, "rope_type": "default"}},
    "olmo2": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_parameters": _rope(10000.0),
              "num_key_value_heads": _all_heads},
    "olmo3": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "num_key_value_heads": _all_heads,
              "sliding_window": 4096, "layer_types": _every(4),
              "rope_parameters": {"sliding_attention": _rope(500000.0), "full_attention": _rope(500000.0)}},
    "granite": {**_LLAMA_LIKE, "num_key_value_heads": _all_heads, "attention_multiplier": 1.0,
                "embedding_multiplier": 1.0, "logits_scaling": 1.0, "residual_multiplier": 1.0},
    "smollm3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_parameters": _rope(2000000.0),
                "num_key_value_heads": 4, "no_rope_layer_interval": 4, "no_rope_layers": _no_rope_layers},
    "mixtral": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_parameters": _rope(1000000.0),
                "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_parameters": _rope(10000.0),
                  "num_key_value_heads": 16, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                  "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": False},
    "qwen3_moe": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_parameters": _rope(10000.0),
                  "num_key_value_heads": 4, "moe_intermediate_size": 768, "num_local_experts": 128,
                  "num_experts_per_tok": 8, "norm_topk_prob": False},
}

# the config classes that keep a top-level ``rope_theta`` or ``rope_scaling`` inside ``rope_parameters``
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta")


def with_defaults(config: dict[str, Any], model_type: str | None) -> dict[str, Any]:
    """``config`` with the fields its transformers class would fill in, as that class fills them.

    Given fields are kept as they are; a ``None`` is kept where the class keeps it (the constant
    defaults) and replaced where the class computes the field (the derived ones). RoPE: a config with any of its RoPE fields keeps
    them; the class default's ``rope_theta`` is added where none is given."""
    table = DEFAULTS.get(str(model_type))
    if not table:
        return config
    out = dict(config)
    for key, default in table.items():
        if key == "rope_parameters":
            continue
        if callable(default):  # derived fields: the classes compute them when absent or None
            if out.get(key) is None:
                out[key] = default(out)
        elif key not in out:  # a field given as None stays None, as in the classes
            out[key] = default
    rope = table.get("rope_parameters")
    if rope is not None:
        if not any(out.get(k) is not None for k in _ROPE_KEYS):
            out["rope_parameters"] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in rope.items()}
        elif out.get("rope_theta") is None:
            given = out.get("rope_parameters") or out.get("rope_scaling")
            if isinstance(given, dict) and "full_attention" not in given and "rope_theta" not in given \
                    and "rope_theta" in rope:
                out["rope_theta"] = rope["rope_theta"]
    return out
