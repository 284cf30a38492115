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
    # Whether an importance matrix is ever required is not a property of the mix: llama.cpp
    # refuses per tensor (the types it picks), so the converter asks quantize.requires_imatrix.


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
    # the further mixes llama-quantize offers, with their llama_ftype and default type
    # (llama.cpp's llama_ftype_get_default_type)
    "Q3_K_M": GGUFQuant("Q3_K_M", 12, "Q3_K", True),
    "Q4_K_S": GGUFQuant("Q4_K_S", 14, "Q4_K", True),
    "Q5_K_S": GGUFQuant("Q5_K_S", 16, "Q5_K", True),
    "IQ4_NL": GGUFQuant("IQ4_NL", 25, "IQ4_NL", True),
    "IQ4_XS": GGUFQuant("IQ4_XS", 30, "IQ4_XS", True),
    "IQ3_M": GGUFQuant("IQ3_M", 27, "IQ3_S", True),
    "IQ2_M": GGUFQuant("IQ2_M", 29, "IQ2_S", True),
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
    "gguf-q3_k_m": "Q3_K_M",
    "gguf-q4_k_s": "Q4_K_S",
    "gguf-q5_k_s": "Q5_K_S",
    "gguf-iq4_nl": "IQ4_NL",
    "gguf-iq4_xs": "IQ4_XS",
    "gguf-iq3_m": "IQ3_M",
    "gguf-iq2_m": "IQ2_M",
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
