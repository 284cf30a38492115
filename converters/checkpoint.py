"""Lazy, memory-bounded checkpoint loading shared by every converter.

A *source* is one of

* a Hugging Face folder: ``config.json`` plus ``*.safetensors`` (sharded with
  ``model.safetensors.index.json``), ``pytorch_model*.bin`` or ``*.pth``;
* a bare ``.safetensors`` / ``.pth`` / ``.bin`` file with a ``config.json`` beside it.

Nothing is read until asked for. Safetensors headers are parsed and checked
against the file size up front (so a truncated download fails before any output
is written); tensor bytes are memory-mapped one tensor (or one row range) at a
time, and the mapping is dropped with the array, so the resident set stays near
the size of the largest piece being converted, not the model. Pickled
checkpoints go through ``torch.load(weights_only=True, mmap=True)``: pickle code
is never executed, a pickle that needs it is refused with a one-line error.

Arrays are returned as numpy (bf16 and fp8 as raw integer bit patterns with the
logical dtype named in :class:`TensorInfo`) so that the common safetensors path
never imports torch.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmops.errors import LLMOpsError

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

# config.json fields every decoder-only checkpoint must have (first spelling is the
# canonical one, the others are older names some architectures use), with their types
REQUIRED_CONFIG_FIELDS: dict[tuple[str, ...], tuple[type, ...]] = {
    ("hidden_size", "n_embd", "d_model"): (int,),
    ("num_hidden_layers", "n_layer", "num_layers"): (int,),
    ("num_attention_heads", "n_head"): (int,),
    ("vocab_size",): (int,),
}

# Fields the converters read when present: a wrong type must be a one-line error naming the
# field, not a TypeError from deep inside a writer.
_NUM, _INT = (int, float), (int,)
OPTIONAL_CONFIG_FIELDS: dict[str, tuple[type, ...]] = {
    "intermediate_size": _INT, "num_key_value_heads": _INT, "max_position_embeddings": _INT, "head_dim": _INT,
    "sliding_window": _INT, "rms_norm_eps": _NUM, "layer_norm_eps": _NUM, "layer_norm_epsilon": _NUM,
    "rope_theta": _NUM, "partial_rotary_factor": _NUM, "query_pre_attn_scalar": _NUM,
    "attn_logit_softcapping": _NUM, "final_logit_softcapping": _NUM,
}


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
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F8_E4M3", "F8_E5M2"):
        import torch  # only fp8 checkpoints pay for torch

        tdt = torch.float8_e4m3fn if dtype == "F8_E4M3" else torch.float8_e5m2
        return torch.from_numpy(np.ascontiguousarray(arr)).view(tdt).float().numpy()
    return arr.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# config


def load_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LLMOpsError(f"{path.parent}: no config.json (a checkpoint needs its config.json beside the weights)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LLMOpsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise LLMOpsError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    # multimodal wrappers keep the language model's fields in text_config
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    return cfg


def validate_config(cfg: dict[str, Any], path: Path | str = "config.json",
                    required: dict[tuple[str, ...], tuple[type, ...]] | None = None) -> None:
    """Raise a one-line error naming the first missing or mistyped field."""
    for names, types in (required or REQUIRED_CONFIG_FIELDS).items():
        field = next((n for n in names if cfg.get(n) is not None), None)
        if field is None:
            raise LLMOpsError(f"{path}: required field {names[0]!r} is missing")
        value = cfg[field]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            want = " or ".join("a number" if t is float else "an integer" if t is int else t.__name__ for t in types)
            raise LLMOpsError(f"{path}: field {field!r} must be {want}, got {type(value).__name__} {value!r}")
        if types == (int,) and value <= 0:
            raise LLMOpsError(f"{path}: field {field!r} must be positive, got {value}")
    for name, types in OPTIONAL_CONFIG_FIELDS.items():
        value = cfg.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or isinstance(value, bool):
            want = "a number" if float in types else "an integer"
            raise LLMOpsError(f"{path}: field {name!r} must be {want}, got {type(value).__name__} {value!r}")
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise LLMOpsError(f"{path}: field {name!r} must be finite, got {value!r}")
    arch = cfg.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise LLMOpsError(f"{path}: field 'architectures' must be a list of strings, got {arch!r}")


# ----------------------------------------------------------------------------------------------
# safetensors


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
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), delta + nbytes, offset=start, access=mmap.ACCESS_READ)
    return mm, delta


# ----------------------------------------------------------------------------------------------
# the checkpoint


class Checkpoint:
    """A lazily-read checkpoint. Use :func:`open_checkpoint` to make one."""

    def __init__(self, path: Path, root: Path, config: dict[str, Any], files: list[Path], kind: str) -> None:
        self.path = path  # what the user named
        self.root = root  # folder holding config.json and the tokenizer files
        self.config = config
        self.files = files
        self.kind = kind  # "safetensors" or "pickle"
        self._infos: dict[str, TensorInfo] = {}
        self._pickle_file: Path | None = None
        self._pickle_sd: dict[str, Any] | None = None
        if kind == "safetensors":
            for f in files:
                for info in read_safetensors_header(f):
                    self._infos[info.name] = info
        else:
            for f in files:
                for name, t in self._load_pickle(f).items():
                    self._infos[name] = TensorInfo(name, _torch_dtype_name(t), tuple(t.shape), f)
            self._pickle_file, self._pickle_sd = None, None  # opened again lazily, shard by shard
        if not self._infos:
            raise LLMOpsError(f"{path}: the checkpoint holds no tensors")

    # -- introspection
    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures")
        return archs[0] if archs else None

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def parameter_count(self) -> int:
        return sum(i.numel for i in self._infos.values())

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    # -- data
    def raw(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Storage array of a tensor (or of rows [a, b) of its first dimension)."""
        info = self._infos[name]
        if self.kind == "safetensors":
            itemsize, npdt = _ST_DTYPES[info.dtype]
            shape = info.shape
            offset, nbytes = info.offset, info.nbytes
            if rows is not None:
                a, b = rows
                row_bytes = (math.prod(shape[1:]) if len(shape) > 1 else 1) * itemsize
                offset += a * row_bytes
                nbytes = (b - a) * row_bytes
                shape = (b - a, *shape[1:])
            mm, delta = _map_range(info.file, offset, nbytes)
            if mm is None:
                return np.zeros(shape, dtype=npdt)
            # the array keeps the mapping alive; it is unmapped when the array goes
            return np.frombuffer(mm, dtype=npdt, count=nbytes // itemsize, offset=delta).reshape(shape)
        t = self._pickle_tensor(name)
        if rows is not None:
            t = t[rows[0]:rows[1]]
        return _torch_to_numpy(t)

    def float32(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        return to_float32(self.raw(name, rows), self._infos[name].dtype)

    def iter_float32(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._infos:
            yield name, self.float32(name)

    # -- pickles
    def _load_pickle(self, f: Path) -> dict[str, Any]:
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

    def _pickle_tensor(self, name: str) -> Any:
        info = self._infos[name]
        if self._pickle_file != info.file:
            self._pickle_sd = None
            self._pickle_sd = self._load_pickle(info.file)
            self._pickle_file = info.file
        assert self._pickle_sd is not None
        return self._pickle_sd[name]

    def close(self) -> None:
        self._pickle_sd = None
        self._pickle_file = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


# ----------------------------------------------------------------------------------------------


def _weight_files(folder: Path) -> tuple[list[Path], str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            assert isinstance(wm, dict)
        except Exception:  # noqa: BLE001
            raise LLMOpsError(f"{index}: corrupt index (no 'weight_map' object)") from None
        files = [folder / p for p in dict.fromkeys(wm.values())]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise LLMOpsError(f"{folder}: shards named in the index are missing: {', '.join(missing)}")
        return sorted(files), "safetensors"
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return st, "safetensors"
    pt_index = folder / "pytorch_model.bin.index.json"
    if pt_index.is_file():
        try:
            wm = json.loads(pt_index.read_text(encoding="utf-8"))["weight_map"]
        except Exception:  # noqa: BLE001
            raise LLMOpsError(f"{pt_index}: corrupt index (no 'weight_map' object)") from None
        files = [folder / p for p in dict.fromkeys(wm.values())]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise LLMOpsError(f"{folder}: shards named in the index are missing: {', '.join(missing)}")
        return sorted(files), "pickle"
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return bins, "pickle"
    pths = sorted(folder.glob("*.pth")) or sorted(folder.glob("*.pt"))
    if pths:
        return pths, "pickle"
    raise LLMOpsError(f"{folder}: no weights found (expected *.safetensors, pytorch_model*.bin or *.pth)")


def open_checkpoint(source: str | os.PathLike[str], *, validate: bool = True) -> Checkpoint:
    """Open a checkpoint folder or file lazily; validates config and headers."""
    path = Path(source).expanduser()
    if not path.exists():
        raise LLMOpsError(f"{path}: no such file or folder")
    if path.is_dir():
        root = path
        files, kind = _weight_files(path)
    else:
        root = path.parent
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            kind = "safetensors"
        elif suffix in (".pth", ".pt", ".bin"):
            kind = "pickle"
        elif suffix == ".gguf":
            raise LLMOpsError(f"{path}: already a GGUF file; convert from the original checkpoint")
        else:
            raise LLMOpsError(f"{path}: not a checkpoint (expected a folder, .safetensors, .pth or .bin)")
        files = [path]
    config_path = root / "config.json"
    config = load_config(config_path)
    if validate:
        validate_config(config, config_path)
    return Checkpoint(path, root, config, files, kind)
