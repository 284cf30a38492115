"""ONNX targets: the ``--to onnx*`` strings, the precision each one asks of the model builder,
and the int4 recipes (``--to onnx-int4:RECIPE``).

The names follow the command-line contract (``onnx`` is full precision); the quant
string is the model builder's own ``--precision`` value, so it can be passed through.

An int4 recipe says which matrices the builder's weight-only quantizer (MatMulNBits) keeps at
8 bits instead of 4, and with which of its int4 methods. The builder's own default (``rtn``)
rounds every MatMul, and the tied embedding/LM head with them, to 4 bits: on SmolLM2-135M
(16 chunks x 512 of wikitext-2) KL-divergence 0.432, PPL 39.94, against Q4_K_M's 0.059 / 30.34
(source 28.80). Each group alone at 4 bits costs: the LM head with its tied embedding 0.10,
attention 0.12 (v_proj 0.08 of it, q/k/o 0.015 each), down_proj 0.10, up_proj 0.05, gate_proj
0.03; and a better int4 rounding (k_quant: 0.412) or int8 activations off (accuracy level 1:
0.429) change little. So ``mixed``, the default, keeps the LM head (and the tied embedding, read
from the same 8-bit blocks), q/k/v, up_proj and down_proj at 8 bits, and gate_proj and o_proj
at 4 with k_quant: KLD 0.040, PPL 30.11, at 8.26 bits per weight (136 MiB against rtn's 86 and
Q4_K_M's 101), decoding at about 0.87x rtn's speed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmops.converters.base import TargetSpec
from llmops.core.errors import UsageError

# --to value -> model builder precision (also the ArtifactRecord's quant)
TARGETS: dict[str, str] = {
    "onnx": "fp32",
    "onnx-fp16": "fp16",
    "onnx-int8": "int8",
    "onnx-int4": "int4",
}

# options the CLI may pass with an ONNX target, and their defaults
DEFAULT_BLOCK_SIZE = 32
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits accepts

# The projections a recipe can keep at 8 bits, as the model builder names their MatMul nodes in
# every architecture this converter supports: q/k/v packed into one qkv_proj (the builder packs
# them as long as no override names q_proj, k_proj or v_proj alone), and the lm_head, whose
# weights the tied embedding's GatherBlockQuantized reads too.
LAYER_PROJECTIONS: dict[str, str] = {
    "qkv_proj": "attn/qkv_proj",
    "o_proj": "attn/o_proj",
    "gate_proj": "mlp/gate_proj",
    "up_proj": "mlp/up_proj",
    "down_proj": "mlp/down_proj",
}


@dataclass(frozen=True)
class Int4Recipe:
    """How ``onnx-int4`` is quantized: the builder's int4 method (its ``algo_config``) and the
    matrices kept at 8 bits (``lm_head`` and names of ``LAYER_PROJECTIONS``, in every layer)."""

    name: str
    summary: str
    method: str = "default"  # the builder's base method: default (MLAS round-to-nearest), rtn, k_quant
    int8: tuple[str, ...] = ()

    def parameters(self) -> dict[str, object]:
        """What the artifact's description records, so that results of two recipes never mix."""
        return {"name": self.name, "method": self.method, "int8": list(self.int8)}


RECIPES: dict[str, Int4Recipe] = {
    "rtn": Int4Recipe(
        "rtn", "the model builder's own default: symmetric round-to-nearest 4 bits for every MatMul and the "
        "tied embedding/LM head (the smallest and fastest, and the least accurate)"),
    "head8": Int4Recipe(
        "head8", "k-quant 4 bits for every layer, the LM head (with a tied embedding) at 8 bits",
        method="k_quant", int8=("lm_head",)),
    "mixed": Int4Recipe(
        "mixed", "4 bits where it is cheap (gate_proj, o_proj), 8 bits for the LM head with its tied embedding, "
        "q/k/v, up_proj and down_proj",
        method="k_quant", int8=("lm_head", "qkv_proj", "up_proj", "down_proj")),
}
DEFAULT_RECIPE = "mixed"


def recipe(name: str | None) -> Int4Recipe:
    """The recipe called ``name`` (the default one for None), or a usage error listing them."""
    key = DEFAULT_RECIPE if name is None else str(name).strip().lower()
    if key not in RECIPES:
        raise UsageError(f"unknown onnx-int4 recipe {name!r}; choose one of {', '.join(RECIPES)} "
                         f"(default {DEFAULT_RECIPE})")
    return RECIPES[key]


def onnx_target(name: str) -> TargetSpec | None:
    """``onnx-int4`` -> TargetSpec("onnx", "int4", {"target": "onnx-int4"}); ``onnx-int4:rtn`` adds
    ``{"recipe": "rtn"}``; None if not an ONNX target."""
    key, sep, rec = name.strip().lower().partition(":")
    if key not in TARGETS:
        return None
    if not sep:
        return TargetSpec("onnx", TARGETS[key], {"target": key})
    if key != "onnx-int4":
        raise UsageError(f"{name}: only onnx-int4 takes a recipe (onnx-int4:{'|'.join(RECIPES)})")
    return TargetSpec("onnx", TARGETS[key], {"target": key, "recipe": recipe(rec).name})


def register(add: Callable[[Callable[[str], TargetSpec | None], list[str]], None]) -> None:
    """Called by ``converters.targets`` to add the ONNX table to the ``--to`` values."""
    add(onnx_target, [*TARGETS, *(f"onnx-int4:{r}" for r in RECIPES)])
