"""Checkpoint -> GGUF in one streaming pass.

Per tensor: read a block of rows (memory-mapped), decode to float32, check it is
finite, apply the family's transform, encode to the planned type, append to the
output file. Nothing model-sized is ever resident.

Type choice mirrors llama.cpp's documented pipeline so the bytes are the same:

* F32/F16/BF16/Q8_0 follow ``convert_hf_to_gguf.py``: 1-D tensors, norms and
  biases stay F32, every other ``.weight`` gets the target type (Q8_0 falls back
  to F16 for rows that are not a multiple of 32).
* Q4_0, the K-quant and the I-quant mixes follow "convert to F16, then
  ``llama-quantize``": the F16 plan above, then llama.cpp's per-tensor choice
  (``quantize.compute_types``, a port of its ``llama_tensor_get_type``), and each
  tensor is rounded to F16 before llama.cpp's quantizer sees it, exactly as it
  would be read back from the F16 file, with the importance matrix, if any
  (``imatrix``), that llama-quantize would hand it. No F16 file is written;
  ``force_two_pass`` writes one to a temporary name and quantizes it with
  ``llama_model_quantize`` (removed on every exit path), the check of the one pass.
"""

from __future__ import annotations

import os
import queue
import re
from collections import deque
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from llmops.converters.base import finish, tensor_lines
from llmops.converters.naming import model_metadata, output_stem
from llmops.core.checkpoint import Checkpoint
from llmops.core.tensorfiles import refuse_nonfinite
from llmops.converters.gguf.arch_base import Family, family_for
from llmops.converters.gguf.quantize import (
    compute_types, f16_to_f32, llama_model_quantize, llama_tensor_order, requires_imatrix, submit_quantize_rows,
    thread_pool, to_f16,
)
from llmops.converters.gguf.targets import QUANTS, GGUFQuant
from llmops.converters.gguf.tokenizer_facts import Pending
from llmops.converters.gguf.vocab import add_vocab
from llmops.converters.gguf.writer import StreamingGGUFWriter
from llmops.core.atomic import Staged, staged_file
from llmops.core.errors import LLMOpsError, UsageError
from llmops.core.progress import Reporter, as_reporter

QT = gguf.GGMLQuantizationType
Progress = Callable[[str], None]

CHUNK_BYTES = 4 << 20  # float32 bytes decoded at once for row-wise tensors (peak RSS: a few of them in flight)
PREFETCH_CHUNKS = 2  # decoded chunks the reader thread may hold ahead of the quantizer
CHUNKS_IN_FLIGHT = 2  # chunks submitted to the quantizer's pool and not yet written


@dataclass
class PlannedTensor:
    src: str | None  # checkpoint tensor name (None: generated, e.g. rope factors)
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order
    qtype: QT
    base: QT  # type in the F16 file of the two-step pipeline (== qtype for direct targets)
    data: np.ndarray | None = None  # generated tensors only
    parts: tuple[str, ...] = ()  # checkpoint tensors stacked into this one (MoE experts), in order
    imatrix: np.ndarray | None = None  # importance of each input column, [matrices, columns] (quantized only)


@dataclass
class GGUFResult:
    path: Path
    quant: str
    arch: str
    hf_arch: str
    parameters: int
    tensor_types: dict[str, str]
    vocab: dict[str, Any]
    one_pass: bool
    name: str
    size_label: str | None
    data_bytes: int = 0
    sha256: str | None = None
    # per tensor of the output, in file order: name, shape (GGUF order), type, bytes
    tensors: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    staged: Staged | None = None  # the output, written but not yet renamed into place


# Tensors convert_hf_to_gguf.py always stores in F32, whatever the output type (its list in
# ModelBase.prepare_tensors, as GGUF names; the MoE router and shared-expert gate are the ones our
# architectures have, the rest are kept so a new architecture cannot silently miss them).
_ALWAYS_F32 = re.compile(
    r"(^|\.)(ffn_gate_inp|ffn_gate_inp_shexp|position_embd|token_types|ssm_conv1d|ssm_conv1d_[qkv]|shortconv\.conv"
    r"|time_mix_(first|w1|w2|decay_w1|decay_w2|lerp_fused)|norm1|norm2|altup_correct_coef|altup_predict_coef"
    r"|indexer\.proj)\.weight$")


def _direct_type(name: str, shape: tuple[int, ...], target: str) -> QT:
    """convert_hf_to_gguf.py's choice for the F32/F16/BF16/Q8_0 outputs."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or _ALWAYS_F32.search(name):
        return QT.F32
    qt = QT[target]
    if qt == QT.Q8_0 and shape[-1] % 32 != 0:
        return QT.F16  # the reference converter's fallback when Q8_0 does not fit
    return qt


def plan_tensors(ckpt: Checkpoint, family: Family, quant: GGUFQuant) -> list[PlannedTensor]:
    plan: list[PlannedTensor] = []
    for gname, arr in family.extra_tensors():
        plan.append(PlannedTensor(None, gname, arr.shape, QT.F32, QT.F32, arr))
    stacks = family.stacks(ckpt.names())
    # a stack takes the place of its last part in the checkpoint's order, where llama.cpp's
    # converter emits it (once every expert of the layer has been seen)
    last_part = {}
    for merged, parts in stacks.items():
        last = max(parts, key=ckpt.names().index)
        last_part.setdefault(last, []).append(merged)
    in_stack = {p for parts in stacks.values() for p in parts}
    seen: set[str] = set()
    base_target = "F16" if quant.via_llama_quantizer else quant.default_type

    def add(src: str, shape: tuple[int, ...], dtype_of: str, parts: tuple[str, ...] = ()) -> None:
        gname = family.map_name(src)
        if gname in seen:
            raise LLMOpsError(f"two checkpoint tensors map to {gname} (second: {src})")
        seen.add(gname)
        if not ckpt.info(dtype_of).is_float:
            raise LLMOpsError(f"tensor {dtype_of} has integer dtype {ckpt.info(dtype_of).dtype}; quantized "
                              "checkpoints are not supported")
        base = _direct_type(gname, shape, base_target)
        plan.append(PlannedTensor(src, gname, shape, base, base, parts=parts))

    for src in ckpt.names():
        if family.skip(src):
            continue
        if src not in in_stack:
            add(src, ckpt.info(src).shape, src)
        for merged in last_part.get(src, ()):
            parts = stacks[merged]
            shapes = {ckpt.info(p).shape for p in parts}
            if len(shapes) != 1:
                raise LLMOpsError(f"the experts stacked into {merged} differ in shape: {sorted(shapes)}")
            add(merged, (len(parts), *shapes.pop()), parts[0], tuple(parts))
    return plan


def _encode(x: np.ndarray, qtype: QT, base: QT, threads: int, imatrix: np.ndarray | None = None,
            first_row: int = 0, rows_per_matrix: int | None = None, finite: bool = False) -> Callable[[], np.ndarray]:
    """Start encoding one chunk; the returned function waits for its bytes. The plain types are
    done at once; the quantized ones run on the pool (``submit_quantize_rows``). ``finite``: the
    chunk passed the NaN/Inf check (``to_f16``)."""
    via_f16 = base == QT.F16 and qtype != QT.F16  # what llama.cpp's quantizer reads back from the F16 file
    if via_f16 and qtype in (QT.F32, QT.BF16):
        x = _parallel_rows(x, lambda a: f16_to_f32(to_f16(a, finite=finite), finite=finite), np.float32, threads)
    if qtype in (QT.F32, QT.F16, QT.BF16):
        done = _encode_plain(x, qtype, threads, finite)
        return lambda: done
    # importance weights per matrix: a stack of experts uses expert e's for rows of expert e
    return submit_quantize_rows(x, qtype, threads, imatrix, first_row, rows_per_matrix, via_f16=via_f16,
                                finite=finite)


def _encode_plain(x: np.ndarray, qtype: QT, threads: int, finite: bool = False) -> np.ndarray:
    if qtype == QT.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == QT.F16:
        return _parallel_rows(x, lambda a: to_f16(a, finite=finite), np.float16, threads)
    if qtype == QT.BF16:
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        r = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
        if nan.any():
            r[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)  # quiet NaN, as gguf-py does
        return r
    raise AssertionError(f"not a plain type: {qtype.name}")


def _parallel_rows(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], dtype: Any, threads: int) -> np.ndarray:
    """Elementwise conversion split over threads (numpy releases the GIL in casts)."""
    if threads <= 1 or x.size < (1 << 20) or x.ndim == 0:
        return fn(x)
    flat = x.reshape(-1)
    out = np.empty(flat.shape, dtype=dtype)
    step = -(-flat.size // threads)

    def work(a: int) -> None:
        out[a:a + step] = fn(flat[a:a + step])

    list(thread_pool(threads).map(work, range(0, flat.size, step)))
    return out.reshape(x.shape)


def default_output_name(md: gguf.Metadata, quant: str) -> str:
    return output_stem(md, quant) + ".gguf"


def convert_to_gguf(
    ckpt: Checkpoint,
    quant_name: str,
    output: str | os.PathLike[str] | None = None,
    *,
    allow_nonfinite: bool = False,
    threads: int | None = None,
    progress: Progress | None = None,
    commit: bool = True,
    force_two_pass: bool = False,
    imatrix: Any = None,
    tokenizer_facts: Pending | None = None,
) -> GGUFResult:
    """Write ``ckpt`` as GGUF ``quant_name`` (F32, F16, BF16, Q8_0, Q4_0, Q4_K_M, Q5_K_M, Q6_K).

    ``progress``: a reporter (``llmops.core.progress``) or a plain callable; the tensors are one
    phase, each tensor's row of the table a note (a line of its own for a plain callable).
    ``imatrix``: an importance matrix for the llama.cpp mixes (``imatrix.ImatrixRequest``, a path
    to an imatrix file or calibration text, or ``imatrix.ImatrixData``). ``tokenizer_facts``: the
    checkpoint's tokenizer.json already being read in a child (``tokenizer_facts.start``)."""
    say = as_reporter(progress)
    threads = max(1, threads or os.cpu_count() or 1)
    if quant_name not in QUANTS:
        raise LLMOpsError(f"unknown GGUF quantization {quant_name!r}; choose from {', '.join(QUANTS)}")
    quant = QUANTS[quant_name]
    family = family_for(ckpt.config, str(ckpt.root / "config.json"))
    plan = plan_tensors(ckpt, family, quant)

    one_pass = True
    if imatrix is not None and not quant.via_llama_quantizer:
        raise UsageError(f"--imatrix applies to the quantized GGUF mixes, not {quant.name}")
    if quant.via_llama_quantizer:
        types = compute_types(family.arch_name, quant.ftype, [(t.name, t.shape, t.base) for t in plan],
                              family.quant_hparams(), has_imatrix=imatrix is not None)
        _refuse_without_imatrix(quant, types, imatrix)
        if force_two_pass:
            one_pass = False
        else:
            for t in plan:
                t.qtype = types[t.name]
            # llama.cpp's quantizer writes its output in its loader's order (by layer, then name),
            # not the F16 file's: so does the one pass, for the same file
            at = {n: i for i, n in enumerate(llama_tensor_order([t.name for t in plan]))}
            plan.sort(key=lambda t: at[t.name])

    def build_writer(ftype: int, tensors: list[PlannedTensor], use_final: bool) -> tuple[StreamingGGUFWriter, Any, dict]:
        out = StreamingGGUFWriter(family.arch_name)
        for t in tensors:
            out.add_tensor_plan(t.name, t.shape, t.qtype if use_final else t.base)
        total, shared, expert, n_exp = out.w.get_total_parameter_count()
        md = model_metadata(ckpt, total, shared, expert, n_exp)
        w = out.w
        # in llama.cpp's converter's order, so the files are the same bytes
        family.add_early_keys(w)
        w.add_type(gguf.GGUFType.MODEL)
        md.set_gguf_meta_model(w)
        start = len(w.kv_data[0])
        family.add_parameters(w)
        _insert_file_type(w, start, family, ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        family.add_vocab_prelude(w, ckpt.root)
        vocab = add_vocab(w, ckpt.root, ckpt.config, prefer_spm=family.prefer_spm, pending=tokenizer_facts)
        family.add_vocab_extras(w, ckpt.root, vocab)
        if use_final and quant.via_llama_quantizer:
            # llama.cpp's quantizer copies the F16 file's keys, then sets these two anew, which
            # moves them to the end
            kv = w.kv_data[0]
            for key in (gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.FILE_TYPE):
                kv[key] = kv.pop(key)
        return out, md, {"total": total, "vocab": vocab}

    # Everything that can be refused (architecture, names, config, tokenizer) is checked
    # above and in build_writer, before any file exists.
    out, md, info = build_writer(quant.ftype, plan, True)
    if output is None:
        dest = Path.cwd() / default_output_name(md, quant.name)
    else:
        dest = Path(output).expanduser()
        if dest.is_dir() or str(output).endswith(("/", os.sep)):
            dest = dest / default_output_name(md, quant.name)
    dest = dest.absolute()
    if dest.exists() and dest.is_dir():
        raise LLMOpsError(f"{dest} is a folder")

    im = None
    if imatrix is not None:
        im = _attach_imatrix(imatrix, ckpt, plan, types, quant, threads, say)
        im.add_metadata(out.w)
    say(f"converting {ckpt.path} ({family.hf_arch}) to GGUF {quant.name}: {len(plan)} tensors -> {dest}")
    t0 = time.perf_counter()
    with staged_file(dest) as staged:
        tmp = staged.tmp
        if one_pass:
            tensors = _write_all(ckpt, family, plan, out, tmp, allow_nonfinite, threads, say, "convert")
        else:
            out.abort()
            f16_plan = [PlannedTensor(t.src, t.name, t.shape, t.base, t.base, t.data, t.parts) for t in plan]
            f16_out, _, _ = build_writer(QUANTS["F16"].ftype, f16_plan, False)
            with staged_file(dest.with_name(dest.name + ".f16")) as f16:
                try:
                    _write_all(ckpt, family, f16_plan, f16_out, f16.tmp, allow_nonfinite, threads, say,
                               "convert (F16)")
                    say(f"quantizing with llama.cpp to {quant.name}")
                    llama_model_quantize(str(f16.tmp), str(tmp), quant.ftype, threads,
                                         im.all_weights() if im is not None else None)
                finally:
                    f16.discard()
        say(f"wrote {dest} in {time.perf_counter() - t0:.1f}s")
        if not one_pass:
            tensors = _read_table(tmp)
        tensor_types = {t["name"]: t["type"] for t in tensors}
    result = GGUFResult(
        path=tmp, quant=quant.name, arch=family.arch_name, hf_arch=family.hf_arch, parameters=int(info["total"]),
        tensor_types=tensor_types, vocab=info["vocab"], one_pass=one_pass, name=str(md.name),
        size_label=md.size_label, data_bytes=sum(n for *_, n in out.plan),
        sha256=out.sha256 if one_pass else None, tensors=tensors, staged=staged,
        extra={"imatrix": im.record()} if im is not None else {},
    )
    return finish(result, commit)


def _insert_file_type(w: gguf.GGUFWriter, start: int, family: Family, ftype: int) -> None:
    """``general.file_type`` where llama.cpp writes it: amid the parameters the family wrote
    (from key ``start`` on), at the place the family names (``Family.file_type_index``)."""
    kv = w.kv_data[0]
    if gguf.Keys.General.FILE_TYPE in kv:  # a family that wrote it itself placed it
        w.add_file_type(ftype)
        return
    w.add_file_type(ftype)
    items = list(kv.items())
    entry = items.pop()
    at = min(max(start, family.file_type_index([k for k, _ in items], start)), len(items))
    items.insert(at, entry)
    kv.clear()
    kv.update(items)


def _source_chunks(ckpt: Checkpoint, family: Family, t: PlannedTensor,
                   allow_nonfinite: bool) -> Iterator[np.ndarray]:
    """A planned tensor as float32 row blocks, read, decoded, checked and transformed: the part of
    the work that does not depend on the output type, so it can run ahead of the quantizer. A
    stack of experts is read expert by expert: memory stays flat in the number of experts."""
    if t.data is not None:
        yield t.data.astype(np.float32)
        return
    assert t.src is not None
    for src in t.parts or (t.src,):
        yield from _tensor_chunks(ckpt, family, src, allow_nonfinite)


def _tensor_chunks(ckpt: Checkpoint, family: Family, src: str, allow_nonfinite: bool) -> Iterator[np.ndarray]:
    info = ckpt.info(src)
    shape = info.shape
    rows = shape[0] if len(shape) >= 1 else 1
    block = family.row_block(src, shape)
    row_elems = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if block is None or len(shape) < 2:
        step = rows
    else:
        step = max(block, (CHUNK_BYTES // max(1, row_elems * 4)) // block * block)
    for a in range(0, max(rows, 1), max(step, 1)):
        b = min(rows, a + step)
        whole = a == 0 and b == rows
        x = ckpt.float32(src, None if whole or len(shape) < 2 else (a, b))
        if len(shape) == 0:
            x = x.reshape(())
        if not allow_nonfinite:
            refuse_nonfinite(src, x, (a, b))
        yield family.transform(src, x, info.dtype, rows)


_END = object()  # marks the end of one tensor's chunks in the prefetch queue


def _prefetched(ckpt: Checkpoint, family: Family, plan: list[PlannedTensor], allow_nonfinite: bool,
                depth: int = PREFETCH_CHUNKS) -> Iterator[Any]:
    """Every tensor's chunks in plan order, each tensor followed by ``_END``, produced by a reader
    thread up to ``depth`` chunks ahead of the consumer.

    Reading and bf16 decoding (memory-bound numpy, which releases the GIL) overlap with the
    quantizer of the previous chunk; the order of the bytes is the plan's, so the file is the
    same. Memory stays bounded by ``depth`` chunks of ``CHUNK_BYTES``. A reader error is raised
    in the consumer; a consumer that stops (error, Ctrl-C) stops the reader."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for t in plan:
                for x in _source_chunks(ckpt, family, t, allow_nonfinite):
                    if not put(x):
                        return
                if not put(_END):
                    return
            put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(e)

    reader = threading.Thread(target=read, name="llmops-gguf-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join(timeout=5)


def _write_all(ckpt: Checkpoint, family: Family, plan: list[PlannedTensor], out: StreamingGGUFWriter, path: Path,
               allow_nonfinite: bool, threads: int, rep: Reporter, phase: str) -> list[dict[str, Any]]:
    """Stream every planned tensor into ``path`` as one progress phase; the tensor table."""
    table = [{"name": name, "shape": list(reversed(shape)), "type": qt.name, "bytes": nb}
             for name, shape, qt, nb in out.plan]
    checked = not allow_nonfinite  # every checkpoint chunk went through refuse_nonfinite
    try:
        out.open(path)
        chunks = _prefetched(ckpt, family, plan, allow_nonfinite)
        try:
            with rep.phase(phase, total=len(plan), unit="tensor", total_bytes=sum(r["bytes"] for r in table)) as bar:
                rows = tensor_lines(table)
                # chunks being encoded, in file order, and the ends of tensors between them: the
                # next chunk is submitted before the previous one is waited for
                pending: deque[Callable[[], np.ndarray] | str] = deque()
                in_flight = 0

                def drain(keep: int) -> None:
                    nonlocal in_flight
                    while pending and (in_flight > keep or isinstance(pending[0], str)):
                        item = pending.popleft()
                        if isinstance(item, str):
                            out.end_tensor()
                            bar.advance(note=item)
                            continue
                        in_flight -= 1
                        encoded = item()
                        out.write(encoded)
                        bar.advance(0, nbytes=encoded.nbytes)

                for i, t in enumerate(plan):
                    done_rows = 0  # rows of this tensor already written (which expert's weights apply)
                    for x in chunks:
                        if x is _END:
                            break
                        pending.append(_encode(x, t.qtype, t.base, threads, t.imatrix, done_rows,
                                               t.shape[-2] if len(t.shape) == 3 else None,
                                               finite=checked and t.data is None))
                        in_flight += 1
                        done_rows += x.size // max(1, x.shape[-1]) if x.ndim else 1
                        del x
                        drain(CHUNKS_IN_FLIGHT - 1)
                    pending.append(rows[i])
                    drain(CHUNKS_IN_FLIGHT - 1)
                drain(0)
        finally:
            chunks.close()  # stops the reader thread
        out.close()
    except BaseException:
        out.abort()
        raise
    return table


def _read_table(path: Path) -> list[dict[str, Any]]:
    """The tensor table of a written file (the two-pass path, where llama.cpp chose the types)."""
    r = gguf.GGUFReader(path)
    return [{"name": t.name, "shape": [int(d) for d in t.shape], "type": t.tensor_type.name, "bytes": int(t.n_bytes)}
            for t in r.tensors]


def _refuse_without_imatrix(quant: GGUFQuant, types: dict[str, QT], imatrix: Any) -> None:
    """llama-quantize's refusal ("this quantization requires an importance matrix"), before any file."""
    if imatrix is not None:
        return
    need = [n for n, q in types.items() if requires_imatrix(n, q, quant.ftype)]
    if need:
        raise UsageError(f"{quant.name} needs an importance matrix ({need[0]} would be {types[need[0]].name}): "
                         "pass --imatrix FILE (a llama.cpp imatrix file, or calibration text to compute one from)")


def _attach_imatrix(req: Any, ckpt: Checkpoint, plan: list[PlannedTensor], types: dict[str, QT], quant: GGUFQuant,
                    threads: int, say: Progress) -> Any:
    """Resolve the importance matrix and give each quantized tensor its weights (llama-quantize's lookup)."""
    from llmops.converters.gguf.imatrix import prepare

    quantized = {t.name for t in plan if types[t.name] not in (QT.F32, QT.F16, QT.BF16) and types[t.name] != t.base}
    data, weights = prepare(req, source=ckpt.path, threads=threads, say=say,
                            tensors=[(t.src, t.parts, t.name, t.shape, t.name in quantized) for t in plan])
    for t in plan:
        t.imatrix = weights.get(t.name)
        if t.imatrix is None and t.name in quantized and requires_imatrix(t.name, types[t.name], quant.ftype):
            raise UsageError(f"the importance matrix has no entry for {t.name}, which {quant.name} makes "
                             f"{types[t.name].name} (llama.cpp refuses to quantize it without one)")
    return data
