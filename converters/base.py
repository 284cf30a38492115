"""The one converter interface.

A converter takes a loaded source checkpoint and a target spec, writes its
output atomically (temporary name, renamed at the end, removed on any error or
Ctrl-C) and returns an ``ArtifactRecord`` the CLI reports and the registry stores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TargetSpec:
    """A parsed ``--to`` value, e.g. gguf-q4 -> TargetSpec("gguf", "Q4_K_M")."""

    format: str  # gguf, gptq, onnx
    quant: str  # F32, F16, BF16, Q8_0, Q4_0, Q4_K_M, Q5_K_M, Q6_K, 4bit, 8bit, fp32, fp16, int8, int4
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ArtifactRecord:
    output: Path
    format: str
    quant: str
    sha256: str
    size_bytes: int
    seconds: float
    peak_rss_bytes: int | None = None
    bits_per_weight: float | None = None
    verification: dict[str, float] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    tool_versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"] = str(self.output)
        return d


class Converter(Protocol):
    format: str

    def convert(self, source: Any, target: TargetSpec, output: Path | None, progress: Progress) -> ArtifactRecord: ...


class ConverterOptions:
    """The options every converter takes from ``llmops convert``, held in one place.

    ``device`` is where the converter computes (GPTQ's calibration, the ONNX builder's
    execution provider); a converter that only runs on the CPU, as GGUF does, ignores it
    and the device then applies to verification alone."""

    def __init__(self, *, allow_nonfinite: bool = False, threads: int | None = None, device: str = "cpu") -> None:
        self.allow_nonfinite = allow_nonfinite
        self.threads = threads
        self.device = device
