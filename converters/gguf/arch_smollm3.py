"""SmolLM3 (``LLM_ARCH_SMOLLM3``): Llama's layout, with RoPE left out of every fourth layer.

llama.cpp has that step built in (no GGUF key carries it), so the family differs from Llama
only in the architecture name. A checkpoint whose ``no_rope_layers`` follows another pattern
converts as llama.cpp's converter converts it, and llama.cpp runs it with the built-in step.
"""

from __future__ import annotations

import gguf

from llmops.converters.gguf.arch_base import register
from llmops.converters.gguf.arch_llama import LlamaFamily


@register("SmolLM3ForCausalLM")
class SmolLM3Family(LlamaFamily):
    model_arch = gguf.MODEL_ARCH.SMOLLM3
