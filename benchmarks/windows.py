"""Perplexity windows, cut the way llama.cpp's ``llama-perplexity`` cuts them.

A runner turns token ids into next-token logits. Each backend loads native code
(llama.cpp, torch) that can crash or run out of memory, so evaluation runs the
runner in a *child interpreter*: a segfault or an OOM kill becomes a one-line
:class:`LLMOpsError` in the parent instead of a dead CLI. The child sends back
per-token NLLs, and the scored logits through a ``.npy`` file in a temporary
folder only when a KL-divergence comparison needs them.

Chunking mirrors llama.cpp's ``llama-perplexity`` (its default, non-strided
method), so our numbers are comparable with its output:

1. tokenize the whole text once with the GGUF's tokenizer, adding BOS only if the
   vocabulary's ``add_bos`` flag says so (``common_tokenize(ctx, text, true)``);
2. cut it into ``n_chunk = min(chunks, len // n_ctx)`` windows of ``n_ctx`` tokens;
3. when ``add_bos``, the first token of every window is replaced by BOS;
4. each window is evaluated from an empty KV cache, and only its second half is
   scored: logits at positions ``n_ctx/2 .. n_ctx-2`` predict tokens
   ``n_ctx/2+1 .. n_ctx-1`` (``n_ctx - n_ctx/2 - 1`` tokens per window);
5. perplexity = exp(sum NLL / count) over all scored tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmops.core.errors import LLMOpsError


@dataclass
class Windows:
    inputs: np.ndarray  # [n_chunk, n_ctx] token ids fed to the model (BOS substituted when add_bos)
    targets: np.ndarray  # [n_chunk, n_ctx - first - 1] ids scored
    first: int
    n_ctx: int
    n_tokens: int  # tokens in the whole text

    @property
    def n_chunk(self) -> int:
        return int(self.inputs.shape[0])


def make_windows(tokens: np.ndarray, n_ctx: int, chunks: int | None, add_bos: bool, bos_id: int) -> Windows:
    tokens = np.asarray(tokens, dtype=np.int32)
    if len(tokens) < 2 * n_ctx:
        raise LLMOpsError(f"the eval text tokenizes to {len(tokens)} tokens; perplexity with a context of {n_ctx} "
                          f"needs at least {2 * n_ctx}")
    n_max = len(tokens) // n_ctx
    n = n_max if chunks is None or chunks < 0 else min(chunks, n_max)
    first = n_ctx // 2
    inputs = tokens[: n * n_ctx].reshape(n, n_ctx).copy()
    targets = inputs[:, first + 1:].copy()
    if add_bos:
        inputs[:, 0] = bos_id
    return Windows(inputs, targets, first, n_ctx, len(tokens))

