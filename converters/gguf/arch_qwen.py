"""Qwen2 / Qwen2.5 (``LLM_ARCH_QWEN2``, with Q/K/V biases), Qwen3 (``LLM_ARCH_QWEN3``, Q/K norms) and
their mixtures of experts, Qwen2-MoE (with a gated shared expert) and Qwen3-MoE.

Both use NeoX-style RoPE in llama.cpp, the same layout as Hugging Face: no permutation.
"""

from __future__ import annotations

import re

import gguf

from llmops.converters.gguf.arch_base import Family, register, stack_experts


@register("Qwen2ForCausalLM")
class Qwen2Family(Family):
    model_arch = gguf.MODEL_ARCH.QWEN2


@register("Qwen3ForCausalLM")
class Qwen3Family(Family):
    model_arch = gguf.MODEL_ARCH.QWEN3


_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class _QwenMoE(Family):
    """Routed experts stacked into ``ffn_{down,gate,up}_exps`` while streaming, as llama.cpp
    stores them; the shared expert and its gate (Qwen2-MoE) stay separate tensors."""

    def stacks(self, names: list[str]) -> dict[str, tuple[str, ...]]:
        return stack_experts(names, _EXPERT, "model.layers.{layer}.mlp.experts.{w}.weight",
                             ("down_proj", "gate_proj", "up_proj"), int(self.find(["num_experts", "num_local_experts"])))

    def add_parameters(self, w: gguf.GGUFWriter) -> None:
        super().add_parameters(w)
        if (n := self.hparams.get("moe_intermediate_size")) is not None:
            w.add_expert_feed_forward_length(int(n))
        if (n := self.hparams.get("shared_expert_intermediate_size")) is not None:
            w.add_expert_shared_feed_forward_length(int(n))


@register("Qwen2MoeForCausalLM")
class Qwen2MoeFamily(_QwenMoE):
    model_arch = gguf.MODEL_ARCH.QWEN2MOE


@register("Qwen3MoeForCausalLM")
class Qwen3MoeFamily(_QwenMoE):
    model_arch = gguf.MODEL_ARCH.QWEN3MOE
