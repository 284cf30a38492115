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
as int4.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmops.converters.base import ArtifactRecord, ConverterOptions, TargetSpec
from llmops.converters.checkpoint import Checkpoint, open_checkpoint
from llmops.converters.onnx.targets import BLOCK_SIZES, DEFAULT_BLOCK_SIZE, TARGETS
from llmops.errors import LLMOpsError, UsageError

Progress = Callable[[str], None]

# Architectures that both the GGUF converter (converters/gguf/arch_*.py) and the model
# builder of onnxruntime-genai 0.18 (builder.py's create_model dispatch) handle. Phi-3
# with LongRoPE (max_position_embeddings != original_max_position_embeddings) goes to the
# builder's Phi3MiniLongRoPEModel, which it also supports.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
)
_FROM_MODEL_TYPE = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}

# precision -> execution providers it is built for: the builder's own list of valid
# combinations ("FP32 CPU, FP32 CUDA, FP16 CUDA, INT8 CPU, INT8 CUDA, INT4 CPU, INT4 CUDA").
# fp16 for the CPU builds (MultiHeadAttention instead of GroupQueryAttention) and a single
# forward pass runs, but onnxruntime-genai 0.18 fails on its second decoding step ("Shape
# mismatch attempting to re-use buffer" in a Cast onnxruntime inserts for fp16 on the CPU),
# so it is refused rather than handed out half-working.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "fp32": ("cpu", "cuda"),
    "fp16": ("cuda",),
    "int8": ("cpu", "cuda"),
    "int4": ("cpu", "cuda"),
}

# Files of the source folder the builder (through transformers) reads besides the weights.
_SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json",
)

CHUNK_BYTES = 16 << 20  # float32 bytes decoded at once by the finiteness check


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
    size_label: str | None
    files: list[str] = field(default_factory=list)
    genai: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# checks that run before any file is written


def architecture_of(ckpt: Checkpoint) -> str:
    """The Hugging Face class name, or a one-line error naming what is supported."""
    name = ckpt.architecture or _FROM_MODEL_TYPE.get(str(ckpt.config.get("model_type")))
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if name is None:
        raise LLMOpsError(f"{ckpt.root / 'config.json'}: no 'architectures' entry; ONNX conversion supports {supported}")
    if name not in SUPPORTED_ARCHITECTURES:
        raise LLMOpsError(f"architecture {name} is not supported for ONNX conversion; supported: {supported}")
    cfg = ckpt.config
    if name == "Phi3ForCausalLM" and cfg.get("max_position_embeddings") != cfg.get("original_max_position_embeddings"):
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        if kind not in ("longrope", "su"):
            # the builder takes this for a LongRoPE model and fails without its factors
            raise LLMOpsError(f"{ckpt.root / 'config.json'}: a Phi-3 whose max_position_embeddings "
                              f"({cfg.get('max_position_embeddings')}) differs from original_max_position_embeddings "
                              f"({cfg.get('original_max_position_embeddings')}) needs LongRoPE scaling factors "
                              f"(rope type 'longrope', got {kind!r}); the ONNX model builder cannot export it")
    return name


def builder_options(precision: str, device: str, options: dict[str, Any],
                    config: dict[str, Any] | None = None) -> dict[str, str]:
    """The builder's ``--extra_options`` for this target, validated here so that errors are ours."""
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r} for ONNX conversion; choose cpu or cuda")
    if device not in PROVIDERS[precision]:
        raise UsageError(f"onnx-{precision} is built for --device {' or '.join(PROVIDERS[precision])} only "
                         "(onnxruntime-genai cannot decode the model builder's fp16 CPU graph); "
                         "use onnx (fp32), onnx-int8 or onnx-int4 on the CPU")
    out: dict[str, str] = {}
    if precision in ("int4", "int8"):
        bs = options.get("block_size")
        bs = DEFAULT_BLOCK_SIZE if bs is None else bs
        try:
            bs = int(bs)
        except (TypeError, ValueError):
            raise UsageError(f"block size must be an integer, got {bs!r}") from None
        if bs not in BLOCK_SIZES:
            raise UsageError(f"block size {bs} is not supported by MatMulNBits; choose one of "
                             f"{', '.join(map(str, BLOCK_SIZES))}")
        out["block_size"] = str(bs)
        level = options.get("int4_accuracy_level", options.get("accuracy_level"))
        if level is not None:
            if str(level) not in ("0", "1", "2", "3", "4"):
                raise UsageError(f"accuracy level must be 0..4 (1 fp32, 2 fp16, 3 bf16, 4 int8 activations), "
                                 f"got {level!r}")
            out["accuracy_level"] = str(level)
    # the builder's own --extra_options (KEY=VALUE), for what this converter does not expose,
    # e.g. {"algo_config": "k_quant_mixed"}; they are recorded with the artifact
    extra = options.get("extra_options") or {}
    if not isinstance(extra, dict):
        raise UsageError(f"extra_options must be a mapping of the model builder's KEY=VALUE options, got {extra!r}")
    for k, v in extra.items():
        out[str(k)] = str(v).lower() if isinstance(v, bool) else str(v)
    if (config or {}).get("sliding_window") and "windowed_kv_cache" not in out:
        # A windowed cache (a ring of window-size buffers for the sliding-window layers, Gemma 2/3)
        # cannot be fed the empty past that a full-window forward pass needs, so plain onnxruntime
        # could not evaluate the model; full-length caches keep the folder runnable by both
        # runtimes, at the price of more KV memory for long contexts in onnxruntime-genai.
        out["windowed_kv_cache"] = "false"
    return out


def check_finite(ckpt: Checkpoint, say: Progress) -> None:
    """Refuse NaN/Inf weights up front, as the GGUF converter does (the builder would copy them)."""
    say("checking that every weight is finite")
    for name in ckpt.names():
        info = ckpt.info(name)
        if not info.is_float:
            raise LLMOpsError(f"tensor {name} has integer dtype {info.dtype}; quantized checkpoints are not supported")
        rows = info.shape[0] if len(info.shape) >= 1 else 1
        row_elems = int(np.prod(info.shape[1:])) if len(info.shape) > 1 else 1
        step = rows if len(info.shape) < 2 else max(1, CHUNK_BYTES // max(1, row_elems * 4))
        for a in range(0, max(rows, 1), step):
            b = min(rows, a + step)
            whole = len(info.shape) < 2 or (a == 0 and b == rows)
            x = ckpt.float32(name, None if whole else (a, b))
            if not np.isfinite(x).all():
                bad = int(x.size - np.count_nonzero(np.isfinite(x)))
                raise LLMOpsError(f"tensor {name} has {bad} NaN/Inf value(s) in rows {a}..{b - 1}; refusing to "
                                  "convert (pass allow_nonfinite=True to convert anyway)")


# ----------------------------------------------------------------------------------------------
# naming and output placement


def model_name(ckpt: Checkpoint) -> tuple[str, str | None, str | None, str | None, str | None]:
    """(name, basename, finetune, version, size label) as the GGUF converter derives them."""
    import gguf

    total = ckpt.parameter_count()
    md = gguf.Metadata.load(None, ckpt.root, None, total)
    if md.name is None:
        md.name = ckpt.root.name if ckpt.path.is_dir() else ckpt.path.stem
    if md.size_label is None and total > 0:
        md.size_label = gguf.size_label(total, 0, 0, 0)
    return str(md.name), md.basename, md.finetune, md.version, md.size_label


def default_output_name(ckpt: Checkpoint, target: str) -> str:
    """``SmolLM2-135M-Instruct-onnx-int4``: GGUF's naming convention with the --to value as the suffix."""
    import gguf

    name, basename, finetune, version, size_label = model_name(ckpt)
    return gguf.naming_convention(name, basename, finetune, version, size_label, None) + f"-{target}"


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


@contextlib.contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """Yield a private work folder beside ``dest``; its ``out`` subfolder becomes ``dest`` on success.

    The whole work folder (output, staged source, builder cache) is removed on every exit
    path, KeyboardInterrupt included, so a failed or interrupted export leaves nothing.
    """
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=parent))
    except OSError as e:
        raise LLMOpsError(f"cannot write to {parent}: {e.strerror or e}") from None
    try:
        out = work / "out"
        out.mkdir()
        yield out
        mode = 0o755 & ~_umask()
        os.chmod(out, mode)
        old = work / "replaced"
        if dest.exists():
            os.replace(dest, old)  # an earlier ONNX folder of this name is replaced, as a file would be
        try:
            os.replace(out, dest)
        except BaseException:
            if old.exists() and not dest.exists():
                os.replace(old, dest)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# ----------------------------------------------------------------------------------------------
# the builder


def builder_input(ckpt: Checkpoint, work: Path, say: Progress) -> Path:
    """A Hugging Face folder the builder can load with ``from_pretrained``.

    A safetensors folder is used as it is. A bare weights file or a (weights-only) pickle is
    staged as a folder of links to the config and tokenizer files plus one
    ``model.safetensors``, so the builder never unpickles anything itself.
    """
    if ckpt.kind == "safetensors" and ckpt.path.is_dir():
        return ckpt.root
    src = work / "source"
    src.mkdir()
    for name in _SIDE_FILES:
        p = ckpt.root / name
        if p.is_file():
            os.symlink(p.resolve(), src / name)
    if ckpt.kind == "safetensors" and len(ckpt.files) == 1:
        os.symlink(ckpt.files[0].resolve(), src / "model.safetensors")
        return src
    import torch
    from safetensors.torch import save_file

    say("staging the weights as safetensors for the builder")
    tensors: dict[str, Any] = {}
    for name in ckpt.names():
        info = ckpt.info(name)
        arr = np.ascontiguousarray(ckpt.raw(name))
        t = torch.from_numpy(arr.copy())
        if info.dtype == "BF16":
            t = t.view(torch.bfloat16)
        elif info.dtype in ("F8_E4M3", "F8_E5M2"):
            t = torch.from_numpy(ckpt.float32(name).copy())
        tensors[name] = t
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    ckpt.close()
    return src


class _ProgressLines(io.TextIOBase):
    """A text stream that hands each complete line to ``say`` (the builder prints to stdout)."""

    def __init__(self, say: Progress, prefix: str = "onnx builder: ") -> None:
        self.say = say
        self.prefix = prefix
        self.buf = ""
        self.error: BaseException | None = None  # what ``say`` raised, re-raised as it is

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            if line.strip():
                self._say(self.prefix + line.strip())
        return len(s)

    def _say(self, msg: str) -> None:
        try:
            self.say(msg)
        except BaseException as e:
            self.error = e
            raise

    def flush(self) -> None:
        if self.buf.strip():
            line, self.buf = self.buf, ""
            self._say(self.prefix + line.strip())


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _quiet_logging() -> Iterator[Callable[[], None]]:
    """Undo what importing onnxruntime.quantization's MatMulNBits quantizer does to logging.

    That module calls ``logging.basicConfig(level=INFO)`` when imported, which would put a
    line per quantized node (and every other library's INFO records) on stderr for the rest
    of the process. The context yields ``restore``, called right after the import and again
    on exit: the root logger gets its handlers and level back, the quantizer keeps to warnings.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quant = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    quant_level = quant.level

    def restore() -> None:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)

    try:
        quant.setLevel(logging.WARNING)
        yield restore
    finally:
        restore()
        quant.setLevel(quant_level)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """The builder's tqdm bar (saving tensors) and transformers' (loading weights) are redrawn
    hundreds of times; progress goes through ``say`` instead."""
    import functools

    from transformers.utils import logging as hf_logging

    base = sys.modules.get("builders.base")
    orig = getattr(base, "tqdm", None) if base is not None else None
    hf_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if orig is not None:
        base.tqdm = functools.partial(orig, disable=True)  # type: ignore[union-attr]
    try:
        yield
    finally:
        if orig is not None:
            base.tqdm = orig  # type: ignore[union-attr]
        if hf_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _no_git(work: Path) -> Iterator[None]:
    """The builder stamps ``producer_version`` with ``git rev-parse HEAD`` run beside its own
    files; with the virtual environment inside a git checkout (ours) that is the checkout's
    commit, not onnxruntime-genai's. A GIT_DIR that does not exist makes it use the package's
    recorded commit, as it does when run from a plain installation."""
    old = os.environ.get("GIT_DIR")
    os.environ["GIT_DIR"] = str(work / "no-git")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GIT_DIR", None)
        else:
            os.environ["GIT_DIR"] = old


def run_builder(input_path: Path, out_dir: Path, cache_dir: Path, precision: str, provider: str,
                options: dict[str, str], threads: int | None, say: Progress) -> None:
    """``python -m onnxruntime_genai.models.builder -i IN -o OUT -p P -e EP -c CACHE --extra_options ...``,
    as a library call."""
    extra = [f"{k}={v}" for k, v in options.items()]
    stream = _ProgressLines(say)
    try:
        with _quiet_logging() as restore_logging, contextlib.redirect_stdout(stream), _torch_threads(threads):
            try:
                from onnxruntime_genai.models import builder as mb
            except ImportError as e:
                raise LLMOpsError(f"onnxruntime-genai's model builder cannot be imported ({e})") from None
            restore_logging()
            with _no_progress_bars(), _no_git(cache_dir):
                kwargs = mb.parse_extra_options(None, str(input_path), str(out_dir), precision, provider,
                                                str(cache_dir), extra)
                mb.create_model(None, str(input_path), str(out_dir), precision, provider, str(cache_dir), **kwargs)
            stream.flush()
    except (LLMOpsError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - the builder raises bare Exception/ValueError/NotImplementedError
        if e is stream.error:  # the caller's own progress callback failed: not the builder's doing
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LLMOpsError(f"the ONNX model builder failed: {type(e).__name__}: {first[:300]}") from None


def _copy_chat_template(src_root: Path, out: Path) -> None:
    """Keep the chat template even where the tokenizer's save did not write one."""
    has = (out / "chat_template.jinja").is_file() or (out / "chat_template.json").is_file()
    if not has:
        try:
            has = "chat_template" in json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            has = False
    if has:
        return
    for name in ("chat_template.jinja", "chat_template.json"):
        if (src_root / name).is_file():
            shutil.copyfile(src_root / name, out / name)
            return


def inspect_model(folder: Path) -> tuple[int, dict[str, int], dict[str, int]]:
    """(initializer bytes, opsets, op type counts) of the folder's model.onnx, without loading weights."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    nbytes = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            ext = {e.key: e.value for e in t.external_data}
            nbytes += int(ext.get("length", 0))
        else:
            nbytes += len(t.raw_data) or t.ByteSize()
    opset = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return nbytes, opset, ops


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
) -> OnnxResult:
    """Write ``ckpt`` as an ONNX decoder folder at ``precision`` (fp32, fp16, int8, int4) for ``device``."""
    say = progress or (lambda _m: None)
    if precision not in PROVIDERS:
        raise UsageError(f"unknown ONNX precision {precision!r}; choose from {', '.join(PROVIDERS)}")
    target = target or next(k for k, v in TARGETS.items() if v == precision)
    arch = architecture_of(ckpt)
    extra = builder_options(precision, device, options or {}, ckpt.config)
    if not allow_nonfinite:
        check_finite(ckpt, say)
    name, _, _, _, size_label = model_name(ckpt)
    dest = resolve_output(ckpt, target, output)

    say(f"converting {ckpt.path} ({arch}) to ONNX {precision} for {device} -> {dest}")
    t0 = time.perf_counter()
    with atomic_folder(dest) as out:
        work = out.parent
        cache = work / "cache"
        cache.mkdir()
        src = builder_input(ckpt, work, say)
        run_builder(src, out, cache, precision, device, extra, threads, say)
        if not (out / "model.onnx").is_file() or not (out / "genai_config.json").is_file():
            raise LLMOpsError("the ONNX model builder finished without writing model.onnx and genai_config.json")
        _copy_chat_template(ckpt.root, out)
        weight_bytes, opset, ops = inspect_model(out)
        genai = json.loads((out / "genai_config.json").read_text(encoding="utf-8"))
        files = sorted(p.name for p in out.iterdir())
    say(f"wrote {dest} in {time.perf_counter() - t0:.1f}s")
    model = genai.get("model", {})
    return OnnxResult(
        path=dest, precision=precision, execution_provider=device, architecture=arch,
        parameter_count=ckpt.parameter_count(), weight_bytes=weight_bytes, opset=opset, op_types=ops,
        builder_options=extra, name=name, size_label=size_label, files=files,
        genai={"type": model.get("type"), "context_length": model.get("context_length"),
               "vocab_size": model.get("vocab_size")},
    )


# ----------------------------------------------------------------------------------------------
# the converter interface


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from llmops.converters.api import tool_versions as base_versions

    out = base_versions()
    for key, dist in (("onnxruntime", "onnxruntime"), ("onnxruntime_genai", "onnxruntime-genai"),
                      ("onnx", "onnx"), ("onnx_ir", "onnx-ir")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            pass
    return out


class OnnxConverter(ConverterOptions):
    """The ONNX implementation of the converter interface (``base.Converter``).

    ``device`` picks the execution provider the graph is built for (cpu or cuda): the
    builder fuses differently per provider, so a CPU-built folder is what a CPU user runs.
    """

    format = "onnx"

    def convert(self, source: Any, target: TargetSpec, output: Path | None, progress: Progress) -> ArtifactRecord:
        from llmops.hashing import sha256_path, size_of

        ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
        t0 = time.perf_counter()
        res = convert_to_onnx(ckpt, target.quant, output, target=target.options.get("target"), device=self.device,
                              options=target.options, allow_nonfinite=self.allow_nonfinite, threads=self.threads,
                              progress=progress)
        seconds = time.perf_counter() - t0
        return ArtifactRecord(
            output=res.path,
            format="onnx",
            quant=res.precision,
            sha256=sha256_path(res.path),
            size_bytes=size_of(res.path),
            seconds=seconds,
            # every initializer's bytes (quantized weights with their scales, norms, rotary caches)
            # over the source checkpoint's parameter count
            bits_per_weight=round(res.weight_bytes * 8 / res.parameter_count, 4) if res.parameter_count else None,
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
                "weight_bytes": res.weight_bytes,
                "files": res.files,
                "genai": res.genai,
                "allow_nonfinite": self.allow_nonfinite,
                "threads": self.threads,
            },
            tool_versions=tool_versions(),
        )
