"""llama.cpp's quantization, called through ctypes, and its per-tensor type choice.

* The block quantizers (Q4_0, Q8_0, the K-quants, the I-quants) are llama.cpp's own:
  ``ggml_quantize_chunk`` exported by ``libggml-base`` (shipped inside
  llama-cpp-python), with its optional importance matrix (one weight per input column,
  per expert for stacked experts).
* The per-tensor type choice of the mixes (which layers' ``attn_v`` and ``ffn_down`` get
  more bits, the fallbacks when a row length is not a multiple of the block size, the
  output/token-embedding rules, what changes when an importance matrix is given) is a
  port of llama.cpp's ``llama_tensor_get_type`` (``src/llama-quant.cpp``), in
  :func:`compute_types`. A port rather than a call: llama.cpp's exported helper
  (``llama_quant_compute_types``) always assumes no importance matrix, which picks
  different types for the IQ4 and Q4_0 mixes. The helper stays available as
  :func:`llama_compute_types`, the reference the port is tested against.

Everything runs on float32 rows; ``ggml_quantize_chunk`` releases the GIL, so
row slabs are quantized on a thread pool.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llmops.core.errors import LLMOpsError

QT = GGMLQuantizationType


def row_size(qtype: QT, n_per_row: int) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    return (n_per_row // block) * type_size


def nbytes(qtype: QT, shape: Sequence[int]) -> int:
    """Bytes of a tensor of numpy shape ``shape`` (last axis = row) stored as qtype."""
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * row_size(qtype, shape[-1])


def _lib_dir() -> str:
    """llama-cpp-python's library folder, found without importing its Python package (which
    costs a conversion a sixth of a second); its libraries find each other by their RUNPATH."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        raise LLMOpsError("llama-cpp-python is not installed; it provides llama.cpp's quantizer")
    return os.path.join(os.path.dirname(spec.origin), "lib")


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _QuantModelDesc(ctypes.Structure):  # struct llama_quant_model_desc (llama-ext.h)
    _fields_ = [("architecture", ctypes.c_char_p)] + [
        (n, ctypes.c_uint32)
        for n in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v")
    ]


@lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(os.path.join(_lib_dir(), "libggml-base.so"))
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_init.argtypes = [_InitParams]
    lib.ggml_init.restype = ctypes.c_void_p
    lib.ggml_free.argtypes = [ctypes.c_void_p]
    lib.ggml_free.restype = None
    lib.ggml_new_tensor.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    lib.ggml_new_tensor.restype = ctypes.c_void_p
    lib.ggml_set_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_set_name.restype = ctypes.c_void_p
    lib.ggml_fp16_to_fp32_row.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.ggml_fp16_to_fp32_row.restype = None
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    return lib


@lru_cache(maxsize=None)
def thread_pool(n: int) -> ThreadPoolExecutor:
    """One pool of ``n`` threads for the whole conversion: a tensor arrives in thousands of
    chunks, and starting threads for each would cost more than some chunks' work."""
    return ThreadPoolExecutor(n, thread_name_prefix="llmops-gguf")


@lru_cache(maxsize=1)
def _ggml_cpu() -> ctypes.CDLL:
    lib = ctypes.CDLL(os.path.join(_lib_dir(), "libggml-cpu.so"))
    for fn in (lib.ggml_cpu_fp32_to_fp16, lib.ggml_cpu_fp16_to_fp32):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
    return lib


def to_f16(x: np.ndarray, *, finite: bool = False) -> np.ndarray:
    """``x.astype(np.float16)``, the same bits, six times faster: ggml's vectorised conversion
    (F16C/AVX-512 where the CPU has them; numpy's cast is scalar) rounds to nearest even exactly
    as numpy does for every finite value and infinity. NaN payloads are the one difference
    (ggml quiets them), so an input holding a NaN takes numpy's cast. Releases the GIL.

    ``finite``: the caller has already proved ``x`` holds no NaN (the converter's one check of the
    source), which spares a pass over it."""
    src = np.ascontiguousarray(x, dtype=np.float32)
    if not finite and np.isnan(np.add.reduce(src, axis=None)):  # also NaN for +inf and -inf together: numpy then, still exact
        return src.astype(np.float16)
    out = np.empty(src.shape, dtype=np.float16)
    _ggml_cpu().ggml_cpu_fp32_to_fp16(src.ctypes.data, out.ctypes.data, src.size)
    return out


def f16_to_f32(x: np.ndarray, *, finite: bool = False) -> np.ndarray:
    """float16 -> float32 with the conversion llama.cpp's quantizer reads an F16 file with
    (``ggml_fp16_to_fp32_row``): numpy's values for every non-NaN input, half again as fast.

    ``finite``: ``x`` holds no NaN (it is ``to_f16`` of checked data), so ggml's vectorised
    conversion (F16C/AVX-512), whose bits differ from the row conversion's in NaN payloads only,
    does it eight times faster: on a 7B checkpoint a quarter of a minute of CPU."""
    src = np.ascontiguousarray(x, dtype=np.float16)
    out = np.empty(src.shape, dtype=np.float32)
    n, done = src.size, 0
    if finite:
        # this build's vectorised loop leaves a tail that is not a whole vector unconverted
        # (measured: every length not a multiple of 4); the row conversion does the tail
        done = n - n % 16
        _ggml_cpu().ggml_cpu_fp16_to_fp32(src.ctypes.data, out.ctypes.data, done)
    if done < n:
        _ggml().ggml_fp16_to_fp32_row(src.ctypes.data + 2 * done, out.ctypes.data + 4 * done, n - done)
    return out


def submit_quantize_rows(data: np.ndarray, qtype: QT, threads: int = 1, imatrix: np.ndarray | None = None,
                         first_row: int = 0, rows_per_matrix: int | None = None, *,
                         via_f16: bool = False, finite: bool = False) -> Callable[[], np.ndarray]:
    """Quantize a C-contiguous float32 array (rows along the last axis) with ggml, on the shared
    pool; the returned function waits and gives the raw bytes.

    A converter submits the next chunk before it waits for this one, so the pool's threads never
    idle at the tail of a chunk (its last span running on one core while the other waits): on a
    7B checkpoint, thousands of such barriers.

    ``imatrix``: the importance of each input column, float32 ``[n_per_row]`` or, for stacked
    experts, ``[n_matrices, n_per_row]``; row ``r`` of ``data`` is row ``first_row + r`` of
    the whole tensor and uses the weights of matrix ``(first_row + r) // rows_per_matrix``,
    as llama.cpp's ``llama_tensor_quantize_impl`` does (no slab crosses a matrix boundary).

    ``via_f16``: quantize what an F16 file of ``data`` holds (what llama.cpp's quantizer reads back
    from convert_hf_to_gguf.py's output). Each thread rounds its own slab, so the round trip runs on
    every core instead of before the quantizer on one; ``finite`` as for :func:`to_f16`."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    n_per_row = data.shape[-1]
    nrows = data.size // n_per_row if n_per_row else 0
    rs = row_size(qtype, n_per_row)
    out = np.empty(nrows * rs, dtype=np.uint8)
    if nrows == 0:
        return lambda: out
    lib = _ggml()
    im = None
    if imatrix is not None:
        im = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1, n_per_row)
        rows_per_matrix = rows_per_matrix or (first_row + nrows)
    elif lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise LLMOpsError(f"{qtype.name} cannot be quantized without an importance matrix")
    lib.ggml_quantize_init(int(qtype))
    src = data.ctypes.data
    dst = out.ctypes.data

    rows2d = data.reshape(nrows, n_per_row)

    def work(a: int, b: int) -> int:
        w = None
        if im is not None:
            w = im[(first_row + a) // rows_per_matrix].ctypes.data
        if via_f16:
            slab = f16_to_f32(to_f16(rows2d[a:b], finite=finite), finite=finite)
            return lib.ggml_quantize_chunk(int(qtype), slab.ctypes.data, dst + a * rs, 0, b - a, n_per_row, w)
        return lib.ggml_quantize_chunk(int(qtype), src + a * n_per_row * 4, dst + a * rs, 0, b - a, n_per_row, w)

    threads = max(1, min(threads, nrows))
    step = nrows if threads == 1 or data.size < (1 << 16) else -(-nrows // (threads * 4))
    spans = []
    for a in range(0, nrows, step):
        b = min(a + step, nrows)
        if im is not None:  # split at matrix boundaries: each span uses one matrix's weights
            while (first_row + a) // rows_per_matrix != (first_row + b - 1) // rows_per_matrix:
                cut = ((first_row + a) // rows_per_matrix + 1) * rows_per_matrix - first_row
                spans.append((a, cut))
                a = cut
        spans.append((a, b))
    if len(spans) == 1 or threads == 1:
        results: list[Any] = [work(a, b) for a, b in spans]
    else:
        pool = thread_pool(threads)
        results = [pool.submit(work, a, b) for a, b in spans]

    def result() -> np.ndarray:
        done = sum(r if isinstance(r, int) else r.result() for r in results)
        if done != out.size:
            raise LLMOpsError(f"ggml quantizer wrote {done} bytes for {qtype.name}, expected {out.size}")
        return out  # ``data`` (and its mapping) stays alive in ``work`` until every span is done

    return result


# ----------------------------------------------------------------------------------------------
# per-tensor type choice


@contextlib.contextmanager
def quiet_llama() -> Iterator[None]:
    """Silence llama.cpp's log callback (fallback warnings etc.) for the duration."""
    try:
        from llama_cpp import _logger
    except ImportError:  # pragma: no cover
        yield
        return
    old = _logger.logger.level
    _logger.logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        _logger.logger.setLevel(old)


@lru_cache(maxsize=1)
def _quant_api() -> tuple[ctypes._CFuncPtr, ...] | None:
    from llama_cpp import llama_cpp as L

    lib = L._lib
    names = (
        "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc",
        "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params",
        "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem",
        "_Z16llama_quant_freeP19quantize_state_impl",
    )
    try:
        f_model, f_init, f_types, f_free = (getattr(lib, n) for n in names)
    except AttributeError:
        return None
    f_model.argtypes = [ctypes.POINTER(_QuantModelDesc)]
    f_model.restype = ctypes.c_void_p
    f_init.argtypes = [ctypes.c_void_p, ctypes.POINTER(L.llama_model_quantize_params)]
    f_init.restype = ctypes.c_void_p
    f_types.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int), ctypes.c_size_t,
    ]
    f_types.restype = None
    f_free.argtypes = [ctypes.c_void_p]
    f_free.restype = None
    return f_model, f_init, f_types, f_free


_LAYER = re.compile(r"^blk\.(\d+)\.")


def llama_tensor_order(names: Sequence[str]) -> list[str]:
    """The order llama.cpp's loader (and so its quantizer) walks tensors: by layer, then name."""

    def key(n: str) -> tuple[int, str]:
        m = _LAYER.match(n)
        return (int(m.group(1)) if m else -1, n)

    return sorted(names, key=key)


# ----------------------------------------------------------------------------------------------
# the port of llama.cpp's per-tensor type choice (src/llama-quant.cpp of the llama.cpp that
# llama-cpp-python vendors): tensor_allows_quantization, tensor_get_category,
# llama_tensor_get_type(_impl), tensor_type_fallback, tensor_requires_imatrix and
# llama_ftype_get_default_type. The MXFP4_MOE mix and the GLM5-next and BailingMoE3
# special cases are left out: llmops offers neither that mix nor those architectures.

FT = {name: value for name, value in (
    ("F32", 0), ("F16", 1), ("Q4_0", 2), ("Q4_1", 3), ("Q8_0", 7), ("Q5_0", 8), ("Q5_1", 9), ("Q2_K", 10),
    ("Q3_K_S", 11), ("Q3_K_M", 12), ("Q3_K_L", 13), ("Q4_K_S", 14), ("Q4_K_M", 15), ("Q5_K_S", 16),
    ("Q5_K_M", 17), ("Q6_K", 18), ("IQ2_XXS", 19), ("IQ2_XS", 20), ("Q2_K_S", 21), ("IQ3_XS", 22),
    ("IQ3_XXS", 23), ("IQ1_S", 24), ("IQ4_NL", 25), ("IQ3_S", 26), ("IQ3_M", 27), ("IQ2_S", 28), ("IQ2_M", 29),
    ("IQ4_XS", 30), ("IQ1_M", 31), ("BF16", 32), ("TQ1_0", 36), ("TQ2_0", 37),
)}  # llama_ftype (llama.h)

_DEFAULT_TYPE = {  # llama_ftype_get_default_type
    "F32": QT.F32, "F16": QT.F16, "BF16": QT.BF16, "Q4_0": QT.Q4_0, "Q4_1": QT.Q4_1, "Q5_0": QT.Q5_0,
    "Q5_1": QT.Q5_1, "Q8_0": QT.Q8_0, "Q2_K_S": QT.Q2_K, "Q2_K": QT.Q2_K, "IQ3_XS": QT.IQ3_S, "Q3_K_S": QT.Q3_K,
    "Q3_K_M": QT.Q3_K, "Q3_K_L": QT.Q3_K, "Q4_K_S": QT.Q4_K, "Q4_K_M": QT.Q4_K, "Q5_K_S": QT.Q5_K,
    "Q5_K_M": QT.Q5_K, "Q6_K": QT.Q6_K, "TQ1_0": QT.TQ1_0, "TQ2_0": QT.TQ2_0, "IQ2_XXS": QT.IQ2_XXS,
    "IQ2_XS": QT.IQ2_XS, "IQ2_S": QT.IQ2_XS, "IQ2_M": QT.IQ2_S, "IQ3_XXS": QT.IQ3_XXS, "IQ1_S": QT.IQ1_S,
    "IQ1_M": QT.IQ1_M, "IQ4_NL": QT.IQ4_NL, "IQ4_XS": QT.IQ4_XS, "IQ3_S": QT.IQ3_S, "IQ3_M": QT.IQ3_S,
}

# where a row length is not a multiple of the block size (tensor_type_fallback)
_FALLBACK = {
    QT.IQ1_S: QT.IQ4_NL, QT.IQ1_M: QT.IQ4_NL, QT.IQ2_XXS: QT.IQ4_NL, QT.IQ2_XS: QT.IQ4_NL, QT.IQ2_S: QT.IQ4_NL,
    QT.IQ3_XXS: QT.IQ4_NL, QT.IQ3_S: QT.IQ4_NL, QT.IQ4_XS: QT.IQ4_NL,
    QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.TQ1_0: QT.Q4_0, QT.TQ2_0: QT.Q4_0,
    QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0,
}

_NO_QUANT_PARTS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    *(f"time_mix_{k}.weight" for k in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2",
                                       "decay_w1", "decay_w2", "lerp_fused")),
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)


def allows_quantization(name: str, n_dims: int) -> bool:
    """llama.cpp's tensor_allows_quantization (default parameters)."""
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(part in name for part in _NO_QUANT_PARTS)


def _category(name: str) -> str:
    """llama.cpp's tensor_get_category: broad roles by name, checked in its order."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                      ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                      ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                      ("ffn_down", "ffn_down")):
        if part in name:
            return cat
    return "other"


def _is_attn_v(cat: str) -> bool:
    return cat in ("attn_v", "attn_qkv", "attn_kv_b")


def _block(qtype: QT) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def _is_quantized(qtype: QT) -> bool:
    return qtype not in (QT.F32, QT.F16, QT.BF16, QT.F64, QT.I8, QT.I16, QT.I32, QT.I64)


class _State:
    """quantize_state_impl: the counters the choice walks with."""

    def __init__(self, arch: str, hparams: dict[str, int], names: Sequence[str], has_imatrix: bool) -> None:
        self.arch = arch
        self.n_expert = int(hparams.get("n_expert", 0))
        n_head, n_kv = int(hparams.get("n_head", 0)), int(hparams.get("n_head_kv", 0))
        self.n_gqa = n_head // n_kv if n_kv else 0
        n_layer = int(hparams.get("n_layer", 0))
        # llama_quant_model_from_metadata's (and the loader's) LLM_TYPE_70B, the one size the choice reads
        self.is_70b = arch == "llama" and n_layer == 80 and n_head != n_kv
        self.has_imatrix = has_imatrix
        cats = [_category(n) for n in names]
        self.n_attention_wv = sum(_is_attn_v(c) for c in cats)
        self.has_tied_embeddings = "output" not in cats
        self.n_ffn_down = self.n_ffn_gate = self.n_ffn_up = n_layer
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer_info(qs: _State, i_layer: int, n_layer: int, name: str) -> tuple[int, int]:
    if max(1, qs.n_expert) > 1:  # experts: the layer comes from the name, not the counter
        m = _LAYER.match(name)
        if not m:
            raise LLMOpsError(f"cannot determine the layer of tensor {name}")
        i_layer = int(m.group(1))
        if not 0 <= i_layer < n_layer:
            raise LLMOpsError(f"bad layer {i_layer} for tensor {name}: must be in [0, {n_layer})")
    return i_layer, n_layer


def _choose(qs: _State, new_type: QT, name: str, ne0: int, ftype: str, cat: str) -> QT:  # noqa: C901, PLR0912
    """llama_tensor_get_type_impl, branch for branch (ftypes by name)."""
    arch, n_exp = qs.arch, qs.n_expert
    falcon = arch == "falcon"
    low_iq = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
    if cat == "output" or (qs.has_tied_embeddings and cat == "token_embd"):
        if falcon or ne0 % _block(new_type) != 0:
            new_type = QT.Q8_0
        elif ftype in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            new_type = QT.Q5_K
        elif new_type != QT.Q8_0:
            new_type = QT.Q6_K
    elif cat == "token_embd":
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            new_type = QT.Q2_K
        elif ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            new_type = QT.IQ3_S
        elif ftype in ("TQ1_0", "TQ2_0"):
            new_type = QT.Q4_K
    elif ftype in low_iq:
        iq2sm = ftype in ("IQ2_S", "IQ2_M")
        if _is_attn_v(cat):
            if qs.n_gqa >= 4 or n_exp >= 4:
                new_type = QT.Q4_K
            else:
                new_type = QT.IQ3_S if iq2sm else QT.Q2_K
            qs.i_attention_wv += 1
        elif n_exp == 8 and cat == "attn_k":
            new_type = QT.Q4_K
        elif cat == "ffn_down":
            if qs.i_ffn_down < qs.n_ffn_down // 8:
                new_type = QT.IQ3_S if iq2sm else QT.Q2_K
            qs.i_ffn_down += 1
        elif cat == "attn_output":
            if n_exp == 8:
                new_type = QT.Q5_K
            elif ftype in ("IQ1_S", "IQ1_M"):
                new_type = QT.IQ2_XXS
            elif iq2sm:
                new_type = QT.IQ3_S
    elif _is_attn_v(cat):
        gqa4 = qs.n_gqa >= 4
        if ftype == "Q2_K":
            new_type = QT.Q4_K if gqa4 else QT.Q3_K
        elif ftype == "Q2_K_S" and gqa4:
            new_type = QT.Q4_K
        elif ftype == "IQ3_XXS":
            new_type = QT.Q4_K if gqa4 else (QT.IQ3_S if not qs.has_imatrix else QT.IQ3_XXS)
        elif ftype in ("IQ3_XS", "IQ3_S") and gqa4:
            new_type = QT.Q4_K
        elif ftype == "IQ3_M":
            new_type = QT.Q4_K
        elif ftype == "Q3_K_M":
            new_type = QT.Q5_K if qs.i_attention_wv < 2 else QT.Q4_K
        elif ftype == "Q3_K_L":
            new_type = QT.Q5_K
        elif ftype in ("IQ4_NL", "IQ4_XS") and gqa4:
            new_type = QT.Q5_K
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new_type = QT.Q6_K
        elif ftype == "Q4_K_S" and qs.i_attention_wv < 4:
            new_type = QT.Q5_K
        if qs.is_70b and new_type in (QT.Q3_K, QT.Q4_K):
            new_type = QT.Q5_K
        if n_exp == 8:
            new_type = QT.Q8_0
        qs.i_attention_wv += 1
    elif cat == "attn_k":
        if n_exp == 8:
            new_type = QT.Q8_0
        elif ftype == "IQ3_XS":
            new_type = QT.IQ3_XXS
        elif ftype == "IQ3_XXS":
            new_type = QT.IQ2_S
    elif cat == "attn_q":
        if ftype == "IQ3_XS":
            new_type = QT.IQ3_XXS
        elif ftype == "IQ3_XXS":
            new_type = QT.IQ2_S
    elif cat == "ffn_down":
        i, n = _layer_info(qs, qs.i_ffn_down, qs.n_ffn_down, name)
        if ftype == "Q2_K":
            new_type = QT.Q3_K
        elif ftype == "Q2_K_S":
            if i < n // 8:
                new_type = QT.Q4_K
        elif ftype == "IQ3_XXS" and not qs.has_imatrix:
            new_type = QT.Q4_K if i < n // 8 else QT.Q3_K
        elif ftype == "Q3_K_M":
            new_type = (QT.Q5_K if i < n // 16
                        else QT.Q4_K if (not falcon or _use_more_bits(i, n)) else QT.Q3_K)
        elif ftype == "IQ3_M" and (i < n // 8 or (n_exp == 8 and _use_more_bits(i, n))):
            new_type = QT.Q4_K
        elif ftype == "Q3_K_L":
            new_type = QT.Q4_K if falcon else QT.Q5_K
        elif ftype == "Q4_K_M":
            if falcon:
                new_type = QT.Q6_K if i < n // 16 else QT.Q5_K if _use_more_bits(i, n) else QT.Q4_K
            elif _use_more_bits(i, n):
                new_type = QT.Q6_K
        elif i < n // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not qs.has_imatrix:
            new_type = QT.Q5_K
        elif ftype == "Q5_K_M" and _use_more_bits(i, n):
            new_type = QT.Q6_K
        elif ftype == "Q4_K_S" and not falcon and i < n // 8:
            new_type = QT.Q5_K
        elif ftype in ("Q4_0", "Q5_0") and qs.has_imatrix and i < n // 8:
            # llama.cpp guards the first ffn_down layers of Q4_0/Q5_0, only with an importance matrix
            new_type = QT.Q4_1 if ftype == "Q4_0" else QT.Q5_1
        qs.i_ffn_down += 1
    elif cat == "attn_output":
        if not falcon:
            if n_exp == 8:
                if ftype in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                             "IQ3_M", "IQ4_XS"):
                    new_type = QT.Q5_K
            else:
                new_type = {"Q2_K": QT.Q3_K, "IQ3_XXS": QT.IQ3_S, "Q3_K_M": QT.Q4_K, "Q3_K_L": QT.Q5_K,
                            "IQ3_M": QT.Q4_K}.get(ftype, new_type)
        elif ftype == "Q3_K_L":
            new_type = QT.Q4_K
    elif cat == "attn_qkv":  # unreachable in llama.cpp too (attn_qkv is attn_v-like); kept for parity
        if ftype in ("Q3_K_M", "Q3_K_L", "IQ3_M"):
            new_type = QT.Q4_K
        elif ftype == "Q4_K_M":
            new_type = QT.Q5_K
        elif ftype == "Q5_K_M":
            new_type = QT.Q6_K
    elif cat in ("ffn_gate", "ffn_up"):
        if cat == "ffn_gate":
            i, n = _layer_info(qs, qs.i_ffn_gate, qs.n_ffn_gate, name)
            qs.i_ffn_gate += 1
        else:
            i, n = _layer_info(qs, qs.i_ffn_up, qs.n_ffn_up, name)
            qs.i_ffn_up += 1
        if ftype == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            new_type = QT.IQ3_XXS
    return new_type


def _fallback(qtype: QT, ne0: int) -> QT:
    """tensor_type_fallback: a type whose block divides the row, else F16."""
    if ne0 % _block(qtype) == 0:
        return qtype
    if qtype in _FALLBACK:
        out = _FALLBACK[qtype]
    elif _block(qtype) <= 32:
        out = qtype
    else:
        raise LLMOpsError(f"no tensor type fallback is defined for type {qtype.name}")
    return out if ne0 % _block(out) == 0 else QT.F16


def ftype_name(ftype: int) -> str:
    for name, value in FT.items():
        if value == ftype:
            return name
    raise LLMOpsError(f"llama_ftype {ftype} is not supported")


def compute_types(
    arch: str,
    ftype: int,
    tensors: Sequence[tuple[str, tuple[int, ...], QT]],
    hparams: dict[str, int],
    has_imatrix: bool = False,
) -> dict[str, QT]:
    """Per-tensor ggml types llama.cpp's quantizer picks for ``ftype`` (llama_tensor_get_type).

    ``tensors``: (gguf name, numpy shape, type the tensor has in the F16 file), all of the
    model's tensors: the counters (how many ``attn_v``), tied embeddings (no ``output.weight``)
    and the order llama.cpp walks them in depend on the whole list.
    ``hparams``: n_layer, n_head, n_head_kv, n_expert (as :meth:`Family.quant_hparams`).
    ``has_imatrix``: an importance matrix is given (the choice differs for IQ3_XXS, IQ4_NL,
    IQ4_XS, Q4_0, Q5_0)."""
    name_ft = ftype_name(ftype)
    default = _DEFAULT_TYPE[name_ft]
    ordered = llama_tensor_order([t[0] for t in tensors])
    by_name = {t[0]: t for t in tensors}
    qs = _State(arch, hparams, ordered, has_imatrix)
    out: dict[str, QT] = {}
    for name in ordered:
        _, shape, cur = by_name[name]
        if not allows_quantization(name, len(shape)):
            out[name] = cur
            continue
        new_type = default
        if _is_quantized(default):
            new_type = _choose(qs, new_type, name, int(shape[-1]), name_ft, _category(name))
            new_type = _fallback(new_type, int(shape[-1]))
        out[name] = new_type
    return out


def requires_imatrix(name: str, qtype: QT, ftype: int) -> bool:
    """llama.cpp's tensor_requires_imatrix: the types llama-quantize refuses to make without one."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if qtype in (QT.IQ3_XXS, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ1_M, QT.IQ1_S):
        return True
    return qtype == QT.Q2_K and ftype == FT["Q2_K_S"]


def llama_compute_types(
    arch: str,
    ftype: int,
    tensors: Sequence[tuple[str, tuple[int, ...], QT]],
    hparams: dict[str, int],
) -> dict[str, QT] | None:
    """Per-tensor ggml types from llama.cpp's own helper (``llama_quant_compute_types``), which
    always assumes no importance matrix: the reference :func:`compute_types` is tested against.

    ``tensors``: (gguf name, numpy shape, type the tensor has in the F16 file).
    ``hparams``: n_embd, n_ff, n_layer, n_head, n_head_kv, n_expert, n_embd_head_k, n_embd_head_v.
    Returns None when this llama.cpp build does not export the helper.
    """
    api = _quant_api()
    if api is None:
        return None
    f_model, f_init, f_types, f_free = api
    from llama_cpp import llama_cpp as L

    lib = _ggml()
    ordered = llama_tensor_order([t[0] for t in tensors])
    by_name = {t[0]: t for t in tensors}
    desc = _QuantModelDesc(arch.encode(), *(int(hparams.get(k, 0)) for k in (
        "n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v")))
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    with quiet_llama():
        model = f_model(ctypes.byref(desc))
        if not model:
            return None
        qs = f_init(model, ctypes.byref(params))
        ctx = lib.ggml_init(_InitParams(max(1 << 20, 1024 * (len(ordered) + 16)), None, True))
        try:
            arr = (ctypes.c_void_p * len(ordered))()
            for i, name in enumerate(ordered):
                _, shape, cur = by_name[name]
                ne = (ctypes.c_int64 * len(shape))(*reversed(shape))
                t = lib.ggml_new_tensor(ctx, int(cur), len(shape), ne)
                lib.ggml_set_name(t, name.encode())
                arr[i] = t
            out = (ctypes.c_int * len(ordered))()
            f_types(qs, ftype, arr, out, len(ordered))
            return {name: QT(out[i]) for i, name in enumerate(ordered)}
        finally:
            lib.ggml_free(ctx)
            f_free(qs)
            L.llama_model_free(model)


def llama_model_quantize(src: str, dst: str, ftype: int, threads: int | None = None,
                         imatrix: dict[str, np.ndarray] | None = None) -> None:
    """llama.cpp's file-to-file quantizer (the two-step fallback and the test reference).

    ``imatrix``: GGUF tensor name -> the float32 weights llama-quantize would hand over
    (per-expert means, :meth:`ImatrixData.weights`)."""
    from llama_cpp import llama_cpp as L

    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or 0
    keep: list[np.ndarray] = []
    if imatrix:
        entries = (L.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None  # the terminator
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(L.llama_model_imatrix_data))
    with quiet_llama():
        rc = L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    del keep
    if rc != 0:
        raise LLMOpsError(f"llama.cpp's quantizer failed on {src} (ftype {ftype})")
