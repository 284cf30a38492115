"""The library entry point: ``convert(source, target, ...)`` -> ArtifactRecord.

The CLI (``llmops convert``) calls :func:`parse_target` to validate ``--to`` and the
application layer's ``convert`` (which adds verification) to do the work; registering
the result is the application layer's business too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmops.converters.base import ArtifactRecord, TargetSpec
from llmops.converters.targets import parse_target, valid_targets
from llmops.core import plugins
from llmops.core.errors import NotAvailable
from llmops.core.progress import as_reporter

__all__ = ["convert", "parse_target", "valid_targets", "converter_for", "CONVERTERS"]

# format -> "module:Class" implementing base.Converter; imported only when used.
CONVERTERS: dict[str, str] = {
    "gguf": "llmops.converters.gguf.converter:GGUFConverter",
    "onnx": "llmops.converters.onnx.convert:OnnxConverter",
    "gptq": "llmops.converters.gptq.convert:GPTQConverter",
}


def converter_for(fmt: str, **kwargs: Any) -> Any:
    msg = "conversion to {key} is not available in this version"
    return plugins.load(CONVERTERS, fmt, unknown=msg, unavailable=msg, error=NotAvailable)(**kwargs)


def convert(
    source: str | Path,
    target: str | TargetSpec,
    output: str | Path | None = None,
    *,
    commit: bool = True,
    allow_nonfinite: bool = False,
    threads: int | None = None,
    device: str = "cpu",
    options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ArtifactRecord:
    """Convert a checkpoint to ``target`` (e.g. ``"gguf-q4"``) and describe the result.

    ``output``: a file path, a folder (a GGUF is named ``<Name>-<Size>-<QUANT>.gguf``
    inside it) or None (the conventional name in the current folder). The output is
    written under a temporary name; with ``commit`` (the default) it is renamed into place
    before returning, else the record is *staged* (``record.output`` is the temporary copy)
    and the caller checks it, then calls ``record.commit()`` or ``record.discard()``.
    ``options`` go to the converter with the target (GPTQ's calibration data, group
    size, ...). ``progress``: a plain callable (every message, each phase's start and end and its
    per-item lines) or a reporter (``llmops.core.progress``) that shows phases as it likes.
    """
    from llmops.core.procfs import PeakRSS

    spec = parse_target(target) if isinstance(target, str) else target
    if options:
        spec = TargetSpec(spec.format, spec.quant, {**spec.options, **options})
    say = as_reporter(progress)
    converter = converter_for(spec.format, allow_nonfinite=allow_nonfinite, threads=threads, device=device)
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        record = converter.convert(source, spec, Path(output) if output is not None else None, say)
    try:
        record.seconds = time.perf_counter() - t0
        # A converter that quantizes in a child process reports that child's peak itself.
        record.peak_rss_bytes = max(record.peak_rss_bytes or 0, mem.peak)
        if commit:
            record.commit()
    except BaseException:
        record.discard()
        raise
    return record
