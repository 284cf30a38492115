"""The llama.cpp runner (GGUF files), through llama-cpp-python."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llmops.benchmarks.runners import continuation_score, log_softmax_rows
from llmops.core.errors import LLMOpsError


class LlamaCppRunner:
    def __init__(self, path: str, n_ctx: int = 512, threads: int | None = None, vocab_only: bool = False,
                 kv_f32: bool = False, device: str = "cpu") -> None:
        import llama_cpp

        if not Path(path).is_file():
            raise LLMOpsError(f"{path}: no such GGUF file")
        threads = threads or os.cpu_count() or 1
        try:
            with _model_params(use_extra_bufts=extra_bufts_ok()):
                self.llm = llama_cpp.Llama(
                    model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), logits_all=False,
                    n_threads=threads, n_threads_batch=threads, vocab_only=vocab_only, verbose=False,
                    n_gpu_layers=-1 if device == "cuda" else 0,
                    # llama-perplexity's default ("auto") turns flash attention on wherever the
                    # backend has it, CPU included: the same kernels give the same perplexity, to
                    # the last digit it prints. Its CPU kernel rounds through float16, so a float32
                    # KV cache, asked for to compare with float32 references, goes without it.
                    flash_attn=not kv_f32,
                    **({"type_k": 0, "type_v": 0} if kv_f32 else {}),  # GGML_TYPE_F32 KV cache
                )
        except ValueError as e:
            raise LLMOpsError(f"llama.cpp cannot load {path}: {e}") from None
        self.vocab_size = self.llm.n_vocab()
        vocab = self.llm._model.vocab
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.bos_id = int(llama_cpp.llama_vocab_bos(vocab))
        self.eos_id = int(llama_cpp.llama_vocab_eos(vocab))
        self.context_length = int(self.llm._model.n_ctx_train()) or None

    def tokenize(self, text: str, add_special: bool = True) -> np.ndarray:
        # add_special: BOS only if the vocabulary asks for it; specials in the text are plain text
        return np.asarray(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=False), dtype=np.int32)

    def token_text(self, token: int) -> str:
        return self.llm.detokenize([int(token)], special=True).decode("utf-8", "replace")

    def logits(self, tokens: np.ndarray, first: int = 0, last: int | None = None, *, view: bool = False) -> np.ndarray:
        """Decode through llama.cpp's batch API directly: ``Llama.eval`` asks for logits at
        every position (or only the last) and copies them twice, while llama-perplexity flags
        only the scored positions, so llama.cpp skips the output projection for the rest.
        ``view`` and one batch (a perplexity window): llama.cpp's own output buffer, valid until
        the next decode, instead of a fresh 50 MB array written once more (a 49k vocabulary)."""
        self.llm._ctx.kv_cache_clear()
        return self._decode(tokens, 0, first, last, view=view)

    def _decode(self, tokens: np.ndarray, n_past: int, first: int = 0, last: int | None = None, *,
                view: bool = False) -> np.ndarray:
        """Decode ``tokens`` at positions ``n_past...`` on top of what the KV cache holds; the
        logits of ``tokens[first:last]`` (see :meth:`logits`)."""
        tokens = np.asarray(tokens, dtype=np.int32)
        n = len(tokens)
        last = n if last is None else last
        ctx, batch, n_batch = self.llm._ctx, self.llm._batch, self.llm.n_batch
        single = view and n <= n_batch  # one decode makes every row asked for: hand out its buffer
        out = None if single else np.empty((last - first, self.vocab_size), dtype=np.float32)
        row = 0
        for start in range(0, n, n_batch):
            part = tokens[start:start + n_batch]
            batch.set_batch(batch=part.tolist(), n_past=n_past + start, logits_all=False)
            flags = batch.batch.logits
            wanted = 0
            for i in range(len(part)):
                want = first <= start + i < last
                flags[i] = want
                wanted += want
            if wanted == 0:  # llama.cpp needs at least one output per batch; computed, not kept
                flags[len(part) - 1] = True
            ctx.decode(batch)
            if wanted:
                got = np.ctypeslib.as_array(ctx.get_logits(), shape=(wanted, self.vocab_size))
                if out is None:
                    return got
                out[row:row + wanted] = got
                row += wanted
        return out if out is not None else np.empty((0, self.vocab_size), dtype=np.float32)

    def score_choices(self, context: np.ndarray, continuations: list[np.ndarray]) -> list[tuple[float, bool]]:
        """The context decoded once, logits of its last position only; then each continuation
        but its last token decoded on top of it, after the previous one's positions are removed
        from the KV cache (as llama-perplexity's multiple-choice scoring reuses its prompt)."""
        context = np.asarray(context, dtype=np.int32)
        n = len(context)
        ctx = self.llm._ctx
        ctx.kv_cache_clear()
        first = log_softmax_rows(self._decode(context, 0, n - 1, n))
        scores = []
        for cont in continuations:
            cont = np.asarray(cont, dtype=np.int32)
            rows = first
            if len(cont) > 1:
                if not ctx.kv_cache_seq_rm(0, n, -1):  # a cache that cannot drop a tail: start over
                    ctx.kv_cache_clear()
                    self._decode(context, 0, n - 1, n)
                rows = np.concatenate([first, log_softmax_rows(self._decode(cont[:-1], n))])
            scores.append(continuation_score(rows, cont))
        return scores


def extra_bufts_ok() -> bool:
    """Whether llama.cpp may repack weights into its CPU "extra" buffer types (see _model_params).
    Not on a CPU that names any AMX feature: the AMX matmul of the llama.cpp in llama-cpp-python
    0.3.36 crashes on quantized weights where AMX is complete, and dies of SIGILL on the first
    prompt longer than a few tokens where the kernel reports ``amx_tile`` without ``amx_int8`` (a
    guest whose hypervisor hides part of AMX). ``LLMOPS_LLAMA_EXTRA_BUFTS=1/0`` forces it."""
    env = os.environ.get("LLMOPS_LLAMA_EXTRA_BUFTS")
    if env in ("0", "1"):
        return env == "1"
    from llmops.core.procfs import cpu_info

    return not any(flag.startswith("amx") for flag in cpu_info()[1])


@contextlib.contextmanager
def _model_params(**overrides: Any) -> Iterator[None]:
    """Set llama_model_params fields that llama-cpp-python's Llama() does not expose.

    ``use_extra_bufts``: llama.cpp's CPU "extra" buffer types repack weights for AMX and
    AVX2/AVX512 kernels. The AMX matmul of the llama.cpp bundled with llama-cpp-python
    0.3.36 crashes (SIGSEGV) on quantized weights, so on CPUs with AMX the extra buffer
    types are off (LLMOPS_LLAMA_EXTRA_BUFTS=1/0 forces either way). Logits agree to
    float rounding either way: the weights are the same, only the kernels differ.
    """
    import llama_cpp.llama as ll

    orig = ll.llama_cpp.llama_model_default_params

    def patched() -> Any:
        p = orig()
        for k, v in overrides.items():
            setattr(p, k, v)
        return p

    ll.llama_cpp.llama_model_default_params = patched
    try:
        yield
    finally:
        ll.llama_cpp.llama_model_default_params = orig
