"""onnxruntime-genai's model builder called as a library, with our staging, logging and safety around it."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


from llmops.core.checkpoint import Checkpoint
from llmops.core.errors import LLMOpsError
from llmops.core.progress import Phase, Reporter, as_reporter
from llmops.core.quiet import root_logging_kept
from llmops.core.settings import env_var

Progress = Callable[[str], None]

# Files of the source folder the builder (through transformers) reads besides the weights.
_SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json",
)



def builder_input(ckpt: Checkpoint, work: Path, say: Progress) -> Path:
    """A Hugging Face folder the builder can load with ``from_pretrained``: a safetensors folder
    as it is, anything else staged as one (``Checkpoint.as_safetensors_folder``)."""
    if not (ckpt.kind == "safetensors" and ckpt.path.is_dir()):
        say("staging the weights as safetensors for the builder")
    return ckpt.as_safetensors_folder(work / "source", _SIDE_FILES)


class _ProgressLines(io.TextIOBase):
    """A text stream that hands each complete line the builder prints (to stdout) to a reporter:
    "Reading layer N" advances the export phase ``bar``, a warning is a warning, the rest
    ("Reading embedding layer", "Saving ONNX model in ...") are details, shown with -v."""

    def __init__(self, say: Reporter, bar: Phase | None = None, prefix: str = "onnx builder: ") -> None:
        self.say = say
        self.bar = bar
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
        line = msg[len(self.prefix):]
        try:
            if line.startswith("Reading layer ") and self.bar is not None:
                self.bar.advance(note=msg)
            elif line.lower().startswith("warning"):
                self.say.warn(msg)
            else:
                self.say.detail(msg)
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


def _unresolved_input(record: logging.LogRecord) -> bool:
    """False for onnx_ir's "Input ... cannot be found in any scope. The model is invalid ..."
    warning. With a tied embedding the builder's embedding nodes read the LM head's quantized
    blocks, names not yet in the graph when onnx_ir reads it mid-build (converting SmolLM2 to
    int4: three lines ending in "The model is invalid"); the finished graph provides them. What is
    written is checked where it can be: :func:`inspect_model` refuses any node input that nothing
    provides, so the warning would only alarm a user over a valid model."""
    return not str(record.msg).startswith("Input '%s' of node '%s'")


@contextlib.contextmanager
def _quiet_logging() -> Iterator[Callable[[], None]]:
    """Undo what importing onnxruntime.quantization's MatMulNBits quantizer does to logging.

    That module calls ``logging.basicConfig(level=INFO)`` when imported, which would put a
    line per quantized node (and every other library's INFO records) on stderr for the rest
    of the process. The context yields ``restore``, called right after the import and again
    on exit: the root logger gets its handlers and level back, the quantizer keeps to warnings.
    onnx_ir's mid-build warning about unresolved inputs is dropped (:func:`_unresolved_input`).
    """
    quant = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    quant_level = quant.level
    serde = logging.getLogger("onnx_ir.serde")
    try:
        quant.setLevel(logging.WARNING)
        serde.addFilter(_unresolved_input)
        with root_logging_kept() as restore:
            yield restore
    finally:
        quant.setLevel(quant_level)
        serde.removeFilter(_unresolved_input)


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
    with env_var("GIT_DIR", str(work / "no-git")):
        yield


def run_builder(input_path: Path, out_dir: Path, cache_dir: Path, precision: str, provider: str,
                options: dict[str, str], threads: int | None, say: Progress, *, layers: int | None = None,
                target_options: dict[str, Any] | None = None) -> None:
    """``python -m onnxruntime_genai.models.builder -i IN -o OUT -p P -e EP -c CACHE --extra_options ...``
    (and ``--target_options JSON`` when given: the builder's structured configuration, which per-node
    quantization overrides need), as a library call: the progress phase "onnx export", one step per
    decoder layer (``layers``) read."""
    # hf_remote=false, always and explicitly (whatever the builder's default in a release):
    # trust_remote_code=True would make transformers import and run any Python that a
    # config.json's ``auto_map`` points at.
    extra = [f"{k}={v}" for k, v in options.items()] + ["hf_remote=false"]
    rep = as_reporter(say)
    bar = rep.phase("onnx export", total=layers, unit="layer")
    stream = _ProgressLines(rep, bar)
    try:
        with bar, _quiet_logging() as restore_logging, contextlib.redirect_stdout(stream), _torch_threads(threads):
            try:
                from onnxruntime_genai.models import builder as mb
            except ImportError as e:
                raise LLMOpsError(f"onnxruntime-genai's model builder cannot be imported ({e})") from None
            restore_logging()
            with _no_progress_bars(), _no_git(cache_dir):
                structured = {"target_options": target_options} if target_options else {}
                kwargs = mb.parse_extra_options(None, str(input_path), str(out_dir), precision, provider,
                                                str(cache_dir), extra, **structured)
                from llmops.converters.onnx.checks import adapt_config_for_builder

                adapt_config_for_builder(kwargs["hf_details"]["hf_config"])
                mb.create_model(None, str(input_path), str(out_dir), precision, provider, str(cache_dir), **kwargs)
            stream.flush()
    except (LLMOpsError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - the builder raises bare Exception/ValueError/NotImplementedError
        if e is stream.error:  # the caller's own progress callback failed: not the builder's doing
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LLMOpsError(f"the ONNX model builder failed: {type(e).__name__}: {first[:300]}") from None


def copy_chat_template(src_root: Path, out: Path) -> None:
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


def inspect_model(folder: Path) -> tuple[int, dict[str, int], dict[str, int], list[dict[str, Any]]]:
    """(initializer bytes, opsets, op type counts, the initializers' table: name, shape, type,
    bytes) of the folder's model.onnx, without loading weights; a graph whose nodes read a tensor
    nothing provides is an error."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    nbytes = 0
    table = []
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            ext = {e.key: e.value for e in t.external_data}
            size = int(ext.get("length", 0))
        else:
            size = len(t.raw_data) or t.ByteSize()
        nbytes += size
        table.append({"name": t.name, "shape": [int(d) for d in t.dims],
                      "type": onnx.TensorProto.DataType.Name(t.data_type), "bytes": size})
    provided = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    for n in model.graph.node:
        provided.update(n.output)
    for n in model.graph.node:
        missing = [i for i in n.input if i and i not in provided]
        if missing:
            # the builder writes such a graph without failing (e.g. a tied embedding reading LM-head
            # blocks under names its quantizer did not give them); onnxruntime would refuse to load it
            raise LLMOpsError(f"the ONNX model builder wrote an invalid graph: node {n.name} reads {missing[0]}, "
                              "which no initializer, input or node provides")
    opset = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return nbytes, opset, ops, table
