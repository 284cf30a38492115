"""GGUF targets: the ``--to gguf-*`` strings and what each one means."""

from __future__ import annotations

from dataclasses import dataclass

from llmops.converters.base import TargetSpec


@dataclass(frozen=True)
class GGUFQuant:
    name: str  # Q4_K_M, as in file names and llama.cpp's ftype names
    ftype: int  # llama_ftype / gguf.LlamaFileType value written to general.file_type
    default_type: str  # ggml type of the bulk of the weights
    via_llama_quantizer: bool  # llama.cpp's quantizer picks per-tensor types (and rounds through F16 first)


# llama_ftype values are part of the GGUF format (general.file_type); see gguf.LlamaFileType.
QUANTS: dict[str, GGUFQuant] = {
    "F32": GGUFQuant("F32", 0, "F32", False),
    "F16": GGUFQuant("F16", 1, "F16", False),
    "BF16": GGUFQuant("BF16", 32, "BF16", False),
    "Q8_0": GGUFQuant("Q8_0", 7, "Q8_0", False),
    "Q4_0": GGUFQuant("Q4_0", 2, "Q4_0", True),
    "Q4_K_M": GGUFQuant("Q4_K_M", 15, "Q4_K", True),
    "Q5_K_M": GGUFQuant("Q5_K_M", 17, "Q5_K", True),
    "Q6_K": GGUFQuant("Q6_K", 18, "Q6_K", True),
}

TARGETS: dict[str, str] = {
    "gguf-f32": "F32",
    "gguf-f16": "F16",
    "gguf-bf16": "BF16",
    "gguf-q8_0": "Q8_0",
    "gguf-q4_0": "Q4_0",
    "gguf-q4_k_m": "Q4_K_M",
    "gguf-q5_k_m": "Q5_K_M",
    "gguf-q6_k": "Q6_K",
}
ALIASES: dict[str, str] = {"gguf-q4": "gguf-q4_k_m", "gguf-q5": "gguf-q5_k_m", "gguf-q8": "gguf-q8_0"}


def gguf_target(name: str) -> TargetSpec | None:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in TARGETS:
        return None
    return TargetSpec("gguf", TARGETS[key], {"target": key})


def register(add) -> None:  # noqa: ANN001 - converters.targets.register_targets
    add(gguf_target, [*TARGETS, *ALIASES])
