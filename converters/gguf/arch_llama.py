"""Llama family: Llama 2/3, SmolLM/SmolLM2, Mistral (``LLM_ARCH_LLAMA``).

llama.cpp applies RoPE to adjacent pairs (GPT-J style) for this architecture,
while Hugging Face's Llama rotates the two halves of each head; the Q and K
projections are therefore row-permuted within each head on the way in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np

from llmops.converters.gguf.arch_base import Family, llama3_rope_factors, register, stack_experts


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """HF rotate-half layout -> interleaved pairs, per head (rows of a weight or a bias)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@register("LlamaForCausalLM", "MistralForCausalLM", "LLaMAForCausalLM")
class LlamaFamily(Family):
    model_arch = gguf.MODEL_ARCH.LLAMA

    def _heads(self, name: str) -> int | None:
        """The heads whose rows ``name`` permutes (Q: attention heads, K: key/value heads), or None."""
        n_head = int(self.find(["num_attention_heads", "n_head"]))
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return n_head
        if name.endswith(("k_proj.weight", "k_proj.bias")):
            return int(self.find(["num_key_value_heads", "n_kv_heads"], n_head))
        return None

    def transform(self, name: str, data: np.ndarray, src_dtype: str, rows: int | None = None) -> np.ndarray:
        heads = self._heads(name)
        if heads is None:
            return data
        if rows is not None and rows != data.shape[0]:  # a block of whole heads (row_block)
            heads = heads * data.shape[0] // rows
        return permute_qk(data, heads, heads)

    def row_block(self, name: str, shape: tuple[int, ...] | None = None) -> int | None:
        """A head's rows: each head's rows are permuted among themselves, so Q and K stream in
        blocks of whole heads like every other tensor (read whole, a 7B layer's Q stalled the
        quantizer while 64 MB were decoded and permuted)."""
        heads = self._heads(name)
        if heads is None:
            return 1
        if shape and len(shape) >= 2 and shape[0] % heads == 0 and (shape[0] // heads) % 2 == 0:
            return shape[0] // heads
        return None

    def add_parameters(self, w: gguf.GGUFWriter) -> None:
        super().add_parameters(w)
        w.add_vocab_size(int(self.hparams["vocab_size"]))
        w.add_rope_dimension_count(self.head_dim())

    def add_vocab_prelude(self, w: gguf.GGUFWriter, root: Path) -> None:
        tc = root / "tokenizer_config.json"
        if tc.is_file():
            value = json.loads(tc.read_text(encoding="utf-8")).get("add_prefix_space")
            if isinstance(value, bool):
                w.add_add_space_prefix(value)

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        if str(self.rope.get("rope_type", "")).lower() == "llama3":
            name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
            return [(name, llama3_rope_factors(self.rope, self.head_dim()))]
        return []


_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


@register("MixtralForCausalLM")
class MixtralFamily(LlamaFamily):
    """Mixtral: Llama attention, a router and ``num_local_experts`` SwiGLU experts per layer, which
    llama.cpp stores stacked as ``ffn_{gate,down,up}_exps`` ([experts, rows, columns])."""

    def stacks(self, names: list[str]) -> dict[str, tuple[str, ...]]:
        return stack_experts(names, _EXPERT, "layers.{layer}.feed_forward.experts.{w}.weight", ("w1", "w2", "w3"),
                             int(self.find(["num_local_experts"])))
