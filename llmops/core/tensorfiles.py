"""Tensor files read lazily and safely: safetensors headers, memory-mapped ranges, weights-only pickles.

The one safetensors header parser of llmops: every header is checked against the file
size before any byte is trusted (a truncated download or a forged header is a one-line
error, never a read outside the file). Tensor bytes are memory-mapped one tensor (or one
row range) at a time. Pickles go through ``torch.load(weights_only=True, mmap=True)``.

Arrays are returned as numpy (bf16 and fp8 as raw integer bit patterns with the logical
dtype named in :class:`TensorInfo`) so that the common safetensors path never imports torch.
"""

from __future__ import annotations

import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmops.core.errors import LLMOpsError

# safetensors dtype -> (itemsize, numpy storage dtype)
_ST_DTYPES: dict[str, tuple[int, Any]] = {
    "F64": (8, np.float64),
    "F32": (4, np.float32),
    "F16": (2, np.float16),
    "BF16": (2, np.uint16),  # raw bits; see to_float32()
    "F8_E4M3": (1, np.uint8),
    "F8_E5M2": (1, np.uint8),
    "I64": (8, np.int64),
    "I32": (4, np.int32),
    "I16": (2, np.int16),
    "I8": (1, np.int8),
    "U8": (1, np.uint8),
    "BOOL": (1, np.bool_),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit

@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling: F32, F16, BF16, ...
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute byte offset in file (safetensors only)
    nbytes: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Raw storage array -> float32 (bf16/fp8 bit patterns decoded exactly)."""
    if dtype == "F32":
        return arr if arr.dtype == np.float32 else arr.astype(np.float32)
    if dtype == "BF16":
        # one pass into the result (widen and shift in the ufunc's buffered loop): seven times
        # faster than widening to a temporary and shifting that, on a 7B checkpoint half a minute
        out = np.empty(arr.shape, dtype=np.uint32)
        np.left_shift(arr, 16, out=out, dtype=np.uint32)
        return out.view(np.float32)
    if dtype in ("F8_E4M3", "F8_E5M2"):
        import torch  # only fp8 checkpoints pay for torch

        tdt = torch.float8_e4m3fn if dtype == "F8_E4M3" else torch.float8_e5m2
        return torch.from_numpy(np.ascontiguousarray(arr)).view(tdt).float().numpy()
    return arr.astype(np.float32)


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Parse and validate a safetensors header without reading tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LLMOpsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER or n > size - 8:
                raise LLMOpsError(
                    f"{path}: corrupt or truncated safetensors file: header claims {n} bytes but the file has {size}"
                )
            raw = f.read(n)
    except OSError as e:
        raise LLMOpsError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LLMOpsError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise LLMOpsError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    data_len = size - base
    infos: list[TensorInfo] = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = meta["dtype"]
            shape = tuple(int(d) for d in meta["shape"])
            start, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise LLMOpsError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if dtype not in _ST_DTYPES:
            raise LLMOpsError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        expected = math.prod(shape) * _ST_DTYPES[dtype][0]
        if start < 0 or end < start or end - start != expected:
            raise LLMOpsError(f"{path}: corrupt safetensors header: tensor {name!r} spans {end - start} bytes, "
                              f"its shape {list(shape)} {dtype} needs {expected}")
        if end > data_len:
            raise LLMOpsError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {base + end} "
                              f"but the file has {size} bytes")
        infos.append(TensorInfo(name, dtype, shape, path, base + start, end - start))
    return infos


def _map_range(path: Path, offset: int, nbytes: int) -> tuple[mmap.mmap | None, int]:
    """Map [offset, offset+nbytes) of path read-only; returns (mapping, delta into it)."""
    if nbytes == 0:
        return None, 0
    gran = mmap.ALLOCATIONGRANULARITY
    start = (offset // gran) * gran
    delta = offset - start
    # MAP_POPULATE: the kernel maps the range's pages in one go (reading ahead what is not cached
    # yet) instead of one page fault per 4 KiB page as the data is first touched
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), delta + nbytes, flags=flags, prot=mmap.PROT_READ, offset=start)
    return mm, delta


# ----------------------------------------------------------------------------------------------
# the checkpoint



def stored_tensor_bytes(files: list[Path]) -> int:
    """Bytes of every tensor stored in these safetensors files (headers only)."""
    return sum(t.nbytes for f in files for t in read_safetensors_header(f))


def refuse_nonfinite(name: str, x: np.ndarray, rows: tuple[int, int] | None = None) -> None:
    """The one NaN/Inf check: a one-line error naming the tensor (and the rows) that hold one.

    The largest and the smallest value are both finite only if every value is (numpy's
    maximum and minimum propagate NaN; +Inf is the largest, -Inf the smallest), read without
    allocating, by vectorised reductions that together take two thirds of a sum's time (and,
    unlike a sum, never overflow on large finite values); either one not finite takes the exact
    check."""
    if x.size == 0:
        return
    with np.errstate(invalid="ignore"):
        if (x.dtype.kind == "f" and np.isfinite(np.maximum.reduce(x, axis=None))
                and np.isfinite(np.minimum.reduce(x, axis=None))):
            return
    if np.isfinite(x).all():
        return
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    where = f" in rows {rows[0]}..{rows[1] - 1}" if rows is not None else ""
    raise LLMOpsError(f"tensor {name} has {bad} NaN/Inf value(s){where}; refusing to convert "
                      "(pass allow_nonfinite=True to convert anyway)")


def load_weights_pickle(f: Path) -> dict[str, Any]:
    """A pickled state dict through ``torch.load(weights_only=True)``: code in a pickle never runs;
    one that needs it is refused with a one-line error."""
    import pickle
    import torch

    try:
        try:
            obj = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) pickles cannot be memory-mapped
                raise
            obj = torch.load(str(f), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LLMOpsError(
            f"{f}: refusing to load this pickle: it needs code or objects other than tensors to unpickle "
            f"(only weights-only pickles are accepted; {first[:200]})"
        ) from None
    except Exception as e:  # noqa: BLE001 - zip/EOF/format errors from torch
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LLMOpsError(f"{f}: not a readable PyTorch checkpoint ({msg[:200]})") from None
    sd = _find_state_dict(obj)
    if sd is None:
        raise LLMOpsError(f"{f}: no tensor state dict found in this pickle")
    return sd


def _find_state_dict(obj: Any) -> dict[str, Any] | None:
    import torch

    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if key in obj:
                found = _find_state_dict(obj[key])
                if found:
                    return found
        if tensors:
            return tensors
    return None


_TORCH_DT = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


def _torch_dtype_name(t: Any) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in _TORCH_DT:
        raise LLMOpsError(f"tensor dtype {name} is not supported")
    return _TORCH_DT[name]


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t.view(torch.uint8).numpy()
    return t.numpy()
