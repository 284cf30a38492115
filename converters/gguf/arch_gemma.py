"""Gemma 2 (``LLM_ARCH_GEMMA2``) and Gemma 3 text models (``LLM_ARCH_GEMMA3``).

Gemma's RMSNorm multiplies by ``1 + weight``; llama.cpp's by ``weight``, so every
norm weight gets 1 added. The output head is always tied to the embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from llmops.converters.gguf.arch_base import Family, register


class _GemmaBase(Family):
    def add_vocab_extras(self, w: gguf.GGUFWriter, root: Path, vocab: dict[str, Any]) -> None:
        if vocab["model"] == "llama":
            w.add_add_space_prefix(False)

    def skip(self, name: str) -> bool:
        return name == "lm_head.weight" or super().skip(name)

    def transform(self, name: str, data: np.ndarray, src_dtype: str, rows: int | None = None) -> np.ndarray:
        if name.endswith("norm.weight"):
            if src_dtype == "F16":  # the addition happens in the checkpoint's own half precision
                return (data.astype(np.float16) + np.float16(1)).astype(np.float32)
            return data + np.float32(1)
        return data


@register("Gemma2ForCausalLM")
class Gemma2Family(_GemmaBase):
    model_arch = gguf.MODEL_ARCH.GEMMA2
    prefer_spm = True

    def add_parameters(self, w: gguf.GGUFWriter) -> None:
        h = self.hparams
        w.add_context_length(int(h["max_position_embeddings"]))
        w.add_embedding_length(int(h["hidden_size"]))
        w.add_block_count(self.block_count)
        w.add_feed_forward_length(int(h["intermediate_size"]))
        w.add_head_count(int(h["num_attention_heads"]))
        w.add_head_count_kv(int(h.get("num_key_value_heads") or h["num_attention_heads"]))
        w.add_layer_norm_rms_eps(float(h["rms_norm_eps"]))
        w.add_key_length(self.head_dim())
        w.add_value_length(self.head_dim())
        # llama.cpp's converter writes no RoPE base for Gemma 2 and its runtime assumes 10000, the
        # value every Gemma 2 release has: the same bytes then. A different base is still written,
        # so such a model runs as its config says rather than as llama.cpp's converter would leave it.
        if (theta := self.rope.get("rope_theta")) is not None and float(theta) != 10000.0:
            w.add_rope_freq_base(float(theta))
        w.add_attn_logit_softcapping(float(h.get("attn_logit_softcapping") or 0.0))
        w.add_final_logit_softcapping(float(h.get("final_logit_softcapping") or 0.0))
        w.add_sliding_window(int(h["sliding_window"]))


@register("Gemma3ForCausalLM")
class Gemma3Family(_GemmaBase):
    model_arch = gguf.MODEL_ARCH.GEMMA3
    prefer_spm = True

    def add_parameters(self, w: gguf.GGUFWriter) -> None:
        h = self.hparams
        w.add_block_count(self.block_count)
        w.add_context_length(int(h.get("max_position_embeddings") or 131072))
        w.add_embedding_length(int(h["hidden_size"]))
        w.add_feed_forward_length(int(h["intermediate_size"]))
        w.add_head_count(int(h.get("num_attention_heads") or 8))
        w.add_head_count_kv(int(h.get("num_key_value_heads") or 4))
        # in the order llama.cpp's converter writes them (its generic keys, then Gemma 3's):
        # the RoPE bases come before the norm epsilon and the head widths
        self.rope.setdefault("rope_theta", 1_000_000.0)  # global (full-attention) layers
        self.add_rope(w)
        w.add_layer_norm_rms_eps(float(h.get("rms_norm_eps") or 1e-6))
        w.add_key_length(int(h.get("head_dim") or 256))
        w.add_value_length(int(h.get("head_dim") or 256))
        if h.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(h["final_logit_softcapping"]))
        if h.get("sliding_window_pattern") != 1 and h.get("sliding_window") is not None:
            w.add_sliding_window(int(h["sliding_window"]))
