"""The library entry point: ``convert(source, target, ...)`` -> ArtifactRecord.

The CLI (``llmops convert``) calls :func:`parse_target` to validate ``--to`` and
:func:`convert` to do the work; registering the result is the CLI's business.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmops.converters.base import ArtifactRecord, TargetSpec
from llmops.converters.targets import parse_target, valid_targets
from llmops.errors import LLMOpsError, NotAvailable

__all__ = ["convert", "parse_target", "valid_targets", "tool_versions", "GGUFConverter"]

VERIFY_CHUNKS = 4


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for key, dist in (("llmops", "llmops"), ("gguf", "gguf"), ("llama_cpp", "llama-cpp-python"),
                      ("torch", "torch"), ("transformers", "transformers"), ("numpy", "numpy")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            pass
    return out


class GGUFConverter:
    """The GGUF implementation of the converter interface (``base.Converter``)."""

    format = "gguf"

    def __init__(self, *, allow_nonfinite: bool = False, threads: int | None = None) -> None:
        self.allow_nonfinite = allow_nonfinite
        self.threads = threads

    def convert(self, source: Any, target: TargetSpec, output: Path | None,
                progress: Callable[[str], None]) -> ArtifactRecord:
        from llmops.converters.checkpoint import Checkpoint, open_checkpoint
        from llmops.converters.gguf.convert import convert_to_gguf
        from llmops.hashing import sha256_file

        ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
        t0 = time.perf_counter()
        res = convert_to_gguf(ckpt, target.quant, output, allow_nonfinite=self.allow_nonfinite,
                              threads=self.threads, progress=progress)
        seconds = time.perf_counter() - t0
        size = res.path.stat().st_size
        return ArtifactRecord(
            output=res.path,
            format="gguf",
            quant=res.quant,
            sha256=res.sha256 or sha256_file(res.path),
            size_bytes=size,
            seconds=seconds,
            bits_per_weight=round(res.data_bytes * 8 / res.parameters, 4) if res.parameters else None,
            parameters={
                "source": str(ckpt.path),
                "target": target.options.get("target", f"gguf-{res.quant.lower()}"),
                "architecture": res.hf_arch,
                "gguf_architecture": res.arch,
                "parameter_count": res.parameters,
                "model_name": res.name,
                "size_label": res.size_label,
                "tensor_types": dict(Counter(res.tensor_types.values())),
                "tokenizer": res.vocab,
                "one_pass": res.one_pass,
                "allow_nonfinite": self.allow_nonfinite,
                "threads": self.threads,
            },
            tool_versions=tool_versions(),
        )


def convert(
    source: str | Path,
    target: str,
    output: str | Path | None = None,
    *,
    verify: bool = True,
    eval_text: str | None = None,
    allow_nonfinite: bool = False,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> ArtifactRecord:
    """Convert a checkpoint to ``target`` (e.g. ``"gguf-q4"``) and describe the result.

    ``output``: a file path, a folder (the file is named ``<Name>-<Size>-<QUANT>.gguf``
    inside it) or None (that name in the current folder). The output is written
    atomically. With ``verify``, the artifact is compared with the source on
    ``eval_text`` (default: wikitext-2 via ``llmops.evaltext``), 4 chunks of 512
    tokens: KL-divergence, top-1 agreement and both perplexities.
    """
    from llmops.benchmarks.metrics import PeakRSS

    spec = parse_target(target) if isinstance(target, str) else target
    if spec.format != "gguf":
        raise NotAvailable(f"conversion to {spec.format} is not available in this version")
    say = progress or (lambda _m: None)
    if verify and eval_text is None:
        try:
            from llmops.evaltext import load_eval_text
        except ImportError:
            raise LLMOpsError("verification needs an eval text; pass eval_text or verify=False") from None
        eval_text = load_eval_text(progress=say).text
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        record = GGUFConverter(allow_nonfinite=allow_nonfinite, threads=threads).convert(
            source, spec, Path(output) if output is not None else None, say)
    record.seconds = time.perf_counter() - t0
    record.peak_rss_bytes = mem.peak
    if verify:
        from llmops.benchmarks.accuracy import evaluate_gguf

        res = evaluate_gguf(record.output, eval_text or "", source=source, chunks=VERIFY_CHUNKS,
                            threads=threads or os.cpu_count(), progress=say)
        record.verification = {k: res[k] for k in ("kld", "top1_agreement", "ppl_source", "ppl_output")}
        record.parameters["verification"] = {"chunks": res["chunks"], "n_ctx": res["n_ctx"],
                                             "tokens": res["tokens"], "kld_p99": res["kld_p99"]}
    return record
