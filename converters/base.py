"""The one converter interface.

A converter takes a loaded source checkpoint and a target spec, writes its output
under a temporary name (``llmops.core.atomic``: removed on any error or Ctrl-C) and
returns an ``ArtifactRecord`` of the *staged* output, which the caller commits (renames
into place) once it is satisfied, e.g. after verification, or discards.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llmops.core.atomic import Staged

# a plain callable or a reporter (llmops.core.progress.Reporter, itself such a callable)
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
    # the output's tensors, {name, shape, type, bytes} each, in the format's own spelling of shapes
    # and types: for --json and -v, never the registry's parameters (thousands of rows for a large model)
    tensors: list[dict[str, Any]] | None = field(default=None, repr=False)
    staged: Staged | None = field(default=None, repr=False, compare=False)

    def commit(self) -> Path:
        """Rename the staged output into place; ``output`` becomes its final path."""
        if self.staged is not None:
            self.output = self.staged.commit()
            self.staged = None
        return self.output

    def discard(self) -> None:
        """Remove the staged output; whatever was at the destination before stays."""
        if self.staged is not None:
            self.staged.discard()
            self.staged = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("staged", None)
        d["output"] = str(self.output)
        return d


class Converter(Protocol):
    format: str

    def convert(self, source: Any, target: TargetSpec, output: Path | None, progress: Progress) -> ArtifactRecord: ...


class ConverterOptions:
    """The options every converter takes from ``llmops convert``, held in one place, and the
    steps every converter takes: open the source, write it staged (:meth:`write`), describe
    the staged output (:meth:`describe`); a description that fails removes the output.

    ``device`` is where the converter computes (GPTQ's calibration, the ONNX builder's
    execution provider); a converter that only runs on the CPU, as GGUF does, ignores it
    and the device then applies to verification alone."""

    def __init__(self, *, allow_nonfinite: bool = False, threads: int | None = None, device: str = "cpu") -> None:
        self.allow_nonfinite = allow_nonfinite
        self.threads = threads
        self.device = device

    def convert(self, source: Any, target: TargetSpec, output: Path | None, progress: Progress) -> ArtifactRecord:
        from llmops.core.checkpoint import Checkpoint, open_checkpoint

        ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
        t0 = time.perf_counter()
        res = self.write(ckpt, target, output, progress)
        seconds = time.perf_counter() - t0
        with discard_on_error(res.staged):
            return self.describe(ckpt, target, res, seconds)

    def write(self, ckpt: Any, target: TargetSpec, output: Path | None, progress: Progress) -> Any:
        """Write the staged output; a result with ``path`` (the staged copy) and ``staged``."""
        raise NotImplementedError

    def describe(self, ckpt: Any, target: TargetSpec, res: Any, seconds: float) -> ArtifactRecord:
        raise NotImplementedError


def finish(result: Any, commit: bool) -> Any:
    """A format's result, committed unless its caller will check it first (``commit=False``)."""
    if commit and result.staged is not None:
        result.path, result.staged = result.staged.commit(), None
    return result


def tensor_lines(table: list[dict[str, Any]]) -> list[str]:
    """The per-tensor table (``-v``) as lines, ``[i/n] name [shape] -> TYPE bytes``, in columns as
    wide as the table needs, so thousands of rows stay readable."""
    n = len(table)
    wn = max((len(r["name"]) for r in table), default=0)
    ws = max((len(str(r["shape"])) for r in table), default=0)
    wt = max((len(r["type"]) for r in table), default=0)
    wi = len(str(n))
    return [f"[{i:>{wi}}/{n}] {r['name']:<{wn}}  {str(r['shape']):<{ws}}  -> {r['type']:<{wt}} {r['bytes']:>14,} bytes"
            for i, r in enumerate(table, 1)]


def bits_per_weight(stored_tensor_bytes: int, parameter_count: int) -> float | None:
    """The one definition for every format: the bytes of **all** stored tensors (quantized
    weights with their scales, zero points and group indices, and whatever stays in floating
    point: embeddings, norms, an untied output head) times 8, over the source checkpoint's
    parameter count. Comparable across GGUF, GPTQ and ONNX, and honest for mixed precision."""
    if not parameter_count:
        return None
    return round(stored_tensor_bytes * 8 / parameter_count, 4)


@contextlib.contextmanager
def discard_on_error(staged: Staged | None) -> Iterator[None]:
    """Remove a staged output if describing it fails (or is interrupted)."""
    try:
        yield
    except BaseException:
        if staged is not None:
            staged.discard()
        raise
