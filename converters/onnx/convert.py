"""Checkpoint -> ONNX decoder folder through onnxruntime-genai's model builder.

The model builder (``onnxruntime_genai.models.builder``) is the reference exporter for
decoder-only models: it writes one graph with onnxruntime's fused contrib operators
(GroupQueryAttention with rotary embeddings inside, SkipSimplifiedLayerNormalization,
MatMulNBits for quantized weights), the external-data file, ``genai_config.json`` and
the tokenizer, which is what both ``onnxruntime_genai`` and a plain
``onnxruntime.InferenceSession`` need. Writing our own exporter would only lose those
fusions, so this module is a careful wrapper around it:

* everything that can be refused (config, safetensors headers, architecture, precision
  on the chosen execution provider, options, non-finite weights) is checked before any
  file is written, with one-line errors;
* the builder runs in-process as a library call (``parse_extra_options`` +
  ``create_model``, what its command line does), with its ``print`` output sent to the
  progress callback (stdout is reserved for ``--json``) and its Hugging Face cache in a
  temporary folder;
* the output is built in a temporary folder beside the destination and renamed into
  place at the end; any exception, KeyboardInterrupt included, removes it.

Precisions (``--to``): ``onnx`` = fp32, ``onnx-fp16``, ``onnx-int8`` and ``onnx-int4``.
int8 and int4 are the builder's own weight-only quantization (MatMulNBits with 8 or 4
bits, blockwise symmetric round-to-nearest, block size ``block_size``), not
onnxruntime.quantization's dynamic int8 quantizer: onnxruntime-genai 0.18 offers int8
on CPU and CUDA, and MatMulNBits keeps the same graph (and the same genai runtime path)
as int4. ``onnx-int4`` follows a recipe (``onnx-int4:RECIPE``, ``targets.RECIPES``) that
keeps the matrices 4 bits hurt most at 8 bits; ``onnx-int4:rtn`` is the builder's plain
default, byte for byte.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmops.converters.base import ArtifactRecord, ConverterOptions, TargetSpec, bits_per_weight, finish, tensor_lines
from llmops.converters.naming import model_metadata, output_stem
from llmops.converters.onnx.builder import builder_input, copy_chat_template, inspect_model, run_builder
from llmops.converters.onnx.checks import (PROVIDERS, architecture_of, builder_options, check_finite, int4_recipe,
                                           recipe_target_options)
from llmops.converters.onnx.targets import TARGETS
from llmops.core.atomic import Staged, staged_folder
from llmops.core.checkpoint import Checkpoint
from llmops.core.errors import LLMOpsError, UsageError
from llmops.core.genai_config import check_folder
from llmops.core.progress import as_reporter
from llmops.core.toolversions import tool_versions

Progress = Callable[[str], None]


@dataclass
class OnnxResult:
    path: Path
    precision: str
    execution_provider: str
    architecture: str
    parameter_count: int
    weight_bytes: int  # bytes of all initializers (external data + inline)
    opset: dict[str, int]
    op_types: dict[str, int]
    builder_options: dict[str, str]
    name: str
    recipe: dict[str, Any] | None  # the int4 recipe (targets.Int4Recipe.parameters), None for other precisions
    target_options: dict[str, Any] | None  # the builder's structured options the recipe asked for
    size_label: str | None
    files: list[str] = field(default_factory=list)
    genai: dict[str, Any] = field(default_factory=dict)
    tensors: list[dict[str, Any]] = field(default_factory=list)  # the initializers: name, shape, ONNX type, bytes
    staged: Staged | None = None  # the output, written but not yet renamed into place


# ----------------------------------------------------------------------------------------------
# naming and output placement


def model_name(ckpt: Checkpoint) -> tuple[str, str | None, str | None, str | None, str | None]:
    """(name, basename, finetune, version, size label) as the GGUF converter derives them."""
    md = model_metadata(ckpt)
    return str(md.name), md.basename, md.finetune, md.version, md.size_label


def default_output_name(ckpt: Checkpoint, target: str) -> str:
    """``SmolLM2-135M-Instruct-onnx-int4``: GGUF's naming convention with the --to value as the suffix."""
    return output_stem(model_metadata(ckpt), None) + f"-{target}"


def is_onnx_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "genai_config.json").is_file() or any(path.glob("*.onnx")))


def resolve_output(ckpt: Checkpoint, target: str, output: str | os.PathLike[str] | None) -> Path:
    """Where the folder goes: ``output`` itself, or the default name inside ``output`` when that is
    an existing folder that is not an ONNX model (as a GGUF goes inside a folder), or the default
    name in the current folder. An existing ONNX folder at the destination is replaced."""
    if output is None:
        return (Path.cwd() / default_output_name(ckpt, target)).absolute()
    dest = Path(output).expanduser()
    if str(output).endswith(("/", os.sep)) or (dest.is_dir() and not is_onnx_folder(dest)):
        dest = dest / default_output_name(ckpt, target)
    dest = dest.absolute()
    if dest.exists() and not dest.is_dir():
        raise LLMOpsError(f"{dest} exists and is a file; an ONNX model is a folder")
    return dest


def _layer_count(ckpt: Checkpoint) -> int | None:
    """The decoder layers the builder reads, for its progress phase (None when the config does not say)."""
    cfg = ckpt.config.get("text_config") if isinstance(ckpt.config.get("text_config"), dict) else ckpt.config
    n = cfg.get("num_hidden_layers")
    return n if isinstance(n, int) and n > 0 else None


def convert_to_onnx(
    ckpt: Checkpoint,
    precision: str,
    output: str | os.PathLike[str] | None = None,
    *,
    target: str | None = None,
    device: str = "cpu",
    options: dict[str, Any] | None = None,
    allow_nonfinite: bool = False,
    threads: int | None = None,
    progress: Progress | None = None,
    commit: bool = True,
) -> OnnxResult:
    """Write ``ckpt`` as an ONNX decoder folder at ``precision`` (fp32, fp16, int8, int4) for ``device``.
    ``progress``: a plain callable or a reporter (``llmops.core.progress``); the builder's reading of
    the layers is its phase."""
    say = as_reporter(progress)
    if precision not in PROVIDERS:
        raise UsageError(f"unknown ONNX precision {precision!r}; choose from {', '.join(PROVIDERS)}")
    target = target or next(k for k, v in TARGETS.items() if v == precision)
    arch = architecture_of(ckpt)
    extra = builder_options(precision, device, options or {}, ckpt.config)
    rec = int4_recipe(precision, options or {})
    structured = recipe_target_options(rec, extra, ckpt.config, _layer_count(ckpt))
    if not allow_nonfinite:
        check_finite(ckpt, say)
    name, _, _, _, size_label = model_name(ckpt)
    dest = resolve_output(ckpt, target, output)

    say(f"converting {ckpt.path} ({arch}) to ONNX {precision} for {device} -> {dest}")
    t0 = time.perf_counter()
    with staged_folder(dest) as (staged, work):
        out = staged.tmp
        cache = work / "cache"
        cache.mkdir()
        src = builder_input(ckpt, work, say)
        if rec is not None:
            say(f"int4 recipe {rec.name}: {rec.summary}")
        run_builder(src, out, cache, precision, device, extra, threads, say, layers=_layer_count(ckpt),
                    target_options=structured)
        if not (out / "model.onnx").is_file() or not (out / "genai_config.json").is_file():
            raise LLMOpsError("the ONNX model builder finished without writing model.onnx and genai_config.json")
        copy_chat_template(ckpt.root, out)
        weight_bytes, opset, ops, tensors = inspect_model(out)
        for line in tensor_lines(tensors):
            say.detail(line)
        # what every ONNX load demands of the folder (llmops.core.genai_config): refused here,
        # before the commit, rather than at its first load
        genai = check_folder(out)
        files = sorted(p.name for p in out.iterdir())
        for scratch in (cache, work / "source"):  # only the output waits for its commit
            shutil.rmtree(scratch, ignore_errors=True)
    say(f"wrote {dest} in {time.perf_counter() - t0:.1f}s")
    model = genai.get("model", {})
    result = OnnxResult(
        path=out, staged=staged, precision=precision, execution_provider=device, architecture=arch,
        parameter_count=ckpt.parameter_count(), weight_bytes=weight_bytes, opset=opset, op_types=ops,
        builder_options=extra, name=name, size_label=size_label, files=files, tensors=tensors,
        recipe=rec.parameters() if rec is not None else None, target_options=structured,
        genai={"type": model.get("type"), "context_length": model.get("context_length"),
               "vocab_size": model.get("vocab_size")},
    )
    return finish(result, commit)


def _int8_bytes(tensors: list[dict[str, Any]]) -> int:
    """Bytes of the 8-bit MatMulNBits weights (the builder names them ``*_Q8G<block>`` or ``*_Q8``),
    so a mixed recipe's share of 8-bit blocks is visible beside its bits per weight."""
    return sum(t["bytes"] for t in tensors if "_Q8" in t["name"])


# ----------------------------------------------------------------------------------------------
# the converter interface


class OnnxConverter(ConverterOptions):
    """The ONNX implementation of the converter interface (``base.Converter``).

    ``device`` picks the execution provider the graph is built for (cpu or cuda): the
    builder fuses differently per provider, so a CPU-built folder is what a CPU user runs.
    """

    format = "onnx"

    def write(self, ckpt: Checkpoint, target: TargetSpec, output: Path | None, progress: Progress) -> OnnxResult:
        return convert_to_onnx(ckpt, target.quant, output, target=target.options.get("target"), device=self.device,
                               commit=False, options=target.options, allow_nonfinite=self.allow_nonfinite,
                               threads=self.threads, progress=progress)

    def describe(self, ckpt: Checkpoint, target: TargetSpec, res: OnnxResult, seconds: float) -> ArtifactRecord:
        from llmops.core.hashing import sha256_path, size_of

        return ArtifactRecord(
            output=res.path,
            format="onnx",
            quant=res.precision,
            sha256=sha256_path(res.path),
            size_bytes=size_of(res.path),
            seconds=seconds,
            # every initializer's bytes (quantized weights with their scales, norms, rotary caches)
            # over the source checkpoint's parameter count
            bits_per_weight=bits_per_weight(res.weight_bytes, res.parameter_count),
            parameters={
                "source": str(ckpt.path),
                "target": target.options.get("target", next(k for k, v in TARGETS.items() if v == res.precision)),
                "precision": res.precision,
                "execution_provider": res.execution_provider,
                "architecture": res.architecture,
                "parameter_count": res.parameter_count,
                "model_name": res.name,
                "size_label": res.size_label,
                "opset": res.opset,
                "op_types": res.op_types,
                "block_size": int(res.builder_options["block_size"]) if "block_size" in res.builder_options else None,
                "builder": "onnxruntime_genai.models.builder",
                "builder_options": res.builder_options,
                # flat, so that the registry's parameters (which drop mappings) tell recipes apart
                "recipe": res.recipe["name"] if res.recipe else None,
                "recipe_method": res.recipe["method"] if res.recipe else None,
                "recipe_int8": ",".join(res.recipe["int8"]) if res.recipe and res.recipe["int8"] else None,
                "builder_target_options": res.target_options,
                "int8_bytes": _int8_bytes(res.tensors),
                "weight_bytes": res.weight_bytes,
                "files": res.files,
                "genai": res.genai,
                "allow_nonfinite": self.allow_nonfinite,
                "threads": self.threads,
            },
            tool_versions=tool_versions("onnxruntime", "onnxruntime_genai", "onnx", "onnx_ir"),
            tensors=res.tensors,
            staged=res.staged,
        )
