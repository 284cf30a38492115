"""Qwen2 / Qwen2.5 (``LLM_ARCH_QWEN2``, with Q/K/V biases) and Qwen3 (``LLM_ARCH_QWEN3``, Q/K norms).

Both use NeoX-style RoPE in llama.cpp, the same layout as Hugging Face: no permutation.
"""

from __future__ import annotations

import gguf

from llmops.converters.gguf.arch_base import Family, register


@register("Qwen2ForCausalLM")
class Qwen2Family(Family):
    model_arch = gguf.MODEL_ARCH.QWEN2


@register("Qwen3ForCausalLM")
class Qwen3Family(Family):
    model_arch = gguf.MODEL_ARCH.QWEN3
