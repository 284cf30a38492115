"""Lazy, memory-bounded checkpoint loading shared by every converter and the torch runner.

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
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llmops.core.errors import LLMOpsError
from llmops.core.tensorfiles import (
    _ST_DTYPES,
    TensorInfo,
    _map_range,
    _torch_dtype_name,
    _torch_to_numpy,
    load_weights_pickle,
    read_safetensors_header,
    refuse_nonfinite,
    to_float32,
)

CHUNK_BYTES = 16 << 20  # float32 bytes decoded at once when a tensor is read in row ranges

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


class Checkpoint:
    """A lazily-read checkpoint. Use :func:`open_checkpoint` to make one."""

    def __init__(self, path: Path, root: Path, config: dict[str, Any], files: list[Path], kind: str) -> None:
        self.path = path  # what the user named
        self.root = root  # folder holding config.json and the tokenizer files
        self.config = config
        self.files = files
        self.kind = kind  # "safetensors", "pickle" or "meta" or "litgpt" (views, llmops.core.layouts)
        self._infos: dict[str, TensorInfo] = {}
        self._pickle_file: Path | None = None
        self._pickle_sd: dict[str, Any] | None = None
        self._layout: Any = None
        if kind == "safetensors":
            # shard by shard, each shard's tensors by name: the order the safetensors library (and
            # llama.cpp's converter) lists them in, whatever order the header or the data has
            for f in files:
                for info in sorted(read_safetensors_header(f), key=lambda i: i.name):
                    self._infos[info.name] = info
        elif kind in ("meta", "litgpt"):
            from llmops.core.layout_litgpt import LitGPTLayout
            from llmops.core.layouts import MetaLayout

            self._layout = MetaLayout(root) if kind == "meta" else LitGPTLayout(root)
            self._infos = dict(self._layout.infos)
            self.config = self._layout.config
            self.files = list(self._layout.files)
        else:
            for f in files:
                for name, t in load_weights_pickle(f).items():
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
        if self._layout is not None:
            return self._layout.readers[name](rows)
        t = self._pickle_tensor(name)
        if rows is not None:
            t = t[rows[0]:rows[1]]
        return _torch_to_numpy(t)

    def float32(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        return to_float32(self.raw(name, rows), self._infos[name].dtype)

    def iter_float32(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._infos:
            yield name, self.float32(name)

    def row_chunks(self, name: str, chunk_bytes: int = CHUNK_BYTES,
                   block: int = 1) -> Iterator[tuple[tuple[int, int] | None, np.ndarray]]:
        """A tensor in float32 pieces of about ``chunk_bytes`` (whole rows, a multiple of ``block``
        rows), as ((first row, end row) or None for the whole tensor, array): memory stays near
        one piece whatever the tensor's size."""
        shape = self._infos[name].shape
        if len(shape) < 2:
            yield None, self.float32(name)
            return
        rows, row_elems = shape[0], math.prod(shape[1:])
        step = max(block, (chunk_bytes // max(1, row_elems * 4)) // block * block)
        for a in range(0, rows, step):
            b = min(rows, a + step)
            yield ((a, b) if (a, b) != (0, rows) else None), self.float32(name, None if (a, b) == (0, rows) else (a, b))

    def check_finite(self) -> None:
        """Refuse NaN/Inf weights (streaming: one piece of one tensor in memory at a time)."""
        for name in self.names():
            info = self._infos[name]
            if not info.is_float:
                continue
            for rows, x in self.row_chunks(name):
                refuse_nonfinite(name, x, rows or ((0, info.shape[0]) if len(info.shape) >= 2 else None))

    # -- pickles
    def _pickle_tensor(self, name: str) -> Any:
        info = self._infos[name]
        if self._pickle_file != info.file:
            self._pickle_sd = None
            self._pickle_sd = load_weights_pickle(info.file)
            self._pickle_file = info.file
        assert self._pickle_sd is not None
        return self._pickle_sd[name]

    def as_safetensors_folder(self, dest: Path, side_files: tuple[str, ...], *, float32: bool = False) -> Path:
        """A Hugging Face folder with safetensors weights holding this checkpoint, for a library
        that loads folders with ``from_pretrained`` (the ONNX builder, GPTQModel): the checkpoint's
        own folder when it is one already, else ``dest`` with links to ``side_files`` (config,
        tokenizer) and one ``model.safetensors``. Pickles are read by our weights-only loader, so
        the library never unpickles the user's file. ``float32``: floating-point tensors only,
        decoded to float32; otherwise every tensor in its own dtype."""
        if self.kind == "safetensors" and self.path.is_dir():
            return self.root
        dest.mkdir()
        for name in side_files:
            p = self.root / name
            if p.is_file():
                os.symlink(p.resolve(), dest / name)
        if not (dest / "config.json").exists():  # a layout whose config is derived (Meta's params.json)
            (dest / "config.json").write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        if self.kind == "safetensors" and len(self.files) == 1 and not float32:
            os.symlink(self.files[0].resolve(), dest / "model.safetensors")
            return dest
        import torch
        from safetensors.torch import save_file

        tensors: dict[str, Any] = {}
        for name in self.names():
            info = self.info(name)
            if float32 or info.dtype in ("F8_E4M3", "F8_E5M2"):
                if info.is_float:
                    tensors[name] = torch.from_numpy(np.ascontiguousarray(self.float32(name)).copy())
                elif not float32:
                    tensors[name] = torch.from_numpy(np.ascontiguousarray(self.raw(name)).copy())
                continue
            t = torch.from_numpy(np.ascontiguousarray(self.raw(name)).copy())
            tensors[name] = t.view(torch.bfloat16) if info.dtype == "BF16" else t
        save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
        self.close()
        return dest

    def close(self) -> None:
        if self._layout is not None:
            self._layout.close()
        self._pickle_sd = None
        self._pickle_file = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------


def _shard_files(folder: Path, index: Path, weight_map: Any) -> list[Path]:
    """The shard files an index names. A name must be a plain file name in the index's folder:
    a path (``../x``, ``/etc/x``, ``sub/x``) would read outside the checkpoint, and is refused."""
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise LLMOpsError(f"{index}: corrupt index ('weight_map' must map tensor names to file names)")
    names = list(dict.fromkeys(weight_map.values()))
    bad = [n for n in names if not n or n in (".", "..") or Path(n).name != n or "\\" in n or "\x00" in n]
    if bad:
        raise LLMOpsError(f"{index}: refusing shard name {bad[0]!r}: shards must be files in the checkpoint folder")
    files = [folder / n for n in names]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise LLMOpsError(f"{folder}: shards named in the index are missing: {', '.join(missing)}")
    return files


# Where a Hugging Face folder keeps its weights, in the order transformers looks:
# (index file, glob when there is no index, kind)
_LAYOUTS = (
    ("model.safetensors.index.json", ("*.safetensors",), "safetensors"),
    ("pytorch_model.bin.index.json", ("pytorch_model*.bin", "*.pth", "*.pt"), "pickle"),
)


def _weight_files(folder: Path) -> tuple[list[Path], str]:
    for index_name, globs, kind in _LAYOUTS:
        index = folder / index_name
        if index.is_file():
            try:
                wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except Exception:  # noqa: BLE001
                raise LLMOpsError(f"{index}: corrupt index (no 'weight_map' object)") from None
            return sorted(_shard_files(folder, index, wm)), kind
        for pattern in globs:
            found = sorted(folder.glob(pattern))
            if found:
                return found, kind
    raise LLMOpsError(f"{folder}: no weights found (expected *.safetensors, pytorch_model*.bin or *.pth)")


def open_checkpoint(source: str | os.PathLike[str], *, validate: bool = True) -> Checkpoint:
    """Open a checkpoint folder or file lazily; validates config and headers."""
    path = Path(source).expanduser()
    if not path.exists():
        raise LLMOpsError(f"{path}: no such file or folder")
    from llmops.core.layout_litgpt import is_litgpt_layout
    from llmops.core.layouts import is_meta_layout

    folder = path if path.is_dir() else path.parent
    if is_meta_layout(folder):
        return Checkpoint(path, folder, {}, [], "meta")
    if is_litgpt_layout(folder):
        return Checkpoint(path, folder, {}, [], "litgpt")
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
