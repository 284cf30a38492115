"""llama.cpp's own quantization code, called through ctypes.

Two things come from llama.cpp rather than being rewritten here:

* the block quantizers (Q4_0, Q8_0 and the K-quants): ``ggml_quantize_chunk``
  exported by ``libggml-base`` (shipped inside llama-cpp-python), and
* the per-tensor type choice of the "_M" mixes (which layers' ``attn_v`` and
  ``ffn_down`` get more bits, the fallbacks when a row length is not a multiple
  of 256, the output/token-embedding rules): ``llama_quant_compute_types`` from
  ``libllama``. That helper is exported with C++ linkage only, so it is looked up
  by its mangled name; if a llama-cpp-python build lacks it,
  :func:`compute_types` returns None and the converter falls back to the
  two-step path (write F16, then ``llama_model_quantize``).

Everything runs on float32 rows; ``ggml_quantize_chunk`` releases the GIL, so
row slabs are quantized on a thread pool.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
from collections.abc import Iterator, Sequence
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
    import llama_cpp

    return os.path.join(os.path.dirname(llama_cpp.__file__), "lib")


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _QuantModelDesc(ctypes.Structure):  # struct llama_quant_model_desc (llama-ext.h)
    _fields_ = [("architecture", ctypes.c_char_p)] + [
        (n, ctypes.c_uint32)
        for n in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v")
    ]


@lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    import llama_cpp  # noqa: F401  (loads libggml with the right search path)

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
    return lib


def quantize_rows(data: np.ndarray, qtype: QT, threads: int = 1) -> np.ndarray:
    """Quantize a C-contiguous float32 array (rows along the last axis) with ggml; returns raw bytes."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    n_per_row = data.shape[-1]
    nrows = data.size // n_per_row if n_per_row else 0
    rs = row_size(qtype, n_per_row)
    out = np.empty(nrows * rs, dtype=np.uint8)
    if nrows == 0:
        return out
    lib = _ggml()
    lib.ggml_quantize_init(int(qtype))
    src = data.ctypes.data
    dst = out.ctypes.data

    def work(a: int, b: int) -> int:
        return lib.ggml_quantize_chunk(int(qtype), src + a * n_per_row * 4, dst + a * rs, 0, b - a, n_per_row, None)

    threads = max(1, min(threads, nrows))
    if threads == 1 or data.size < (1 << 16):
        done = work(0, nrows)
    else:
        step = -(-nrows // (threads * 4))
        with ThreadPoolExecutor(threads) as ex:
            done = sum(ex.map(lambda a: work(a, min(a + step, nrows)), range(0, nrows, step)))
    if done != out.size:
        raise LLMOpsError(f"ggml quantizer wrote {done} bytes for {qtype.name}, expected {out.size}")
    return out


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


def compute_types(
    arch: str,
    ftype: int,
    tensors: Sequence[tuple[str, tuple[int, ...], QT]],
    hparams: dict[str, int],
) -> dict[str, QT] | None:
    """Per-tensor ggml types llama.cpp's quantizer would pick for ``ftype``.

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


def llama_model_quantize(src: str, dst: str, ftype: int, threads: int | None = None) -> None:
    """llama.cpp's file-to-file quantizer (the two-step fallback and the test reference)."""
    from llama_cpp import llama_cpp as L

    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or 0
    with quiet_llama():
        rc = L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise LLMOpsError(f"llama.cpp's quantizer failed on {src} (ftype {ftype})")
