"""Importance matrices: llama.cpp's files, read and written, or one computed from calibration text.

An importance matrix tells the quantizer which input columns of each weight matter: for
every weight matrix the sum of x² of the activations entering it, per input column, over
the calibration tokens, and how many tokens were counted (per expert, for stacked
experts). ``ggml_quantize_chunk`` takes the mean (sum / count) as the weight of each
column's rounding error.

``--imatrix FILE`` accepts three kinds of file, told apart by their bytes:

* the GGUF imatrix current ``llama-imatrix`` writes (``general.type = imatrix``,
  tensors ``<weight>.in_sum2`` [columns, matrices] and ``<weight>.counts`` [1, matrices]),
* the legacy ``.dat`` format of older ``llama-imatrix`` (means times the number of
  chunks, one count per entry),
* calibration text, from which the matrix is computed here (``imatrix_worker``, in a
  child interpreter) and written in the GGUF format, so ``llama-quantize --imatrix`` reads
  it too. Calibration must never be text the evaluation scores: when the text is the eval
  text itself, only the part ``llmops.core.evaltext`` reserves for calibration is used; a
  text that shares any line with the evaluation part is refused.

:meth:`ImatrixData.weights` turns the stored sums into the float32 weights exactly as
llama-quantize's ``load_imatrix`` does, so the same file gives the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmops.core.errors import LLMOpsError, UsageError

Progress = Callable[[str], None]

IN_SUM2 = ".in_sum2"
COUNTS = ".counts"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
CHUNK_SIZE = 512  # llama-imatrix's default context: the chunk the sums are counted in
COMPUTE_VERSION = 1  # of the computation in imatrix_worker: a change there invalidates computed matrices
MIN_LINE = 80  # lines at least this long are compared between calibration and evaluation text


@dataclass
class ImatrixData:
    """Sums of squared activations per weight (GGUF tensor name), as llama-imatrix keeps them."""

    sums: dict[str, np.ndarray]  # name -> float32 [matrices, columns]
    counts: dict[str, np.ndarray]  # name -> float32 [matrices] (legacy: [1] = the chunk count)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    path: Path | None = None
    calibration: dict[str, Any] | None = None  # what text was used, when computed here

    def weights(self, name: str) -> np.ndarray | None:
        """The float32 weights llama-quantize hands to the quantizer for ``name`` (its
        ``load_imatrix``): per matrix sum / count, 1 where a matrix saw no token; legacy
        files hold mean * chunks, divided by their chunk count."""
        if name not in self.sums:
            return None
        s = self.sums[name].astype(np.float32, copy=False)
        c = self.counts[name].astype(np.float32, copy=False).reshape(-1)
        if self.legacy:
            n = float(np.round(c[0])) if c.size else 0.0
            return (s / np.float32(n)).reshape(-1) if n > 0 else s.reshape(-1).copy()
        c = np.floor(c + np.float32(0.5)).astype(np.float32)  # lround, as the loader does
        rows = s.reshape(c.size, -1)
        out = np.ones_like(rows)
        seen = c > 0
        out[seen] = rows[seen] / c[seen, None]
        return out.reshape(-1)

    def all_weights(self) -> dict[str, np.ndarray]:
        return {n: w for n in sorted(self.sums) if (w := self.weights(n)) is not None}

    def record(self) -> dict[str, Any]:
        """What the artifact record says about the importance matrix (lineage needs the file and
        its hash; calibration, when computed here, says which characters of which text)."""
        from llmops.core.hashing import sha256_file

        rec: dict[str, Any] = {"entries": len(self.sums), "chunks": self.chunk_count,
                               "chunk_size": self.chunk_size, "datasets": list(self.datasets),
                               "format": "dat" if self.legacy else "gguf"}
        if self.path is not None:
            rec.update(path=str(self.path), sha256=sha256_file(self.path))
        if self.calibration is not None:
            rec["calibration"] = dict(self.calibration)
        return rec

    def add_metadata(self, w: Any) -> None:
        """The keys llama-quantize adds to a file quantized with an importance matrix."""
        if self.path is not None:
            w.add_string("quantize.imatrix.file", str(self.path)[:127])
        if self.datasets:
            w.add_string("quantize.imatrix.dataset", self.datasets[0][:127])
        w.add_uint32("quantize.imatrix.entries_count", len(self.sums))
        if self.chunk_count > 0:
            w.add_uint32("quantize.imatrix.chunks_count", self.chunk_count)


# ----------------------------------------------------------------------------------------------
# files


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_gguf(path: Path) -> ImatrixData:
    """A GGUF imatrix (llama.cpp's common_imatrix_load)."""
    import gguf

    try:
        r = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf-py raises plain ValueErrors and struct errors
        raise LLMOpsError(f"imatrix {path}: not a readable GGUF file ({e})") from None
    if r.fields.get("general.type") is not None and str(r.fields["general.type"].contents()) != "imatrix":
        raise UsageError(f"--imatrix {path}: a GGUF {r.fields['general.type'].contents()} file, not an imatrix")
    tensors = {t.name: t for t in r.tensors}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        if not name.endswith(IN_SUM2):
            continue
        base = name[: -len(IN_SUM2)]
        c = tensors.get(base + COUNTS)
        if c is None:
            raise LLMOpsError(f"imatrix {path}: {base} has sums but no counts")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or c.tensor_type != gguf.GGMLQuantizationType.F32:
            raise LLMOpsError(f"imatrix {path}: sums and counts of {base} must be F32")
        n_mat = int(np.asarray(c.data).size)
        sums[base] = np.array(t.data, dtype=np.float32).reshape(n_mat, -1)
        counts[base] = np.array(c.data, dtype=np.float32).reshape(-1)
    if not sums:
        raise LLMOpsError(f"imatrix {path}: no entries")
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in r.fields]
    if missing:  # llama-quantize refuses these too ("missing imatrix metadata")
        raise LLMOpsError(f"imatrix {path}: missing imatrix metadata ({', '.join(missing)})")
    ds = r.fields[KEY_DATASETS]
    datasets = [str(v) for v in ds.contents()] if ds else []
    return ImatrixData(sums, counts, datasets, int(r.fields[KEY_CHUNK_COUNT].contents()),
                       int(r.fields[KEY_CHUNK_SIZE].contents()), False, path)


def read_legacy(path: Path) -> ImatrixData | None:
    """The legacy ``.dat`` format (common_imatrix_load_legacy); None when the bytes are not one."""
    b = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(b):
            raise ValueError("truncated")
        out = struct.unpack_from(fmt, b, pos)
        pos += size
        return out

    try:
        (n,) = take("<i")
        if not 0 < n < 1 << 20:
            return None
        sums, counts = {}, {}
        for _ in range(n):
            (ln,) = take("<i")
            if not 0 < ln < 4096:
                return None
            name = b[pos:pos + ln].decode("ascii")
            pos += ln
            if not name.isprintable():
                return None
            ncall, nval = take("<ii")
            if nval < 1 or pos + 4 * nval > len(b):
                return None
            sums[name] = np.frombuffer(b, dtype="<f4", count=nval, offset=pos).astype(np.float32).reshape(1, -1)
            counts[name] = np.array([ncall], dtype=np.float32)
            pos += 4 * nval
        chunks, datasets = 0, []
        if pos < len(b):
            (chunks,) = take("<i")
            if pos < len(b):
                (ln,) = take("<i")
                if ln > 0:
                    datasets.append(b[pos:pos + ln].decode("utf-8", "replace"))
                    pos += ln
    except (ValueError, UnicodeDecodeError, struct.error):
        return None
    if pos != len(b):
        return None
    return ImatrixData(sums, counts, datasets, int(chunks), 0, True, path)


def write_gguf(path: Path, data: ImatrixData) -> None:
    """llama-imatrix's GGUF format (save_imatrix): keys, then sums and counts per weight, sorted."""
    import gguf

    from llmops.core.atomic import atomic_file

    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch="")
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes no architecture
        w.add_type("imatrix")
        # the loader needs the key; gguf-py cannot write an empty array, so an unnamed source is "unknown"
        w.add_array(KEY_DATASETS, list(data.datasets) or ["unknown"])
        w.add_uint32(KEY_CHUNK_COUNT, int(data.chunk_count))
        w.add_uint32(KEY_CHUNK_SIZE, int(data.chunk_size))
        for name in sorted(data.sums):
            s = np.ascontiguousarray(data.sums[name], dtype=np.float32)
            c = np.ascontiguousarray(data.counts[name], dtype=np.float32).reshape(-1, 1)
            w.add_tensor(name + IN_SUM2, s.reshape(c.shape[0], -1))
            w.add_tensor(name + COUNTS, c)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def load(path: Path) -> ImatrixData | None:
    """An imatrix file, or None when ``path`` holds something else (calibration text)."""
    if is_gguf(path):
        return read_gguf(path)
    return read_legacy(path)


# ----------------------------------------------------------------------------------------------
# the request: what --imatrix names, resolved against the model being converted


@dataclass(frozen=True)
class ImatrixRequest:
    """``--imatrix FILE`` with what resolving it needs: the eval text the run is checked against
    (calibration must not overlap it) and how many chunks of text to use (None: all)."""

    path: Path
    eval_text_file: str | None = None
    chunks: int | None = None


def request_from_options(options: dict[str, Any]) -> ImatrixRequest | None:
    value = options.get("imatrix")
    if not value:
        return None
    chunks = options.get("imatrix_chunks")
    return ImatrixRequest(Path(value).expanduser().resolve(), options.get("eval_text_file"),
                          int(chunks) if chunks else None)


def check_names(data: ImatrixData, shapes: dict[str, tuple[int, ...]]) -> None:
    """llama-quantize's size check: an entry for a tensor must have one weight per column per matrix."""
    for name, shape in shapes.items():
        w = data.sums.get(name)
        if w is None:
            continue
        want = shape[-1] * (shape[0] if len(shape) == 3 else 1)
        if w.size != want and name not in ("token_embd.weight", "per_layer_token_embd.weight"):
            raise UsageError(f"imatrix {data.path}: {name} has {w.size} values, the model's tensor needs {want} "
                             "(an importance matrix of another model?)")


def resolve(req: ImatrixRequest | ImatrixData | str | os.PathLike[str], *, source: Path,
            targets: dict[str, str], scratch_dir: Path, threads: int, say: Progress) -> ImatrixData:
    """The importance matrix ``req`` names: read from a file, or computed from calibration text.

    ``targets``: checkpoint weight name -> GGUF name of the weights an importance matrix covers
    (the converter's own mapping); ``scratch_dir``: where a computed matrix is written."""
    if isinstance(req, ImatrixData):
        return req
    if not isinstance(req, ImatrixRequest):
        req = ImatrixRequest(Path(req).expanduser().resolve())
    if not req.path.is_file():
        raise UsageError(f"--imatrix {req.path}: no such file")
    data = load(req.path)
    if data is not None:
        say(f"importance matrix {req.path}: {len(data.sums)} entries, {data.chunk_count} chunks"
            + (" (legacy format)" if data.legacy else ""))
        return data
    return compute(req, source=source, targets=targets, scratch_dir=scratch_dir, threads=threads, say=say)


# ----------------------------------------------------------------------------------------------
# calibration text


def calibration_text(req: ImatrixRequest, say: Progress) -> tuple[str, int, str]:
    """(text to compute from, its character offset in the file, "file" | "eval-text tail")."""
    from llmops.core.evaltext import calibration_part, normalise
    from llmops.core.hashing import sha256_text

    try:
        text = normalise(req.path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(f"--imatrix {req.path}: neither an imatrix file nor UTF-8 text "
                         f"({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UsageError(f"--imatrix {req.path}: empty calibration text")
    ev = _eval_text(req)
    if ev is not None and sha256_text(text) == ev.sha256:
        part, offset = calibration_part(text)
        say(f"calibration text is the eval text: using its calibration part (from character {offset})")
        return part, offset, "eval-text tail"
    if ev is not None:
        refuse_overlap(text, ev.text, str(req.path))
    elif text:
        say("no eval text to compare the calibration text against: not checked for overlap")
    return text, 0, "file"


def _eval_text(req: ImatrixRequest) -> Any:
    """The eval text the run is verified on, when one is known without downloading it."""
    from llmops.core.evaltext import ENV_VAR, cached_path, load_eval_text

    if req.eval_text_file:
        return load_eval_text(req.eval_text_file)
    if os.environ.get(ENV_VAR) or cached_path().is_file():
        return load_eval_text()
    return None


def shared_lines(calibration: str, eval_text: str) -> list[str]:
    """Lines (of at least :data:`MIN_LINE` characters) calibration shares with the part of the eval
    text that evaluation scores: any is a leak of scored text into the weights."""
    from llmops.core.evaltext import evaluation_part

    scored = {ln.strip() for ln in evaluation_part(eval_text).splitlines() if len(ln.strip()) >= MIN_LINE}
    return [ln for ln in _long_lines(calibration) if ln in scored]


def _long_lines(text: str) -> Iterable[str]:
    return (s for ln in text.splitlines() if len(s := ln.strip()) >= MIN_LINE)


def refuse_overlap(calibration: str, eval_text: str, what: str) -> None:
    common = shared_lines(calibration, eval_text)
    if common:
        raise UsageError(f"calibration text {what} shares {len(common)} lines with the evaluation part of the eval "
                         f"text (first: {common[0][:60]!r}...); calibrating on scored text would flatter the "
                         "verification: use other text, or the eval text itself (its calibration part is used)")


def compute(req: ImatrixRequest, *, source: Path, targets: dict[str, str], scratch_dir: Path, threads: int,
            say: Progress) -> ImatrixData:
    """Compute the importance matrix from calibration text in a child interpreter (torch), the way
    llama-imatrix does, and write it in llama.cpp's GGUF format."""
    from llmops.core.child import run_child
    from llmops.core.hashing import sha256_file

    text, offset, kind = calibration_text(req, say)
    key = _input_key(source, text, req.chunks, targets)
    known = _index_dir() / f"{key}.json"
    if known.is_file():  # the same model, text and settings: the matrix computed before
        rec = json.loads(known.read_text())
        if Path(rec["path"]).is_file():
            say(f"importance matrix from {req.path}: computed before, {rec['path']}")
            data = read_gguf(Path(rec["path"]))
            data.calibration = rec["calibration"]
            return data
    scratch_dir.mkdir(parents=True, exist_ok=True)
    text_file = scratch_dir / "calibration.txt"
    text_file.write_text(text, encoding="utf-8")
    out = scratch_dir / "imatrix.gguf"
    job = {"source": str(source), "targets": targets, "text_file": str(text_file), "n_ctx": CHUNK_SIZE,
           "chunks": req.chunks, "threads": threads, "output": str(out), "dataset": str(req.path)}
    say(f"computing an importance matrix from {req.path} ({kind})")
    reply = run_child("llmops.converters.gguf.imatrix_worker:run", job, "importance matrix", scratch_dir,
                      progress=say)
    kept = _keep(out)
    say(f"importance matrix written to {kept}")
    data = read_gguf(kept)
    data.calibration = {"path": str(req.path), "sha256": sha256_file(req.path), "source": kind,
                        "char_offset": offset, "char_end": offset + int(reply["char_end"]),
                        "chunks": int(reply["chunks"]), "tokens_per_chunk": CHUNK_SIZE}
    from llmops.core.atomic import write_bytes_atomic

    write_bytes_atomic(known, json.dumps({"path": str(kept), "calibration": data.calibration}).encode())
    return data


def _index_dir() -> Path:
    from llmops.core.settings import cache_dir

    d = cache_dir() / "imatrix" / "computed"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _input_key(source: Path, text: str, chunks: int | None, targets: dict[str, str]) -> str:
    """What a computed matrix depends on: the source's files (path, size, mtime), the calibration
    text, the chunks and the weights covered, and the computation's own version."""
    import hashlib

    from llmops.core.checkpoint import open_checkpoint
    from llmops.core.hashing import sha256_text

    ckpt = open_checkpoint(source, validate=False)
    files = sorted({*ckpt.files, *(p for p in ckpt.root.glob("*.json"))})
    h = hashlib.sha256()
    h.update(json.dumps({"version": COMPUTE_VERSION, "chunks": chunks, "n_ctx": CHUNK_SIZE, "targets": targets,
                         "text": sha256_text(text),
                         "files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]},
                        sort_keys=True).encode())
    return h.hexdigest()


def _keep(path: Path) -> Path:
    """A computed matrix's lasting place: the llmops cache, named by its sha256 (the same text and
    model give the same file), where ``llama-quantize --imatrix`` and the registry can find it."""
    from llmops.core.hashing import sha256_file
    from llmops.core.settings import cache_dir

    dest = cache_dir() / "imatrix" / f"{sha256_file(path)}.imatrix.gguf"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.is_file():
        from llmops.core.atomic import atomic_file

        with atomic_file(dest) as tmp:
            shutil.copyfile(path, tmp)
    return dest


# ----------------------------------------------------------------------------------------------
# for the converter


def prepare(req: ImatrixRequest | ImatrixData | str | os.PathLike[str], *, source: Path,
            tensors: list[tuple[str | None, tuple[str, ...], str, tuple[int, ...], bool]], threads: int,
            say: Progress) -> tuple[ImatrixData, dict[str, np.ndarray]]:
    """The importance matrix and, per GGUF tensor to quantize, the float32 weights to quantize it
    with, as llama-quantize picks them: none where the matrix has no entry, none for a token
    embedding whose entry does not fit, an error for any other entry that does not fit.

    ``tensors``: (checkpoint name or None, stacked parts, GGUF name, numpy shape, quantized?)."""
    from llmops.core.settings import scratch

    targets: dict[str, str] = {}
    for src, parts, name, _shape, quantized in tensors:
        if not quantized:
            continue
        for s in parts or ((src,) if src else ()):
            targets[s] = name
    with scratch("llmops-imatrix-") as work:
        data = resolve(req, source=source, targets=targets, scratch_dir=Path(work), threads=threads, say=say)
    shapes = {name: shape for _s, _p, name, shape, q in tensors if q}
    check_names(data, shapes)
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        w = data.weights(name)
        if w is not None and w.size == shape[-1] * (shape[0] if len(shape) == 3 else 1):
            if not np.isfinite(w).all():
                raise UsageError(f"imatrix {data.path}: non-finite values for {name}")
            out[name] = w.reshape(-1, shape[-1])
    say(f"importance matrix covers {len(out)} of {len(shapes)} quantized tensors")
    return data, out
