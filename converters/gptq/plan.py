"""What will be quantized, and with which group size, decided before any weight is read.

GPTQModel quantizes the linear layers inside the decoder blocks. Their input
widths decide which group sizes are valid: the GPTQ kernels that vLLM, TGI,
exllama/marlin and GPTQModel's own CPU kernel ship reject a checkpoint whose
group size does not divide a layer's input width (SmolLM2's 576-wide layers with
the customary 128, for one). Rather than write a checkpoint those kernels refuse,
the largest power of two that divides every width is used, and said.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.core.errors import LLMOpsError, UsageError

DEFAULT_GROUP_SIZE = 128
MIN_FALLBACK_GROUP = 32
# What GPTQModel accepts (-1: one scale per output channel over the whole input width).
VALID_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class LayerPlan:
    model_type: str
    architecture: str
    n_layers: int
    widths: dict[str, int]  # quantized linear module name in the first block -> in_features
    parameters: int  # weights of all quantized linear modules


def plan_layers(root: Path, config: dict[str, Any]) -> LayerPlan:
    """Quantized linear layers of the model in ``root``, from a weightless (meta-device) skeleton."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = str(config.get("model_type") or "")
    archs = config.get("architectures") or []
    arch = archs[0] if archs else model_type or "unknown"
    if not model_type:
        raise LLMOpsError(f"{root / 'config.json'}: no 'model_type'; cannot tell which architecture this is")
    # Whether GPTQModel has a definition for the model type is checked in the quantization
    # worker: importing gptqmodel here would apply its global patches to this process.
    try:
        hf_config = AutoConfig.from_pretrained(root)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LLMOpsError(f"architecture {arch} (model type {model_type!r}) is not supported by GPTQ conversion: "
                          f"{first[:200]}") from None
    blocks = _decoder_blocks(skeleton, int(getattr(hf_config, "num_hidden_layers", 0) or 0))
    if blocks is None:
        raise LLMOpsError(f"architecture {arch}: no stack of decoder layers found to quantize")
    fused = [n for n, prm in blocks[0].named_parameters() if prm.dim() == 3]
    if fused:
        # transformers 5 keeps a layer's experts as stacked 3-D weights; GPTQModel 7.6 quantizes
        # them as separate per-expert modules, a layout whose loading this converter cannot check
        raise LLMOpsError(f"architecture {arch}: GPTQ conversion of mixture-of-experts layers "
                          f"({fused[0].rsplit('.', 1)[0]}) is not supported; use a GGUF or ONNX target")
    widths: dict[str, int] = {}
    params = 0
    for i, block in enumerate(blocks):
        for name, mod in block.named_modules():
            w = _in_features(mod)
            if w is None:
                continue
            if i == 0:
                widths[name] = w
            params += int(mod.weight.numel())
    if not widths:
        raise LLMOpsError(f"architecture {arch}: its decoder layers have no linear layers to quantize")
    return LayerPlan(model_type, arch, len(blocks), widths, params)


def _decoder_blocks(model: Any, n_layers: int) -> Any:
    import torch

    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers and n_layers > 0:
            return mod
    return None


def _in_features(mod: Any) -> int | None:
    import torch

    if isinstance(mod, torch.nn.Linear):
        return int(mod.in_features)
    if type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None:  # GPT-2 style, weight [in, out]
        return int(mod.weight.shape[0])
    return None


def choose_group_size(requested: Any, widths: dict[str, int], say: Callable[[str], None]) -> int:
    """``requested`` if every width is a multiple of it, else the largest power of two >= 32 that divides all."""
    if requested is None:
        requested = DEFAULT_GROUP_SIZE
    if isinstance(requested, bool) or not isinstance(requested, int) or requested not in VALID_GROUP_SIZES:
        raise UsageError(f"GPTQ group size must be one of {', '.join(map(str, VALID_GROUP_SIZES))} "
                         f"(-1: per output channel), got {requested!r}")
    if requested == -1:
        return -1
    distinct = sorted(set(widths.values()))
    if all(w % requested == 0 for w in distinct):
        return requested
    g = requested
    while g >= MIN_FALLBACK_GROUP and not all(w % g == 0 for w in distinct):
        g //= 2
    shown = ", ".join(str(w) for w in distinct)
    if g < MIN_FALLBACK_GROUP:
        raise LLMOpsError(f"no GPTQ group size from {MIN_FALLBACK_GROUP} to {requested} divides the input widths of "
                          f"the quantized layers ({shown}); use --group-size -1 (per channel)")
    say(f"group size {requested} does not divide the input width of every quantized layer ({shown}); using {g}")
    return g
