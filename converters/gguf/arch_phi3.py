"""Phi-3 / Phi-3.5 / Phi-4-mini (``LLM_ARCH_PHI3``): fused ``qkv_proj`` and ``gate_up_proj`` kept fused.

Long-context checkpoints carry LongRoPE factors, written as the
``rope_factors_long``/``rope_factors_short`` tensors llama.cpp reads.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from llmops.converters.gguf.arch_base import Family, register
from llmops.core.errors import LLMOpsError


@register("Phi3ForCausalLM")
class Phi3Family(Family):
    model_arch = gguf.MODEL_ARCH.PHI3

    def _rope_dims(self) -> int:
        n_embd = int(self.find(["hidden_size", "n_embd"]))
        n_head = int(self.find(["num_attention_heads", "n_head"]))
        rot = float(self.rope.get("partial_rotary_factor", self.hparams.get("partial_rotary_factor", 1.0)) or 1.0)
        return int(rot * n_embd) // n_head

    def _orig_ctx(self) -> int:
        return int(self.rope.get("original_max_position_embeddings")
                   or self.hparams.get("original_max_position_embeddings")
                   or self.find(["max_position_embeddings", "n_positions"]))

    def add_parameters(self, w: gguf.GGUFWriter) -> None:
        n_embd = int(self.find(["hidden_size", "n_embd"]))
        w.add_context_length(int(self.find(["max_position_embeddings", "n_positions"])))
        w.add_rope_scaling_orig_ctx_len(self._orig_ctx())
        w.add_embedding_length(n_embd)
        w.add_feed_forward_length(int(self.find(["intermediate_size"])))
        w.add_block_count(self.block_count)
        w.add_head_count(int(self.find(["num_attention_heads", "n_head"])))
        w.add_head_count_kv(int(self.find(["num_key_value_heads", "n_head_kv"])))
        w.add_layer_norm_rms_eps(float(self.find(["rms_norm_eps"])))
        w.add_rope_dimension_count(self._rope_dims())
        w.add_rope_freq_base(float(self.rope.get("rope_theta", 10000.0)))
        w.add_sliding_window(int(self.hparams.get("sliding_window") or 0))

    def add_early_keys(self, w: gguf.GGUFWriter) -> None:
        # llama.cpp's converter writes the attention factor with the rope-factor tensors
        # (Phi3MiniModel.generate_extra_tensors), before the general.* keys
        long_f = self.rope.get("long_factor")
        if long_f:
            scale = int(self.find(["max_position_embeddings", "n_positions"])) / self._orig_ctx()
            rtype = str(self.rope.get("rope_type", "")).lower()
            if rtype in ("su", "longrope"):
                attn = math.sqrt(1 + math.log(scale) / math.log(self._orig_ctx())) if scale > 1.0 else 1.0
            elif rtype == "yarn":
                attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
            else:
                raise LLMOpsError(f"config.json: RoPE scaling type {rtype!r} is not supported for Phi-3")
            w.add_rope_scaling_attn_factors(attn)

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        long_f, short_f = self.rope.get("long_factor"), self.rope.get("short_factor")
        if not long_f:
            return []
        if not short_f or len(long_f) != len(short_f) or len(long_f) * 2 != self._rope_dims():
            raise LLMOpsError("config.json: rope long_factor/short_factor must both have rope_dims/2 entries")
        return [
            (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.asarray(long_f, np.float32)),
            (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.asarray(short_f, np.float32)),
        ]
