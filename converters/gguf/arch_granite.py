"""Granite (``LLM_ARCH_GRANITE``): Llama's layout with four scalar multipliers.

Hugging Face's Granite scales the embeddings (``embedding_multiplier``), each residual branch
(``residual_multiplier``), the attention scores (``attention_multiplier``, in place of
1/sqrt(head_dim)) and divides the logits (``logits_scaling``); llama.cpp reads them as
``{arch}.embedding_scale``, ``residual_scale``, ``attention.scale`` and ``logit_scale``. Like
llama.cpp's converter, a config's ``head_dim`` is ignored (Granite derives it from the widths).
"""

from __future__ import annotations

import gguf

from llmops.converters.gguf.arch_base import register
from llmops.converters.gguf.arch_llama import LlamaFamily


@register("GraniteForCausalLM")
class GraniteFamily(LlamaFamily):
    model_arch = gguf.MODEL_ARCH.GRANITE

    def __init__(self, config: dict, hf_arch: str) -> None:
        super().__init__({k: v for k, v in config.items() if k != "head_dim"}, hf_arch)

    def add_parameters(self, w: gguf.GGUFWriter) -> None:
        super().add_parameters(w)
        h = self.hparams
        # written when set and non-zero, as llama.cpp's converter does (a 1.0 is still written)
        if v := h.get("attention_multiplier"):
            w.add_attention_scale(float(v))
        if v := h.get("embedding_multiplier"):
            w.add_embedding_scale(float(v))
        if v := h.get("residual_multiplier"):
            w.add_residual_scale(float(v))
        if v := h.get("logits_scaling"):
            w.add_logit_scale(float(v))
