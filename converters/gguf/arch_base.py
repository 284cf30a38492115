"""What every architecture family shares, and the registry of families by Hugging Face class name.

A family says three things: which llama.cpp architecture it becomes (and so the
tensor names, via gguf-py's ``TensorNameMap``), the hyper-parameter keys it
writes, and how a tensor changes on the way (Q/K row permutation for llama-style
RoPE, Gemma's ``1 + weight`` norms). Vocabulary export, metadata and tensor
streaming live in their own modules; a family module is small on purpose.
"""

from __future__ import annotations

import re

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import gguf
import numpy as np

from llmops.converters.architectures import FROM_MODEL_TYPE
from llmops.converters.gguf.hf_defaults import with_defaults
from llmops.core.errors import LLMOpsError

_FAMILIES: dict[str, type[Family]] = {}


def register(*hf_names: str):  # noqa: ANN201 - class decorator
    def deco(cls: type[Family]) -> type[Family]:
        for n in hf_names:
            _FAMILIES[n] = cls
        cls.hf_names = tuple(hf_names)
        return cls

    return deco


def supported_architectures() -> list[str]:
    _load_all()
    return sorted(_FAMILIES)


def family_for(config: dict[str, Any], where: str = "config.json") -> Family:
    _load_all()
    archs = config.get("architectures") or []
    name = archs[0] if archs else FROM_MODEL_TYPE.get(str(config.get("model_type")), None)
    if name is None:
        raise LLMOpsError(
            f"{where}: no 'architectures' entry; GGUF conversion supports {', '.join(sorted(_FAMILIES))}"
        )
    cls = _FAMILIES.get(name)
    if cls is None:
        raise LLMOpsError(
            f"architecture {name} is not supported for GGUF conversion; supported: {', '.join(sorted(_FAMILIES))}"
        )
    model_type = config.get("model_type") or next((t for t, n in FROM_MODEL_TYPE.items() if n == name), None)
    return cls(with_defaults(config, model_type), name)


def _load_all() -> None:
    from llmops.converters.gguf import (  # noqa: F401
        arch_gemma, arch_granite, arch_llama, arch_olmo, arch_phi3, arch_qwen, arch_smollm3,
    )


_K = gguf.Keys
# The keys llama.cpp's generic ``TextModel.set_gguf_parameters`` can write for any architecture,
# ending in ``general.file_type``; a family's own keys come after that.
GENERIC_PARAMETER_KEYS: tuple[str, ...] = (
    _K.LLM.BLOCK_COUNT, _K.LLM.CONTEXT_LENGTH, _K.LLM.EMBEDDING_LENGTH, _K.LLM.FEED_FORWARD_LENGTH,
    _K.Attention.HEAD_COUNT, _K.Attention.HEAD_COUNT_KV, _K.Attention.CAUSAL, _K.Rope.SCALING_TYPE,
    _K.Rope.SCALING_FACTOR, _K.Rope.SCALING_ORIG_CTX_LEN, _K.Rope.SCALING_YARN_EXT_FACTOR,
    _K.Rope.SCALING_YARN_ATTN_FACTOR, _K.Rope.SCALING_YARN_BETA_FAST, _K.Rope.SCALING_YARN_BETA_SLOW,
    _K.Rope.DIMENSION_SECTIONS, _K.Rope.FREQ_BASE, _K.Rope.FREQ_BASE_SWA, _K.Attention.LAYERNORM_RMS_EPS,
    _K.Attention.LAYERNORM_EPS, _K.LLM.EXPERT_COUNT, _K.LLM.EXPERT_USED_COUNT, _K.LLM.EXPERT_GROUP_COUNT,
    _K.LLM.EXPERT_GROUP_USED_COUNT, _K.LLM.EXPERT_GATING_FUNC, _K.Attention.KEY_LENGTH, _K.Attention.VALUE_LENGTH,
)


class Family:
    hf_names: ClassVar[tuple[str, ...]] = ()
    model_arch: ClassVar[gguf.MODEL_ARCH]
    prefer_spm: ClassVar[bool] = False  # use tokenizer.model over tokenizer.json when both exist
    # keys in the writer when the generic parameters were done (set by Family.add_parameters)
    _generic_end: int | None = None

    def __init__(self, config: dict[str, Any], hf_arch: str) -> None:
        self.hparams = config
        self.hf_arch = hf_arch
        self.block_count = int(self.find(["num_hidden_layers", "n_layer", "n_layers"]))
        self.tensor_map = gguf.get_tensor_name_map(self.model_arch, self.block_count)
        rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rp = rp if isinstance(rp, dict) else {}
        self.rope = dict(rp.get("full_attention", rp))
        self.rope_swa_theta = (rp.get("sliding_attention") or {}).get("rope_theta")
        if "rope_theta" not in self.rope and config.get("rope_theta") is not None:
            self.rope["rope_theta"] = config["rope_theta"]
        if "rope_type" not in self.rope and self.rope.get("type") is not None:
            self.rope["rope_type"] = self.rope["type"]

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.model_arch]

    def find(self, keys: Iterable[str], default: Any = KeyError) -> Any:
        for k in keys:
            if self.hparams.get(k) is not None:
                return self.hparams[k]
        if default is KeyError:
            raise LLMOpsError(f"config.json: required field {list(keys)[0]!r} is missing")
        return default

    # -- tensors
    def skip(self, name: str) -> bool:
        return name.endswith((".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq"))

    def map_name(self, name: str) -> str:
        new = self.tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise LLMOpsError(f"tensor {name!r} has no GGUF equivalent for {self.hf_arch}")
        return new

    def stacks(self, names: list[str]) -> dict[str, tuple[str, ...]]:
        """Checkpoint tensors that llama.cpp stores stacked as one (MoE experts): merged name ->
        its parts in order. The merged name is one gguf-py's tensor map knows."""
        return {}

    def transform(self, name: str, data: np.ndarray, src_dtype: str, rows: int | None = None) -> np.ndarray:
        """Change a float32 tensor on its way in: the whole tensor, or a block of whole rows of a
        tensor of ``rows`` rows (a multiple of :meth:`row_block`)."""
        return data

    def row_block(self, name: str, shape: tuple[int, ...] | None = None) -> int | None:
        """Rows of ``name`` (of this ``shape``) that :meth:`transform` needs together (None: the
        whole tensor)."""
        return 1

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        return []

    def add_vocab_prelude(self, w: gguf.GGUFWriter, root: Path) -> None:
        """Tokenizer keys a family writes before the vocabulary (where llama.cpp's converter does)."""

    def add_vocab_extras(self, w: gguf.GGUFWriter, root: Path, vocab: dict[str, Any]) -> None:
        """Tokenizer keys a family adds beyond the common export."""

    # -- metadata
    def add_parameters(self, w: gguf.GGUFWriter) -> None:
        """The generic hyper-parameters most decoder-only families share."""
        h = self.hparams
        w.add_block_count(self.block_count)
        if (n_ctx := self.find(["max_position_embeddings", "n_ctx", "n_positions"], None)) is not None:
            w.add_context_length(int(n_ctx))
        w.add_embedding_length(int(self.find(["hidden_size", "n_embd"])))
        if (n_ff := self.find(["intermediate_size", "n_inner"], None)) is not None:
            w.add_feed_forward_length(int(n_ff))
        w.add_head_count(int(self.find(["num_attention_heads", "n_head"])))
        if (n_kv := self.find(["num_key_value_heads", "n_kv_heads"], None)) is not None:
            w.add_head_count_kv(int(n_kv))
        self.add_rope(w)
        if (eps := self.find(["rms_norm_eps", "norm_eps"], None)) is not None:
            w.add_layer_norm_rms_eps(float(eps))
        if (n_experts := self.find(["num_local_experts", "num_experts", "n_routed_experts"], None)) is not None:
            w.add_expert_count(int(n_experts))
        if (n_used := self.find(["num_experts_per_tok", "num_experts_per_token", "top_k_experts"], None)) is not None:
            w.add_expert_used_count(int(n_used))
        if (head_dim := h.get("head_dim")) is not None:
            w.add_key_length(int(head_dim))
            w.add_value_length(int(head_dim))
        self._generic_end = len(w.kv_data[0])

    def add_early_keys(self, w: gguf.GGUFWriter) -> None:
        """Keys llama.cpp's converter writes while it prepares the tensors (in a family's
        ``generate_extra_tensors``), which puts them before every ``general.*`` key but the
        architecture."""

    def file_type_index(self, keys: list[str], start: int) -> int:
        """Where ``general.file_type`` goes among the keys written so far (``keys``, in order;
        the family's parameters from ``start`` on).

        llama.cpp writes it at the end of its generic ``TextModel.set_gguf_parameters``: before
        the keys a family adds after calling it, after the keys of a family that writes its own
        list instead. A family that called :meth:`add_parameters` here has that place recorded;
        one with its own list gets it after the last of its generic keys (the families whose
        list llama.cpp writes by hand end their generic part the same way)."""
        if self._generic_end is not None:
            return self._generic_end
        generic = {k.format(arch=self.arch_name) for k in GENERIC_PARAMETER_KEYS}
        return max((i + 1 for i in range(start, len(keys)) if keys[i] in generic), default=len(keys))

    def add_rope(self, w: gguf.GGUFWriter) -> None:
        rope_type = str(self.rope.get("rope_type") or "default").lower()
        factor = self.rope.get("factor")
        if rope_type == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(factor))
        elif rope_type == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(factor))
            if (orig := self.rope.get("original_max_position_embeddings")) is not None:
                w.add_rope_scaling_orig_ctx_len(int(orig))
        elif rope_type not in ("default", "llama3", "su", "longrope", "dynamic"):
            raise LLMOpsError(f"config.json: RoPE scaling type {rope_type!r} is not supported for GGUF conversion")
        if (theta := self.rope.get("rope_theta")) is not None:
            w.add_rope_freq_base(float(theta))
        if self.rope_swa_theta is not None:
            w.add_rope_freq_base_swa(float(self.rope_swa_theta))

    def head_dim(self) -> int:
        if self.hparams.get("head_dim") is not None:
            return int(self.hparams["head_dim"])
        return int(self.hparams["hidden_size"]) // int(self.hparams["num_attention_heads"])

    def quant_hparams(self) -> dict[str, int]:
        """What llama.cpp's quantizer looks at when choosing per-tensor types."""
        n_head = int(self.find(["num_attention_heads", "n_head"]))
        return {
            "n_embd": int(self.find(["hidden_size", "n_embd"])),
            "n_ff": int(self.find(["intermediate_size", "n_inner"], 0)),
            "n_layer": self.block_count,
            "n_head": n_head,
            "n_head_kv": int(self.find(["num_key_value_heads", "n_kv_heads"], n_head)),
            "n_expert": int(self.find(["num_local_experts", "num_experts"], 0)),
            "n_embd_head_k": self.head_dim(),
            "n_embd_head_v": self.head_dim(),
        }


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Llama 3.1+ frequency factors (``rope_freqs.weight``), from the published formula.

    Computed as llama.cpp's converter computes them (``LlamaModel.generate_extra_tensors``):
    base frequencies as a float32 torch tensor and each factor from its float32 element, so the
    smoothed band rounds as it does there (numpy's float32 arithmetic is one ulp off in places)."""
    import torch

    base = float(rope.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low = rope.get("low_freq_factor", 1.0)
    high = rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out: list[Any] = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def stack_experts(names: Iterable[str], pattern: re.Pattern[str], merged: str, weights: tuple[str, ...],
                  n_experts: int) -> dict[str, tuple[str, ...]]:
    """Group per-expert tensors (``pattern`` captures layer, expert and weight name) into stacks
    named ``merged.format(layer=, w=)``, experts in order and, per layer, weights in the order
    llama.cpp's converter emits them; a missing expert is a one-line error."""
    found: dict[tuple[int, str], dict[int, str]] = {}
    for name in names:
        m = pattern.match(name)
        if m:
            found.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = name
    out: dict[str, tuple[str, ...]] = {}
    for (layer, w), experts in sorted(found.items(), key=lambda kv: (kv[0][0], weights.index(kv[0][1]))):
        if sorted(experts) != list(range(n_experts)):
            missing = sorted(set(range(n_experts)) - set(experts))
            raise LLMOpsError(f"layer {layer} {w}: experts {missing} are missing (config says {n_experts})")
        out[merged.format(layer=layer, w=w)] = tuple(experts[e] for e in range(n_experts))
    return out
