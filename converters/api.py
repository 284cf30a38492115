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

from llmops.converters.base import ArtifactRecord, ConverterOptions, TargetSpec
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


class GGUFConverter(ConverterOptions):
    """The GGUF implementation of the converter interface (``base.Converter``).

    Conversion runs on the CPU whatever ``device`` says; the device applies to verification."""

    format = "gguf"

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


# format -> "module:Class" implementing base.Converter; imported only when used.
CONVERTERS: dict[str, str] = {
    "gguf": "llmops.converters.api:GGUFConverter",
    "onnx": "llmops.converters.onnx.convert:OnnxConverter",
    "gptq": "llmops.converters.gptq.convert:GPTQConverter",
}


def converter_for(fmt: str, **kwargs: Any) -> Any:
    import importlib

    target = CONVERTERS.get(fmt)
    if target is None:
        raise NotAvailable(f"conversion to {fmt} is not available in this version")
    module, _, cls = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        raise NotAvailable(f"conversion to {fmt} is not available in this version") from None
    return factory(**kwargs)


def convert(
    source: str | Path,
    target: str | TargetSpec,
    output: str | Path | None = None,
    *,
    verify: bool = True,
    eval_text: str | None = None,
    allow_nonfinite: bool = False,
    threads: int | None = None,
    device: str = "cpu",
    options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ArtifactRecord:
    """Convert a checkpoint to ``target`` (e.g. ``"gguf-q4"``) and describe the result.

    ``output``: a file path, a folder (a GGUF is named ``<Name>-<Size>-<QUANT>.gguf``
    inside it) or None (the conventional name in the current folder). The output is
    written atomically. ``options`` go to the converter with the target (GPTQ's
    calibration data, group size, ...). With ``verify``, the artifact is compared with
    the source on ``eval_text`` (default: wikitext-2 via ``llmops.evaltext``), 4 chunks
    of 512 tokens, by the same evaluation ``llmops bench`` uses: KL-divergence, top-1
    agreement and both perplexities. An artifact whose verification fails is removed.
    """
    import shutil

    from llmops.benchmarks.metrics import PeakRSS

    spec = parse_target(target) if isinstance(target, str) else target
    if options:
        spec = TargetSpec(spec.format, spec.quant, {**spec.options, **options})
    say = progress or (lambda _m: None)
    converter = converter_for(spec.format, allow_nonfinite=allow_nonfinite, threads=threads, device=device)
    if verify and eval_text is None:
        from llmops.evaltext import load_eval_text

        eval_text = load_eval_text(progress=say).text
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        record = converter.convert(source, spec, Path(output) if output is not None else None, say)
    record.seconds = time.perf_counter() - t0
    # A converter that quantizes in a child process reports that child's peak itself.
    record.peak_rss_bytes = max(record.peak_rss_bytes or 0, mem.peak)
    if verify:
        from llmops.benchmarks.accuracy import evaluate

        try:
            res = evaluate(record.output, eval_text or "", source=source, chunks=VERIFY_CHUNKS,
                           threads=threads or os.cpu_count(), device=device, progress=say)
        except BaseException:
            # An artifact that could not be verified is not handed out: the user can
            # convert again with --no-verify to keep it unchecked.
            if record.output.is_dir():
                shutil.rmtree(record.output, ignore_errors=True)
            else:
                record.output.unlink(missing_ok=True)
            raise
        record.verification = {k: res[k] for k in ("kld", "top1_agreement", "ppl_source", "ppl_output")}
        record.parameters["verification"] = {"chunks": res["chunks"], "n_ctx": res["n_ctx"],
                                             "tokens": res["tokens"], "kld_p99": res["kld_p99"]}
    return record
