"""The GGUF implementation of the converter interface."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmops.converters.base import ArtifactRecord, ConverterOptions, TargetSpec, bits_per_weight
from llmops.core.toolversions import tool_versions


class GGUFConverter(ConverterOptions):
    """The GGUF implementation of the converter interface (``base.Converter``).

    Conversion runs on the CPU whatever ``device`` says; the device applies to verification."""

    format = "gguf"

    def convert(self, source: Any, target: TargetSpec, output: Path | None, progress: Callable[[str], None]) -> Any:
        from llmops.converters.gguf import tokenizer_facts

        # a checkpoint folder's tokenizer is read in a child from here on, while this process
        # imports numpy and the converter and plans the tensors: on a small model its reading
        # is a fifth of the whole conversion
        self._pending = None
        if isinstance(source, (str, os.PathLike)):
            self._pending = tokenizer_facts.start(os.path.join(source, "tokenizer.json"))
        try:
            return super().convert(source, target, output, progress)
        finally:
            if self._pending is not None:
                self._pending.close()
            self._pending = None

    def write(self, ckpt: Any, target: TargetSpec, output: Path | None, progress: Callable[[str], None]) -> Any:
        from llmops.converters.gguf import tokenizer_facts

        pending = getattr(self, "_pending", None)
        mine = None
        if pending is None or Path(pending.path).resolve() != (ckpt.root / "tokenizer.json").resolve():
            pending = mine = tokenizer_facts.start(str(ckpt.root / "tokenizer.json"))
        try:
            from llmops.converters.gguf.convert import convert_to_gguf

            imatrix = None
            if target.options.get("imatrix"):  # the module only when asked for (a small conversion's 1 %)
                from llmops.converters.gguf.imatrix import request_from_options

                imatrix = request_from_options(target.options)
            return convert_to_gguf(ckpt, target.quant, output, allow_nonfinite=self.allow_nonfinite, commit=False,
                                   threads=self.threads, progress=progress, imatrix=imatrix,
                                   tokenizer_facts=pending)
        finally:
            if mine is not None:
                mine.close()

    def describe(self, ckpt: Any, target: TargetSpec, res: Any, seconds: float) -> ArtifactRecord:
        from llmops.core.hashing import sha256_file

        return ArtifactRecord(
            output=res.path,
            format="gguf",
            quant=res.quant,
            sha256=res.sha256 or sha256_file(res.path),
            size_bytes=res.path.stat().st_size,
            seconds=seconds,
            bits_per_weight=bits_per_weight(res.data_bytes, res.parameters),
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
                **({"imatrix": res.extra["imatrix"]} if res.extra.get("imatrix") else {}),
            },
            tool_versions=tool_versions(),
            tensors=res.tensors,
            staged=res.staged,
        )
