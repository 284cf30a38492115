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

import contextlib
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmops.converters.base import ArtifactRecord, ConverterOptions, TargetSpec
from llmops.converters.checkpoint import Checkpoint, open_checkpoint
from llmops.converters.gptq.calibration import Calibration, build_calibration
from llmops.converters.gptq.plan import LayerPlan, choose_group_size, plan_layers
from llmops.errors import LLMOpsError, UsageError

Progress = Callable[[str], None]

# Files that make a folder tokenize and generate like its source; copied verbatim.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
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
    plan: LayerPlan
    calibration: Calibration | None
    quantized_bytes: int
    quantized_params: int
    quantized_modules: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float | None:
        if not self.quantized_params:
            return None
        return round(self.quantized_bytes * 8 / self.quantized_params, 4)


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


def _check_finite(ckpt: Checkpoint) -> None:
    import numpy as np

    for name in ckpt.names():
        if not ckpt.info(name).is_float:
            continue
        x = ckpt.float32(name)
        if not np.isfinite(x).all():
            bad = int(x.size - np.count_nonzero(np.isfinite(x)))
            raise LLMOpsError(f"tensor {name} has {bad} NaN/Inf value(s); refusing to convert "
                              "(pass allow_nonfinite=True to convert anyway)")


def _stage_source(ckpt: Checkpoint, scratch: Path) -> Path:
    """An HF safetensors folder GPTQModel can load, for sources that are not one already.

    Pickled checkpoints are read through the shared weights-only loader and rewritten
    as safetensors, so no loader further down ever unpickles the user's file.
    """
    import numpy as np
    from safetensors.numpy import save_file

    if ckpt.kind == "safetensors" and ckpt.path.is_dir():
        return ckpt.root
    staged = scratch / "source"
    staged.mkdir()
    for f in ckpt.root.iterdir():
        if f.is_file() and (f.name in TOKENIZER_FILES or f.name in ("config.json", "generation_config.json")):
            shutil.copy2(f, staged / f.name)
    tensors = {n: np.ascontiguousarray(ckpt.float32(n)) for n in ckpt.names() if ckpt.info(n).is_float}
    save_file(tensors, str(staged / "model.safetensors"), metadata={"format": "pt"})
    return staged


def _quantized_tensor_stats(folder: Path, bits: int) -> tuple[int, int, int]:
    """(bytes of qweight+qzeros+scales+g_idx, weights they encode, modules) from the safetensors headers."""
    per_module: dict[str, dict[str, tuple[list[int], int]]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            prefix, _, leaf = key.rpartition(".")
            if leaf in ("qweight", "qzeros", "scales", "g_idx"):
                start, end = meta["data_offsets"]
                per_module.setdefault(prefix, {})[leaf] = (meta["shape"], end - start)
    total_bytes = total_params = 0
    for prefix, parts in per_module.items():
        if "qweight" not in parts:
            raise LLMOpsError(f"GPTQ output is incomplete: {prefix} has {sorted(parts)} but no qweight")
        shape, _ = parts["qweight"]
        # qweight packs 32 // bits input rows per int32 word: [in * bits / 32, out]
        in_features = shape[0] * 32 // bits
        total_params += in_features * shape[1]
        total_bytes += sum(nb for _, nb in parts.values())
    return total_bytes, total_params, len(per_module)


def _store_float16(tmp: Path) -> None:
    """Unquantized tensors (embeddings, norms, output head) in float16, and ``dtype`` float16 in config.json.

    Quantization runs in float32 on the CPU for accuracy, so GPTQModel saves the rest of
    the model in float32; GPTQ checkpoints are float16 by convention (vLLM's and TGI's GPTQ
    kernels take float16 activations and read the dtype from config.json), and float32
    would double the size of the embeddings.
    """
    import torch
    from safetensors.torch import load_file, save_file

    for f in sorted(tmp.glob("*.safetensors")):
        tensors = load_file(str(f))
        if not any(t.dtype == torch.float32 for t in tensors.values()):
            continue
        out = {}
        for name, t in tensors.items():
            if t.dtype == torch.float32:
                h = t.to(torch.float16)
                if not torch.isfinite(h).all() and torch.isfinite(t).all():
                    raise LLMOpsError(f"tensor {name} does not fit in float16 (largest magnitude "
                                      f"{float(t.abs().max()):.3g})")
                t = h
            out[name] = t.contiguous()
        save_file(out, str(f), metadata={"format": "pt"})
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "float16"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def _finish_folder(tmp: Path, ckpt: Checkpoint) -> None:
    """Source tokenizer and generation config verbatim; drop GPTQModel's transient scratch path from the config."""
    _store_float16(tmp)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        src = ckpt.root / name
        if src.is_file():
            shutil.copyfile(src, tmp / name)
    for name in ("config.json", "quantize_config.json"):
        p = tmp / name
        if not p.is_file():
            continue
        data = json.loads(p.read_text(encoding="utf-8"))
        qc = data.get("quantization_config", data) if name == "config.json" else data
        meta = qc.get("meta") if isinstance(qc, dict) else None
        if isinstance(meta, dict):
            meta.pop("offload_to_disk_path", None)
        p.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _check_output(tmp: Path, bits: int, group: int) -> None:
    try:
        cfg = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LLMOpsError(f"GPTQModel wrote no readable config.json ({e})") from None
    qc = cfg.get("quantization_config") or {}
    got = (qc.get("quant_method"), qc.get("checkpoint_format") or qc.get("format"), qc.get("bits"),
           qc.get("group_size"))
    if got != ("gptq", "gptq", bits, group):
        raise LLMOpsError(f"GPTQModel wrote an unexpected quantization_config {got}; expected "
                          f"('gptq', 'gptq', {bits}, {group})")


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``; a previous GPTQ output at ``dest`` is moved aside first, then removed."""
    old: Path | None = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        old.rmdir()
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


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
) -> GPTQResult:
    """Quantize ``ckpt`` to GPTQ ``bits`` and write it atomically; see the module docstring."""
    say = progress or (lambda _m: None)
    if bits not in (4, 8):
        raise UsageError(f"GPTQ bits must be 4 or 8, got {bits}")
    method = str(options.get("method") or "gptq").lower()
    if method not in METHODS:
        raise UsageError(f"GPTQ method must be one of {', '.join(METHODS)}, got {method!r}")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"device must be cpu or cuda, got {device!r}")
    act_order = _bool_option(options, "act_order", False)
    sym = _bool_option(options, "sym", True)
    damp = _damp_option(options)
    if ckpt.config.get("quantization_config"):
        raise LLMOpsError(f"{ckpt.path}: already quantized ({ckpt.config['quantization_config'].get('quant_method')})"
                          "; convert from the original checkpoint")

    plan = plan_layers(ckpt.root, ckpt.config)
    requested = options.get("group_size")
    group = choose_group_size(requested, plan.widths, say)
    if not allow_nonfinite:
        _check_finite(ckpt)
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
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    except OSError as e:
        raise LLMOpsError(f"cannot write to {dest.parent}: {e.strerror or e}") from None
    scratch: Path | None = None
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".work", dir=dest.parent))
        src_dir = _stage_source(ckpt, scratch)
        job: dict[str, Any] = {
            "source": str(src_dir), "output": str(tmp), "scratch": str(scratch), "bits": bits,
            "group_size": group, "act_order": act_order, "sym": sym, "damp": damp, "method": method,
            "device": device, "threads": threads, "model_type": plan.model_type,
            "architecture": plan.architecture, "n_layers": plan.n_layers, "modules_per_layer": len(plan.widths),
        }
        if calib is not None:
            (scratch / "calibration.json").write_text(json.dumps(calib.samples))
            job["calibration"] = str(scratch / "calibration.json")
        reply = _run_worker(job, scratch, say)
        damp_used = reply.get("damp")
        worker_rss = reply.get("peak_rss_bytes")
        _finish_folder(tmp, ckpt)
        _check_output(tmp, bits, group)
        q_bytes, q_params, q_modules = _quantized_tensor_stats(tmp, bits)
        expected = plan.n_layers * len(plan.widths)
        if q_modules != expected:
            raise LLMOpsError(f"GPTQModel quantized {q_modules} modules, expected {expected} "
                              f"({plan.n_layers} layers x {len(plan.widths)})")
        os.chmod(tmp, 0o777 & ~_umask())
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    say(f"wrote {dest} in {time.perf_counter() - t0:.1f}s")
    return GPTQResult(path=dest, bits=bits, group_size=group,
                      requested_group_size=128 if requested is None else int(requested), act_order=act_order,
                      sym=sym, damp=damp_used, method=method, plan=plan, calibration=calib,
                      quantized_bytes=q_bytes, quantized_params=q_params, quantized_modules=q_modules,
                      extra={"worker_peak_rss_bytes": worker_rss})


def _run_worker(job: dict[str, Any], scratch: Path, say: Progress) -> dict[str, Any]:
    """Run ``worker.py`` in a child interpreter; relay its progress lines; any failure is one line.

    On any exception here (the progress callback raising, Ctrl-C) the child is killed
    before the exception propagates, so nothing keeps writing into folders the caller
    is about to remove.
    """
    import collections
    import subprocess
    import sys

    from llmops.converters.gptq.worker import MARK

    job = {**job, "reply": str(scratch / "reply.json")}
    job_file = scratch / "job.json"
    job_file.write_text(json.dumps(job))
    code = "import sys; from llmops.converters.gptq.worker import main; main(sys.argv[1])"
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with open(scratch / "gptqmodel.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code, str(job_file)], cwd=scratch, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith(MARK):
                    say(line[len(MARK):])
                else:
                    log.write(raw)
                    if line.strip():
                        tail.append(line.split("\r")[-1].strip())
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if proc.stderr is not None:
                proc.stderr.close()
    reply_file = Path(job["reply"])
    if reply_file.is_file():
        reply = json.loads(reply_file.read_text())
        if not reply.get("ok"):
            raise LLMOpsError(str(reply.get("error") or "GPTQ quantization failed"))
        return reply
    from llmops.benchmarks.logits import child_exit_reason

    raise LLMOpsError(f"GPTQ quantization {child_exit_reason(rc, list(tail))}")


class GPTQConverter(ConverterOptions):
    """The GPTQ implementation of the converter interface (``base.Converter``).

    ``bits_per_weight`` in the record is the *effective* rate of the quantized
    layers: all bytes stored for them (packed weights, scales, zero points and the
    group index) times 8, over the number of weights they encode. Embeddings, norms
    and the output head stay in floating point and are not counted.
    """

    format = "gptq"

    def convert(self, source: Any, target: TargetSpec, output: Path | None, progress: Progress) -> ArtifactRecord:
        from llmops.converters.api import tool_versions
        from llmops.hashing import sha256_path, size_of

        ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
        bits = int(target.options.get("bits") or int(target.quant.removesuffix("bit")))
        t0 = time.perf_counter()
        res = convert_to_gptq(ckpt, bits, output, target.options, allow_nonfinite=self.allow_nonfinite,
                              threads=self.threads, device=self.device, progress=progress)
        seconds = time.perf_counter() - t0
        worker_rss = res.extra.get("worker_peak_rss_bytes")
        versions = tool_versions()
        versions.update(_versions("gptqmodel", "optimum"))
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
                "architecture": res.plan.architecture,
                "model_type": res.plan.model_type,
                "quantized_modules": res.quantized_modules,
                "quantized_parameters": res.quantized_params,
                "calibration": res.calibration.record() if res.calibration else None,
                "allow_nonfinite": self.allow_nonfinite,
                "threads": self.threads,
                "device": self.device,
                "quantizer_peak_rss_bytes": worker_rss,
            },
            tool_versions=versions,
        )


def _versions(*dists: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for d in dists:
        with contextlib.suppress(PackageNotFoundError):
            out[d] = version(d)
    return out
