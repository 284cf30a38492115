"""ONNX targets: the ``--to onnx*`` strings and the precision each one asks of the model builder.

The names follow the command-line contract (``onnx`` is full precision); the quant
string is the model builder's own ``--precision`` value, so it can be passed through.
"""

from __future__ import annotations

from collections.abc import Callable

from llmops.converters.base import TargetSpec

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


def onnx_target(name: str) -> TargetSpec | None:
    """``onnx-int4`` -> TargetSpec("onnx", "int4", {"target": "onnx-int4"}); None if not an ONNX target."""
    key = name.strip().lower()
    if key not in TARGETS:
        return None
    return TargetSpec("onnx", TARGETS[key], {"target": key})


def register(add: Callable[[Callable[[str], TargetSpec | None], list[str]], None]) -> None:
    """Called by ``converters.targets`` to add the ONNX table to the ``--to`` values."""
    add(onnx_target, list(TARGETS))
