"""Checkpoint -> GPTQ (the Hugging Face layout transformers, vLLM and TGI load), through GPTQModel 7.6.

The pipeline, and why each step is where it is:

1. The checkpoint is opened with the shared safe loader (config checks, header
   checks, pickles refused unless weights-only) and everything that can be refused
   is refused before a file is written: the architecture (GPTQModel must have a
   definition for it), the group size (see ``plan.py``), non-finite weights, and
   the calibration text.
2. Calibration tokens are cut from a user file or from the tail of the eval text
   that evaluation never scores (``calibration.py``); exactly what was used goes
   into ``parameters["calibration"]``.
3. GPTQModel quantizes layer by layer on the CPU (float32 activations) or on CUDA,
   in a child interpreter (``worker.py``; ``runtime.py`` says why) whose per-module
   results come back as one progress line per layer.
4. The result is written to a temporary folder beside the destination, its
   unquantized tensors stored in float16 (the GPTQ convention), completed with the
   source's own tokenizer files and generation config (so the artifact tokenizes
   exactly like its source), checked, and renamed into place. Any
   exception, Ctrl-C included, removes the temporary folder.

Output naming: ``output=None`` gives ``./<source-name>-GPTQ-<bits>bit-g<group>``
(``-gchannel`` for group size -1). As for GGUF, an existing folder (or a path
ending in a separator) is a parent to put that name in, except a folder that is
itself a GPTQ output: that one is the destination and is replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmops.converters.base import ArtifactRecord, ConverterOptions, TargetSpec, bits_per_weight, finish, tensor_lines
from llmops.core.atomic import Staged, staged_folder
from llmops.core.toolversions import tool_versions
from llmops.core.checkpoint import Checkpoint
from llmops.core.tensorfiles import read_safetensors_header
from llmops.converters.gptq.calibration import Calibration, build_calibration
from llmops.converters.gptq.layout import (TOKENIZER_FILES, check_output, finish_folder, quantized_tensor_stats,
                                           unquantized_module_stats)
from llmops.converters.gptq.plan import LayerPlan, choose_group_size, plan_layers
from llmops.core.errors import LLMOpsError, UsageError
from llmops.core.progress import as_reporter

Progress = Callable[[str], None]

METHODS = ("gptq", "rtn")


@dataclass
class GPTQResult:
    path: Path
    bits: int
    group_size: int
    requested_group_size: int
    act_order: bool
    sym: bool
    damp: float | None
    method: str
    mse: float
    plan: LayerPlan
    calibration: Calibration | None
    quantized_bytes: int
    quantized_params: int
    quantized_modules: int
    foem: float = 0.0
    gptaq: float = 0.0
    kept_modules: list[str] = field(default_factory=list)  # decoder linear modules left in float16
    kept_bytes: int = 0
    kept_params: int = 0
    stored_bytes: int = 0  # every tensor in the output, quantized or not
    parameter_count: int = 0  # of the source checkpoint
    staged: Staged | None = None  # the output, written but not yet renamed into place
    tensors: list[dict[str, Any]] = field(default_factory=list)  # name, shape, safetensors dtype, bytes
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float | None:
        """The one definition for every format (``converters.base.bits_per_weight``)."""
        return bits_per_weight(self.stored_bytes, self.parameter_count)

    @property
    def quantized_bits_per_weight(self) -> float | None:
        """The rate of the quantized layers alone: packed weights, scales, zero points and group
        index over the weights they encode (what GPTQ papers quote)."""
        if not self.quantized_params:
            return None
        return round(self.quantized_bytes * 8 / self.quantized_params, 4)

    @property
    def linear_bits_per_weight(self) -> float | None:
        """The rate of every decoder linear module, the quantized and those kept in float16: the
        honest figure for a mixed result (equal to ``quantized_bits_per_weight`` when none is kept)."""
        params = self.quantized_params + self.kept_params
        if not params:
            return None
        return round((self.quantized_bytes + self.kept_bytes) * 8 / params, 4)


def _bool_option(options: dict[str, Any], key: str, default: bool) -> bool:
    v = options.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise UsageError(f"GPTQ option {key} must be true or false, got {v!r}")
    return v


def _damp_option(options: dict[str, Any]) -> float | None:
    v = options.get("damp")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < float(v) < 1:
        raise UsageError(f"GPTQ option damp must be a number between 0 and 1, got {v!r}")
    return float(v)


# The norm GPTQ's scale search minimises (the GPTQ paper's 2.4): each group's scale is shrunk in
# steps from the full range towards 20 % of it, keeping the one whose rounding error has the
# smallest p-norm. On SmolLM2 it lowers the 4-bit KLD by 13 % at no cost in size.
DEFAULT_MSE = 2.4


def _number_option(options: dict[str, Any], key: str, default: float, high: float, meaning: str) -> float:
    """A number from 0 to ``high`` (``meaning``: what 0 does), or ``default`` when not given."""
    v = options.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= float(v) <= high:
        raise UsageError(f"GPTQ option {key} must be a number from 0 ({meaning}) to {high:g}, got {v!r}")
    return float(v)


def _mse_option(options: dict[str, Any]) -> float:
    return _number_option(options, "mse", DEFAULT_MSE, 10, "no scale search")


# FOEM's beta (GPTQModel's ``FOEMConfig``): 0 is plain GPTQ.
DEFAULT_FOEM = 0.0


def source_name(ckpt: Checkpoint) -> str:
    return ckpt.root.name if ckpt.path.is_dir() else ckpt.path.stem


def default_output_name(name: str, bits: int, group: int) -> str:
    return f"{name}-GPTQ-{bits}bit-" + (f"g{group}" if group > 0 else "gchannel")


def is_gptq_folder(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "gptq"


def resolve_destination(output: Path | None, name: str) -> Path:
    if output is None:
        return (Path.cwd() / name).absolute()
    dest = Path(output).expanduser()
    if dest.is_file():
        raise LLMOpsError(f"{dest} is a file; a GPTQ output is a folder")
    if (dest.is_dir() and not is_gptq_folder(dest)) or str(output).endswith(("/", os.sep)):
        dest = dest / name
    dest = dest.absolute()
    if dest.exists() and not (dest.is_dir() and is_gptq_folder(dest)):
        raise LLMOpsError(f"{dest} exists and is not a GPTQ folder; refusing to replace it")
    return dest


def _stage_source(ckpt: Checkpoint, scratch: Path) -> Path:
    """An HF safetensors folder GPTQModel can load (float32 weights for what is not one already)."""
    return ckpt.as_safetensors_folder(scratch / "source", (*TOKENIZER_FILES, "config.json", "generation_config.json"),
                                      float32=True)


def convert_to_gptq(
    ckpt: Checkpoint,
    bits: int,
    output: Path | None,
    options: dict[str, Any],
    *,
    allow_nonfinite: bool = False,
    threads: int | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
    commit: bool = True,
) -> GPTQResult:
    """Quantize ``ckpt`` to GPTQ ``bits`` and write it atomically; see the module docstring.
    ``progress``: a plain callable or a reporter (``llmops.core.progress``); the calibration
    samples and the layers quantized (in the worker) are its phases."""
    say = as_reporter(progress)
    if bits not in (4, 8):
        raise UsageError(f"GPTQ bits must be 4 or 8, got {bits}")
    method = str(options.get("method") or "gptq").lower()
    if method not in METHODS:
        raise UsageError(f"GPTQ method must be one of {', '.join(METHODS)}, got {method!r}")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"device must be cpu or cuda, got {device!r}")
    act_order = _bool_option(options, "act_order", False)
    keep_outliers = method == "gptq" and _bool_option(options, "keep_outliers", True)
    mse = _mse_option(options) if method == "gptq" else 0.0
    # Asymmetric by default: the GPTQ layout stores a zero point per group whether or not it is
    # used, so an asymmetric grid costs no byte more; on SmolLM2 (g64) it lowers the KLD from 0.149 to 0.116.
    sym = _bool_option(options, "sym", False)
    foem = _number_option(options, "foem", DEFAULT_FOEM, 1, "off") if method == "gptq" else 0.0
    gptaq = _number_option(options, "gptaq", 0.0, 1, "off") if method == "gptq" else 0.0
    damp = _damp_option(options)
    if ckpt.config.get("quantization_config"):
        raise LLMOpsError(f"{ckpt.path}: already quantized ({ckpt.config['quantization_config'].get('quant_method')})"
                          "; convert from the original checkpoint")

    plan = plan_layers(ckpt.root, ckpt.config)
    requested = options.get("group_size")
    group = choose_group_size(requested, plan.widths, say)
    if not allow_nonfinite:
        ckpt.check_finite()
    calib: Calibration | None = None
    if method == "gptq":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ckpt.root)
        calib = build_calibration(tokenizer, options, say)
    dest = resolve_destination(output, default_output_name(source_name(ckpt), bits, group))
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise LLMOpsError("--device cuda: no CUDA device is available to this process")

    what = (f"{len(calib.samples)}x{calib.tokens_per_sample} calibration tokens ({calib.source})"
            if calib else "round-to-nearest, no calibration")
    say(f"quantizing {ckpt.path} ({plan.architecture}) to GPTQ {bits}-bit, group size {group}, "
        f"{plan.n_layers} layers x {len(plan.widths)} linear modules, {what} on {device} -> {dest}")
    t0 = time.perf_counter()
    with staged_folder(dest) as (staged, work):
        tmp = staged.tmp
        scratch = work / "scratch"
        scratch.mkdir()
        try:
            src_dir = _stage_source(ckpt, scratch)
            job: dict[str, Any] = {
                "source": str(src_dir), "output": str(tmp), "scratch": str(scratch), "bits": bits,
                "group_size": group, "act_order": act_order, "sym": sym, "damp": damp, "method": method,
                "device": device, "threads": threads, "model_type": plan.model_type,
                "architecture": plan.architecture, "n_layers": plan.n_layers, "modules_per_layer": len(plan.widths),
                "module_kinds": list(plan.widths), "keep_outliers": keep_outliers,
                "mse": mse, "foem": foem, "gptaq": gptaq,
            }
            if calib is not None:
                (scratch / "calibration.json").write_text(json.dumps(calib.samples))
                job["calibration"] = str(scratch / "calibration.json")
            reply = _run_worker(job, scratch, say)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        damp_used = reply.get("damp")
        worker_rss = reply.get("peak_rss_bytes")
        kept = list(reply.get("kept") or [])
        finish_folder(tmp, ckpt, plan, kept)
        check_output(tmp, bits, group)
        q_bytes, q_params, q_modules = quantized_tensor_stats(tmp, bits)
        kept_bytes, kept_params = unquantized_module_stats(tmp, kept)
        tensors = [{"name": t.name, "shape": list(t.shape), "type": t.dtype, "bytes": t.nbytes}
                   for f in sorted(tmp.glob("*.safetensors")) for t in read_safetensors_header(f)]
        stored_bytes = sum(t["bytes"] for t in tensors)
        expected = plan.n_layers * len(plan.widths) - len(kept)
        if q_modules != expected:
            raise LLMOpsError(f"GPTQModel quantized {q_modules} modules, expected {expected} "
                              f"({plan.n_layers} layers x {len(plan.widths)}, {len(kept)} kept in float16)")
        for line in tensor_lines(tensors):
            say.detail(line)
    say(f"wrote {dest} in {time.perf_counter() - t0:.1f}s")
    result = GPTQResult(path=tmp, staged=staged, stored_bytes=stored_bytes, parameter_count=ckpt.parameter_count(),
                      tensors=tensors,
                      bits=bits, group_size=group,
                      requested_group_size=128 if requested is None else int(requested), act_order=act_order,
                      sym=sym, damp=damp_used, method=method, mse=mse, foem=foem, gptaq=gptaq, plan=plan, calibration=calib,
                      quantized_bytes=q_bytes, quantized_params=q_params, quantized_modules=q_modules,
                      kept_modules=kept, kept_bytes=kept_bytes, kept_params=kept_params,
                      extra={"worker_peak_rss_bytes": worker_rss, "losses": reply.get("losses")})
    return finish(result, commit)


def _run_worker(job: dict[str, Any], scratch: Path, say: Progress) -> dict[str, Any]:
    """Run ``worker.py`` in a child interpreter, relaying its progress; any failure is one line.

    On any exception here (the progress callback raising, Ctrl-C) the child is killed
    before the exception propagates, so nothing keeps writing into folders the caller
    is about to remove."""
    from llmops.core.child import run_child

    return run_child("llmops.converters.gptq.worker:run", job, "GPTQ quantization", scratch, progress=say,
                     log_file=scratch / "gptqmodel.log", prefix_errors=False)


class GPTQConverter(ConverterOptions):
    """The GPTQ implementation of the converter interface (``base.Converter``).

    ``bits_per_weight`` follows the one definition for every format (all stored tensors over
    the source's parameters); ``quantized_bits_per_weight`` in the parameters is the rate of
    the quantized layers alone.
    """

    format = "gptq"

    def write(self, ckpt: Checkpoint, target: TargetSpec, output: Path | None, progress: Progress) -> GPTQResult:
        return convert_to_gptq(ckpt, _bits(target), output, target.options, allow_nonfinite=self.allow_nonfinite,
                               commit=False, threads=self.threads, device=self.device, progress=progress)

    def describe(self, ckpt: Checkpoint, target: TargetSpec, res: GPTQResult, seconds: float) -> ArtifactRecord:
        from llmops.core.hashing import sha256_path, size_of

        bits = _bits(target)

        worker_rss = res.extra.get("worker_peak_rss_bytes")
        versions = tool_versions("gptqmodel", "optimum")
        return ArtifactRecord(
            output=res.path,
            format="gptq",
            quant=f"{bits}bit",
            sha256=sha256_path(res.path),
            size_bytes=size_of(res.path),
            seconds=seconds,
            peak_rss_bytes=worker_rss,
            bits_per_weight=res.bits_per_weight,
            parameters={
                "source": str(ckpt.path),
                "target": target.options.get("target", f"gptq-{bits}bit"),
                "method": res.method,
                "bits": bits,
                "group_size": res.group_size,
                "requested_group_size": res.requested_group_size,
                "act_order": res.act_order,
                "sym": res.sym,
                "damp": res.damp,
                "mse": res.mse,
                "foem": res.foem,
                "gptaq": res.gptaq,
                "architecture": res.plan.architecture,
                "model_type": res.plan.model_type,
                "quantized_modules": res.quantized_modules,
                "quantized_parameters": res.quantized_params,
                "calibration": res.calibration.record() if res.calibration else None,
                "allow_nonfinite": self.allow_nonfinite,
                "threads": self.threads,
                "device": self.device,
                "quantizer_peak_rss_bytes": worker_rss,
                "quantized_bits_per_weight": res.quantized_bits_per_weight,
                "keep_outliers": bool(target.options.get("keep_outliers", True)) and res.method == "gptq",
                "float16_modules": res.kept_modules,
                "linear_bits_per_weight": res.linear_bits_per_weight,
            },
            tool_versions=versions,
            tensors=res.tensors,
            staged=res.staged,
        )


def _bits(target: TargetSpec) -> int:
    return int(target.options.get("bits") or int(target.quant.removesuffix("bit")))
