"""What the ONNX export refuses before any file is written: architecture, precision on the
execution provider, builder options, non-finite weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmops.converters.architectures import class_name_of
from llmops.converters.onnx.targets import BLOCK_SIZES, DEFAULT_BLOCK_SIZE, LAYER_PROJECTIONS, Int4Recipe, recipe
from llmops.core.checkpoint import Checkpoint
from llmops.core.errors import LLMOpsError, UsageError

Progress = Callable[[str], None]

# Architectures that both the GGUF converter (converters/gguf/arch_*.py) and the model
# builder of onnxruntime-genai 0.18 (builder.py's create_model dispatch) handle. Phi-3
# with LongRoPE (max_position_embeddings != original_max_position_embeddings) goes to the
# builder's Phi3MiniLongRoPEModel, which it also supports.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "GraniteForCausalLM",
)

# Architectures the builder dispatches but cannot export correctly, refused up front with the reason.
# SmolLM3 leaves RoPE out of every 4th layer; the builder's SmolLM3Model turns the rotary embedding
# fused into GroupQueryAttention off for those layers, which sends them to its separate RotaryEmbedding
# path: with the fused path's graph (no position_ids input: CPU fp32 and CUDA) that is a KeyError
# after loading the whole model, and elsewhere it would rotate the very layers that take no RoPE.
REFUSED_ARCHITECTURES: dict[str, str] = {
    "SmolLM3ForCausalLM": "onnxruntime-genai 0.18's model builder cannot export its RoPE-less layers "
                          "(every 4th layer)",
}

# precision -> execution providers it is built for: the builder's own list of valid
# combinations ("FP32 CPU, FP32 CUDA, FP16 CUDA, INT8 CPU, INT8 CUDA, INT4 CPU, INT4 CUDA").
# fp16 for the CPU builds (MultiHeadAttention instead of GroupQueryAttention) and a single
# forward pass runs, but onnxruntime-genai 0.18 fails on its second decoding step ("Shape
# mismatch attempting to re-use buffer" in a Cast onnxruntime inserts for fp16 on the CPU),
# so it is refused rather than handed out half-working.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "fp32": ("cpu", "cuda"),
    "fp16": ("cuda",),
    "int8": ("cpu", "cuda"),
    "int4": ("cpu", "cuda"),
}



def architecture_of(ckpt: Checkpoint) -> str:
    """The Hugging Face class name, or a one-line error naming what is supported."""
    name = ckpt.architecture or class_name_of(ckpt.config)
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if name is None:
        raise LLMOpsError(f"{ckpt.root / 'config.json'}: no 'architectures' entry; ONNX conversion supports {supported}")
    if name in REFUSED_ARCHITECTURES:
        raise LLMOpsError(f"architecture {name} is not supported for ONNX conversion: "
                          f"{REFUSED_ARCHITECTURES[name]}; supported: {supported}")
    if name not in SUPPORTED_ARCHITECTURES:
        raise LLMOpsError(f"architecture {name} is not supported for ONNX conversion; supported: {supported}")
    cfg = ckpt.config
    if name == "Phi3ForCausalLM" and cfg.get("max_position_embeddings") != cfg.get("original_max_position_embeddings"):
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        if kind not in ("longrope", "su"):
            # the builder takes this for a LongRoPE model and fails without its factors
            raise LLMOpsError(f"{ckpt.root / 'config.json'}: a Phi-3 whose max_position_embeddings "
                              f"({cfg.get('max_position_embeddings')}) differs from original_max_position_embeddings "
                              f"({cfg.get('original_max_position_embeddings')}) needs LongRoPE scaling factors "
                              f"(rope type 'longrope', got {kind!r}); the ONNX model builder cannot export it")
    return name


def adapt_config_for_builder(config: Any) -> None:
    """Give a transformers 5 config object (``AutoConfig``) the fields the model builder of
    onnxruntime-genai 0.18 reads, in place; to be applied to the builder's ``hf_config`` between
    ``parse_extra_options`` and ``create_model``.

    transformers 5 keeps RoPE settings in ``rope_parameters`` only: per layer type for Gemma 3
    (``{"full_attention": {...}, "sliding_attention": {...}}``) and with ``rope_type`` but no
    ``type``. The builder indexes ``rope_parameters["rope_type"]`` (a KeyError on the per-layer
    form), reads Gemma 3's local base from ``rope_local_base_freq`` and the LongRoPE kind from
    ``rope_parameters["type"]``; transformers 4 configs carried all three.
    """
    rp = getattr(config, "rope_parameters", None)
    if not isinstance(rp, dict):
        return
    if "full_attention" in rp or "sliding_attention" in rp:
        full = dict(rp.get("full_attention") or {})
        local = rp.get("sliding_attention") or {}
        if local.get("rope_theta") is not None and getattr(config, "rope_local_base_freq", None) is None:
            config.rope_local_base_freq = local["rope_theta"]
        if full.get("rope_theta") is not None:
            config.rope_theta = full["rope_theta"]
        full.setdefault("rope_type", "default")
        config.rope_parameters = full
        rp = full
    if "rope_type" in rp and "type" not in rp:
        rp["type"] = rp["rope_type"]


def builder_options(precision: str, device: str, options: dict[str, Any],
                    config: dict[str, Any] | None = None) -> dict[str, str]:
    """The builder's ``--extra_options`` for this target, validated here so that errors are ours."""
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r} for ONNX conversion; choose cpu or cuda")
    if device not in PROVIDERS[precision]:
        raise UsageError(f"onnx-{precision} is built for --device {' or '.join(PROVIDERS[precision])} only "
                         "(onnxruntime-genai cannot decode the model builder's fp16 CPU graph); "
                         "use onnx (fp32), onnx-int8 or onnx-int4 on the CPU")
    out: dict[str, str] = {}
    if precision in ("int4", "int8"):
        bs = options.get("block_size")
        bs = DEFAULT_BLOCK_SIZE if bs is None else bs
        try:
            bs = int(bs)
        except (TypeError, ValueError):
            raise UsageError(f"block size must be an integer, got {bs!r}") from None
        if bs not in BLOCK_SIZES:
            raise UsageError(f"block size {bs} is not supported by MatMulNBits; choose one of "
                             f"{', '.join(map(str, BLOCK_SIZES))}")
        out["block_size"] = str(bs)
        level = options.get("int4_accuracy_level", options.get("accuracy_level"))
        if level is not None:
            if str(level) not in ("0", "1", "2", "3", "4"):
                raise UsageError(f"accuracy level must be 0..4 (1 fp32, 2 fp16, 3 bf16, 4 int8 activations), "
                                 f"got {level!r}")
            out["accuracy_level"] = str(level)
    # the builder's own --extra_options (KEY=VALUE), for what this converter does not expose,
    # e.g. {"algo_config": "k_quant_mixed"}; they are recorded with the artifact
    extra = options.get("extra_options") or {}
    if not isinstance(extra, dict):
        raise UsageError(f"extra_options must be a mapping of the model builder's KEY=VALUE options, got {extra!r}")
    for k, v in extra.items():
        if str(k) in ("hf_remote", "trust_remote_code"):
            raise UsageError(f"extra option {k} is not accepted: llmops never runs code shipped with a checkpoint")
        out[str(k)] = str(v).lower() if isinstance(v, bool) else str(v)
    if (config or {}).get("sliding_window") and "windowed_kv_cache" not in out:
        # A windowed cache (a ring of window-size buffers for the sliding-window layers, Gemma 2/3)
        # cannot be fed the empty past that a full-window forward pass needs, so plain onnxruntime
        # could not evaluate the model; full-length caches keep the folder runnable by both
        # runtimes, at the price of more KV memory for long contexts in onnxruntime-genai.
        out["windowed_kv_cache"] = "false"
    return out


def _ties_embeddings(config: dict[str, Any]) -> bool:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def int4_recipe(precision: str, options: dict[str, Any]) -> Int4Recipe | None:
    """The int4 recipe of this target (``options["recipe"]``, else the default); None for the
    other precisions, where a recipe is refused."""
    name = options.get("recipe")
    if precision != "int4":
        if name is not None:
            raise UsageError(f"a recipe ({name}) applies to onnx-int4 only")
        return None
    return recipe(name)


def recipe_target_options(rec: Int4Recipe | None, extra: dict[str, str], config: dict[str, Any],
                          layers: int | None) -> dict[str, Any] | None:
    """The builder's structured ``target_options`` for a recipe that keeps matrices at 8 bits
    (None for one that does not: the builder then runs exactly as its command line without them).

    Every 8-bit matrix is an override by the exact node name the builder gives it; the LM head is
    its ``last_matmul`` preset. A tied embedding is then read from the LM head's 8-bit blocks by
    GatherBlockQuantized (bits=8): the builder only shares them when ``Gather`` is among the
    quantized op types, which its flat options add for tied models but its structured ones do not.
    """
    if rec is None or not rec.int8:
        return None
    _check_k_quant_blocks(rec, extra, config)
    overrides: list[dict[str, Any]] = []
    if "lm_head" in rec.int8:
        overrides.append({"match": {"preset": "last_matmul"}, "type": "int8"})
    per_layer = [LAYER_PROJECTIONS[p] for p in rec.int8 if p != "lm_head"]
    if per_layer and not layers:
        raise LLMOpsError("config.json does not give num_hidden_layers, which the int4 recipe needs")
    for i in range(layers or 0):
        for p in per_layer:
            overrides.append({"match": {"name": f"/model/layers.{i}/{p}/MatMul"}, "type": "int8"})
    weights: dict[str, Any] = {"overrides": overrides}
    if rec.method != "default" and "algo_config" not in extra:
        weights["method"] = rec.method
    if _ties_embeddings(config) and extra.get("shared_embeddings", "true") != "false":
        op_types = extra.get("op_types_to_quantize", "MatMul").split("/")
        weights["op_types"] = [*op_types, *(["Gather"] if "Gather" not in op_types else [])]
    return {"quant_config": {"weights": weights}}


def _check_k_quant_blocks(rec: Int4Recipe, extra: dict[str, str], config: dict[str, Any]) -> None:
    """k_quant stores 4-bit zero points two to a byte per row and fails (after the whole export)
    on a 4-bit matrix whose row has an odd number of blocks, e.g. SmolLM2's 576 columns in blocks
    of 64; refused here instead."""
    if extra.get("algo_config", rec.method) not in ("k_quant", "k_quant_last", "k_quant_mixed", "k_quant_linear"):
        return
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    bs = int(extra.get("block_size", DEFAULT_BLOCK_SIZE))
    widths = {"hidden_size": cfg.get("hidden_size")} if "lm_head" not in rec.int8 else {}
    four_bit = [p for p in LAYER_PROJECTIONS if p not in rec.int8]
    if any(p != "down_proj" for p in four_bit):
        widths["hidden_size"] = cfg.get("hidden_size")
    if "down_proj" in four_bit:
        widths["intermediate_size"] = cfg.get("intermediate_size")
    for key, k in widths.items():
        if isinstance(k, int) and (-(-k // bs)) % 2:
            raise UsageError(f"the {rec.name} recipe's k_quant 4-bit blocks need an even number of blocks per "
                             f"row: {key} {k} makes {-(-k // bs)} blocks of {bs}; choose another --block-size")


def check_finite(ckpt: Checkpoint, say: Progress) -> None:
    """Refuse NaN/Inf weights up front, as the GGUF converter does (the builder would copy them)."""
    say("checking that every weight is finite")
    for name in ckpt.names():
        info = ckpt.info(name)
        if not info.is_float:
            raise LLMOpsError(f"tensor {name} has integer dtype {info.dtype}; quantized checkpoints are not supported")
    ckpt.check_finite()
