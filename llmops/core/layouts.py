"""Checkpoint layouts other than Hugging Face's, seen as a Hugging Face checkpoint.

A layout becomes a *view*: a config.json-style dict and Hugging Face tensor names, each
tensor assembled lazily (row ranges) from the files as they are. Every converter and the
torch runner read the view through the ``Checkpoint`` API, so each layout reaches every
target without per-target code.

Meta's original layout (and torchtune's Meta-format output): ``consolidated.NN.pth`` (one
file, or N model-parallel shards), ``params.json``, ``tokenizer.model``. The shards are
merged the way Meta's reference code cut them: column-parallel matrices (wq, wk, wv, w1, w3,
output) along dim 0, row-parallel ones (wo, w2) along dim 1, the token embedding along
whichever dimension its shards are short in (dim 1 in Llama 1/2, dim 0 in Llama 3): decided
from the shapes, never from a guessed version. Norms are replicated. Meta keeps Q and K rows
interleaved per head (rotary pairs adjacent); Hugging Face rotates halves, so those rows are
permuted back, exactly as transformers' ``convert_llama_weights_to_hf.py`` does, and the
result equals converting the same weights saved in Hugging Face layout. ``rope.freqs`` is a
cache of the rotary frequencies and is dropped. Pickles are read weights-only.

``tokenizer.model`` is SentencePiece up to Llama 2 and tiktoken BPE text from Llama 3 on (told
apart by content, ``tokenizer_model_kind``); for tiktoken the config gets the BOS/EOS ids Meta's
tokenizer numbers after the ranks, as transformers' converter writes them.

Written by hand because no library offers a lazy view: transformers' converter loads every
shard into memory and writes a new copy, which a 70 B checkpoint in 8 shards cannot afford.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmops.core.errors import LLMOpsError
from llmops.core.tensorfiles import TensorInfo, _torch_dtype_name, _torch_to_numpy, load_weights_pickle

Reader = Callable[[tuple[int, int] | None], np.ndarray]


def is_meta_layout(folder: Path) -> bool:
    return (folder / "params.json").is_file() and not (folder / "config.json").is_file() and bool(
        _meta_files(folder))


def _meta_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        files = sorted(p for p in folder.iterdir() if p.suffix in (".pth", ".pt", ".bin") and p.is_file())
    return files


_INT_FIELDS = ("dim", "n_layers", "n_heads")
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+(?:\r?\n|$)")


def tokenizer_model_kind(path: Path) -> str:
    """``"tiktoken"`` (lines of ``base64-token rank``, Llama 3 on) or ``"sentencepiece"`` (a
    protobuf, whose first byte is field 1's tag, 0x0A; anything else is left to SentencePiece
    to refuse)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return "sentencepiece"
    return "tiktoken" if _TIKTOKEN_LINE.match(head) else "sentencepiece"


def tiktoken_rank_count(path: Path) -> int:
    """The number of BPE ranks in a tiktoken file (its non-empty lines)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def read_mapping(path: Path, kind: str, parse: Callable[[str], Any], errors: tuple[type[BaseException], ...],
                 positive: tuple[str, ...]) -> dict[str, Any]:
    """A layout's config file (``kind``: JSON, YAML) as a mapping whose ``positive`` fields are
    positive integers; anything else is a one-line error naming the file and the field."""
    try:
        cfg = parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, *errors) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LLMOpsError(f"{path}: not readable {kind} ({first})") from None
    if not isinstance(cfg, dict):
        raise LLMOpsError(f"{path}: must be a {kind} object")
    for key in positive:
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise LLMOpsError(f"{path}: field {key!r} must be a positive integer, got {v!r}")
    return cfg


def meta_params(folder: Path) -> dict[str, Any]:
    path = folder / "params.json"
    params = read_mapping(path, "JSON", json.loads, (json.JSONDecodeError,), _INT_FIELDS)
    for key in ("n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
        v = params.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise LLMOpsError(f"{path}: field {key!r} must be an integer, got {v!r}")
    for key in ("norm_eps", "rope_theta", "ffn_dim_multiplier", "rope_scaling_factor"):
        v = params.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            raise LLMOpsError(f"{path}: field {key!r} must be a number, got {v!r}")
    if params["dim"] % params["n_heads"]:
        raise LLMOpsError(f"{path}: dim {params['dim']} is not a multiple of n_heads {params['n_heads']}")
    return params


def intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The feed-forward width of Meta's reference ``FeedForward``: 2/3 of 4*dim, scaled, rounded up."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_config(params: dict[str, Any], vocab_size: int, dtype: str) -> dict[str, Any]:
    """The Hugging Face LlamaConfig these params describe (as transformers' converter writes it)."""
    dim, n_heads = params["dim"], params["n_heads"]
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": intermediate_size(dim, int(params.get("multiple_of") or 256),
                                               params.get("ffn_dim_multiplier")),
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": n_heads,
        "head_dim": dim // n_heads,
        "num_key_value_heads": int(params.get("n_kv_heads") or n_heads),
        "vocab_size": vocab_size,
        "rms_norm_eps": float(params.get("norm_eps", 1e-5)),
        "rope_theta": float(params.get("rope_theta", 10000.0)),
        "max_position_embeddings": int(params.get("max_seq_len") or 2048),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": {"BF16": "bfloat16", "F16": "float16"}.get(dtype, "float32"),
    }
    if params.get("use_scaled_rope"):
        # Llama 3.1/3.2: the frequency scaling of Meta's apply_scaling(), as transformers names it
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": float(params.get("rope_scaling_factor", 8.0)),
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}
    return cfg


# Meta name -> (Hugging Face name, how shards join: 0 / 1 along that dim, None replicated)
_LAYER_NAMES = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_TOP_NAMES = {"norm.weight": "model.norm.weight", "output.weight": "lm_head.weight",
              "tok_embeddings.weight": "model.embed_tokens.weight"}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_DROPPED = ("rope.freqs",)


class MetaLayout:
    """The tensors of a Meta-layout folder as Hugging Face tensors, each read lazily."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.params = meta_params(folder)
        self.files = _meta_files(folder)
        self._sd: dict[Path, dict[str, Any]] = {}
        shards = [self._state(f) for f in self.files]
        names = set(shards[0])
        for f, sd in zip(self.files[1:], shards[1:]):
            if set(sd) != names:
                extra = sorted(set(sd) ^ names)[:3]
                raise LLMOpsError(f"{f}: the model-parallel shards disagree in their tensors ({', '.join(extra)})")
        dim, n_heads = self.params["dim"], self.params["n_heads"]
        self.n_kv = int(self.params.get("n_kv_heads") or n_heads)
        self.head_dim = dim // n_heads
        self.infos: dict[str, TensorInfo] = {}
        self.readers: dict[str, Reader] = {}
        self.dtype = "F32"
        for meta in sorted(names, key=_order):
            if meta.startswith(_DROPPED):
                continue
            hf, join = self._hf_name(meta)
            parts = [sd[meta] for sd in shards]
            shape = self._joined_shape(meta, hf, parts, join)
            dtype = _torch_dtype_name(parts[0])
            if meta == "tok_embeddings.weight":
                self.dtype = dtype
            self.infos[hf] = TensorInfo(hf, dtype, shape, self.files[0])
            self.readers[hf] = self._reader(meta, hf, shape, join)
        # in the order a Hugging Face save of these weights lists them (safetensors sorts by name),
        # so every converter writes the same file whichever layout the weights came in
        self.infos = dict(sorted(self.infos.items()))
        if "model.embed_tokens.weight" not in self.infos:
            raise LLMOpsError(f"{folder}: no tok_embeddings.weight in {self.files[0].name}")
        vocab = self.infos["model.embed_tokens.weight"].shape[0]
        declared = self.params.get("vocab_size")
        if declared not in (None, -1) and declared != vocab:
            raise LLMOpsError(f"{folder / 'params.json'}: vocab_size {declared} but the embedding has {vocab} rows")
        self.config = meta_config(self.params, vocab, self.dtype)
        tok = folder / "tokenizer.model"
        if tok.is_file() and tokenizer_model_kind(tok) == "tiktoken":
            # Meta's tokenizer.py: <|begin_of_text|> and <|end_of_text|> follow the ranks
            n = tiktoken_rank_count(tok)
            self.config.update(bos_token_id=n, eos_token_id=n + 1)
        self._check_shapes()

    def _state(self, f: Path) -> dict[str, Any]:
        """A shard's tensors, memory-mapped (kept open: mapped pages cost no resident memory)."""
        if f not in self._sd:
            self._sd[f] = load_weights_pickle(f)
        return self._sd[f]

    def _hf_name(self, meta: str) -> tuple[str, int | None]:
        if meta in _TOP_NAMES:
            return _TOP_NAMES[meta], (0 if meta == "output.weight" else -1 if meta.startswith("tok_") else None)
        m = _LAYER.match(meta)
        if m and m.group(2) in _LAYER_NAMES:
            hf, join = _LAYER_NAMES[m.group(2)]
            return f"model.layers.{m.group(1)}.{hf}", join
        raise LLMOpsError(f"{self.files[0]}: tensor {meta!r} is not part of Meta's Llama layout")

    def _joined_shape(self, meta: str, hf: str, parts: list[Any], join: int | None) -> tuple[int, ...]:
        shapes = [tuple(p.shape) for p in parts]
        if len(parts) == 1:
            return shapes[0]
        if join == -1:  # the token embedding: split along the dimension its shards are short in
            join = 1 if shapes[0][1] * len(parts) == self.params["dim"] else 0
            self._emb_join = join
        if join is None:
            if len(set(shapes)) != 1:
                raise LLMOpsError(f"{self.folder}: shards disagree in the shape of {meta}: {shapes}")
            return shapes[0]
        rest = [s[:join] + s[join + 1:] for s in shapes]
        if len(set(rest)) != 1:
            raise LLMOpsError(f"{self.folder}: shards disagree in the shape of {meta}: {shapes}")
        full = list(shapes[0])
        full[join] = sum(s[join] for s in shapes)
        return tuple(full)

    def _expected(self) -> dict[str, tuple[int, ...]]:
        p, hd = self.params, self.head_dim
        dim, ff = p["dim"], self.config["intermediate_size"]
        out: dict[str, tuple[int, ...]] = {"model.norm.weight": (dim,)}
        for i in range(p["n_layers"]):
            pre = f"model.layers.{i}."
            out.update({
                pre + "self_attn.q_proj.weight": (p["n_heads"] * hd, dim),
                pre + "self_attn.k_proj.weight": (self.n_kv * hd, dim),
                pre + "self_attn.v_proj.weight": (self.n_kv * hd, dim),
                pre + "self_attn.o_proj.weight": (dim, p["n_heads"] * hd),
                pre + "mlp.gate_proj.weight": (ff, dim), pre + "mlp.up_proj.weight": (ff, dim),
                pre + "mlp.down_proj.weight": (dim, ff),
                pre + "input_layernorm.weight": (dim,), pre + "post_attention_layernorm.weight": (dim,),
            })
        return out

    def _check_shapes(self) -> None:
        for name, want in self._expected().items():
            got = self.infos.get(name)
            if got is None:
                raise LLMOpsError(f"{self.folder}: {name} is missing (params.json says {self.params['n_layers']} "
                                  "layers)")
            if got.shape != want:
                raise LLMOpsError(f"{self.folder}: {name} has shape {list(got.shape)}, params.json implies "
                                  f"{list(want)}")

    def _reader(self, meta: str, hf: str, shape: tuple[int, ...], join: int | None) -> Reader:
        if join == -1:
            join = getattr(self, "_emb_join", 0) if len(self.files) > 1 else None
        n_head = None
        if hf.endswith("q_proj.weight"):
            n_head = self.params["n_heads"]
        elif hf.endswith("k_proj.weight"):
            n_head = self.n_kv

        def read(rows: tuple[int, int] | None) -> np.ndarray:
            a, b = rows if rows is not None else (0, shape[0] if shape else 1)
            meta_rows = np.arange(a, b)
            if n_head is not None:
                meta_rows = _meta_row_of(meta_rows, shape[0] // n_head)
            return self._gather(meta, join, meta_rows, rows is None and n_head is None)

        return read

    def _gather(self, meta: str, join: int | None, rows: np.ndarray, whole: bool) -> np.ndarray:
        parts = [_torch_to_numpy(self._state(f)[meta]) for f in (self.files if join is not None else self.files[:1])]
        if len(parts) == 1:
            return parts[0] if whole else parts[0][rows]
        if join == 1:  # each shard holds some columns of every row
            return np.concatenate([part if whole else part[rows] for part in parts], axis=1)
        if whole:
            return np.concatenate(parts, axis=0)
        # each shard holds a block of rows: take the wanted ones in ascending order, then reorder
        wanted = np.unique(rows)
        pieces, start = [], 0
        for part in parts:
            n = part.shape[0]
            sel = wanted[(wanted >= start) & (wanted < start + n)] - start
            if len(sel):
                pieces.append(part[sel])
            start += n
        got = np.concatenate(pieces, axis=0) if len(pieces) > 1 else pieces[0]
        return got if np.array_equal(wanted, rows) else got[np.searchsorted(wanted, rows)]

    def close(self) -> None:
        self._sd = {}


def _meta_row_of(hf_rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Meta's row for each Hugging Face Q/K row: within a head, HF row t*half+i is Meta row 2i+t."""
    half = head_dim // 2
    head, p = np.divmod(hf_rows, head_dim)
    t, i = np.divmod(p, half)
    return head * head_dim + 2 * i + t


def _order(name: str) -> tuple[int, str]:
    m = _LAYER.match(name)
    return (int(m.group(1)) + 1, name) if m else ((0 if name.startswith("tok_") else 10**9), name)
