"""Hugging Face architecture names shared by every converter.

A config.json names its class in ``architectures``; some (older or hand-written) only
carry ``model_type``. One table maps the second to the first for every format.
"""

from __future__ import annotations

from typing import Any

FROM_MODEL_TYPE: dict[str, str] = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "olmo3": "Olmo3ForCausalLM",
    "granite": "GraniteForCausalLM", "smollm3": "SmolLM3ForCausalLM",
}


def class_name_of(config: dict[str, Any]) -> str | None:
    """The checkpoint's Hugging Face class name: ``architectures[0]``, else from ``model_type``."""
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return FROM_MODEL_TYPE.get(str(config.get("model_type")))
