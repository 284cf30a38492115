"""OLMo 2 (``LLM_ARCH_OLMO2``): norms after attention and after the feed-forward block instead of
before them, and RMS norms over the whole Q and K projections.

llama.cpp's OLMo 2 graph uses NeoX-style RoPE, the layout Hugging Face stores: no permutation.
The post-norms and Q/K norms map by name (gguf-py's tensor map for this architecture), so the
family only adds what llama.cpp's converter adds beyond the common keys: the sliding window and
its per-layer pattern where a config has one (OLMo 3 configs share the class layout).
"""

from __future__ import annotations

import gguf

from llmops.converters.gguf.arch_base import Family, register


@register("Olmo2ForCausalLM", "Olmo3ForCausalLM")
class Olmo2Family(Family):
    model_arch = gguf.MODEL_ARCH.OLMO2

    def add_parameters(self, w: gguf.GGUFWriter) -> None:
        super().add_parameters(w)
        h = self.hparams
        if "sliding_window" not in h:
            return
        w.add_sliding_window(h["sliding_window"])
        if isinstance(h.get("layer_types"), list):
            pattern = [t == "sliding_attention" for t in h["layer_types"]]
        else:  # OLMo 3's default: every fourth layer attends globally
            pattern = [(i + 1) % 4 != 0 for i in range(self.block_count)]
        w.add_sliding_window_pattern(pattern)
