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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llmops.core.errors import LLMOpsError


@dataclass
class Windows:
    inputs: np.ndarray  # [n_chunk, n_ctx] token ids fed to the model (BOS substituted when add_bos)
    targets: np.ndarray  # [n_chunk, n_ctx - first - 1] ids scored
    first: int
    n_ctx: int
    n_tokens: int  # tokens of the text tokenized (a prefix of the whole, see leading_tokens)

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


def windows_tokens(chunks: int | None, n_ctx: int) -> int | None:
    """Tokens ``make_windows`` uses of a long enough text (None: all of them)."""
    return None if chunks is None or chunks < 0 else chunks * n_ctx


_MARGIN = 64  # tokens past the last one used that two cuts must also agree on


def leading_tokens(tokenize: Callable[[str], np.ndarray], text: str, needed: int | None) -> np.ndarray:
    """``tokenize(text)``, or, when only its first ``needed`` tokens are used, the tokens of a prefix
    of ``text`` that begin with those same tokens.

    llama-perplexity tokenizes the whole file; 16 windows of 512 use 8k of wikitext-2's 240k
    tokens, and tokenizing the rest was a second of a 16-second run. A tokenizer may merge across
    any point of a text, so a prefix is trusted only when two cuts at different line ends, the
    second twice as far, give the same first ``needed`` tokens and a margin after them; anything
    else takes the whole text."""
    if needed is None or needed <= 0:
        return tokenize(text)
    want = needed + _MARGIN
    size = max(1 << 15, 8 * want)  # characters: wikitext runs about four to a token
    while 2 * size < len(text):
        a, b = text.find("\n", size), text.find("\n", 2 * size)
        if a < 0 or b < 0:
            break
        short = np.asarray(tokenize(text[:a + 1]))
        if len(short) < want:
            size *= 2
            continue
        longer = np.asarray(tokenize(text[:b + 1]))
        if len(longer) >= want and np.array_equal(short[:want], longer[:want]):
            return short
        break
    return tokenize(text)
