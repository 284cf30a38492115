"""Generated tokens to streamed text, and logits to OpenAI's ``logprobs``.

A server that decodes several requests at once cannot lean on a runtime's one-request
completion loop for what a client sees, so the rules live here, once, for every engine:

* text goes out only as whole UTF-8 characters (a character split over two tokens waits for
  its second half);
* a stop sequence ends the text before it, and text that could still become a stop sequence
  is held back until it cannot (OpenAI and llama.cpp emit nothing from a stop sequence on);
* ``logprobs`` are computed from the model's logits at each position (log-softmax of the raw
  logits, before any sampling transform), so the value reported for token ``i`` is the
  probability the model gave it after tokens ``0..i-1``: no position shift, BOS or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _utf8_complete(buf: bytes) -> int:
    """How many leading bytes of ``buf`` end on a character boundary (an incomplete sequence
    at the end is left out; an invalid byte counts as complete, to be replaced on decode)."""
    n = len(buf)
    for back in range(1, min(4, n) + 1):
        b = buf[n - back]
        if b & 0b1100_0000 == 0b1000_0000:  # a continuation byte: look further back
            continue
        need = 2 if b & 0b1110_0000 == 0b1100_0000 else 3 if b & 0b1111_0000 == 0b1110_0000 else \
            4 if b & 0b1111_1000 == 0b1111_0000 else 1
        return n - back if need > back else n
    return n


class TextStream:
    """The completion's bytes in, the text a client may see out (see the module's rules)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s.encode("utf-8") for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.buf = bytearray()
        self.sent = 0  # bytes of buf already emitted
        self.stopped = False

    def _held(self, end: int) -> int:
        """Bytes at the end of ``buf[:end]`` that begin some stop sequence."""
        held = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, end), held, -1):
                if self.buf[end - k:end] == s[:k]:
                    held = k
                    break
        return held

    def feed(self, piece: bytes) -> str:
        """Text to emit after this token's bytes; sets ``stopped`` at a stop sequence."""
        if self.stopped:
            return ""
        self.buf += piece
        if self.stops:
            # a stop sequence can only end in what just arrived (and the bytes before it)
            start = max(0, len(self.buf) - len(piece) - self.longest + 1)
            hits = [i for i in (self.buf.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                return self._emit(min(hits))
        end = _utf8_complete(bytes(self.buf[self.sent:])) + self.sent
        end -= self._held(end)
        return self._emit(_utf8_complete(bytes(self.buf[self.sent:end])) + self.sent)

    def _emit(self, end: int) -> str:
        if end <= self.sent:
            return ""
        # bytes that are no character at all are dropped, as llama-cpp-python drops them
        out = bytes(self.buf[self.sent:end]).decode("utf-8", errors="ignore")
        self.sent = end
        return out

    def flush(self) -> str:
        """What was held back, at the end of the generation (an incomplete last character is
        dropped, as llama-cpp-python drops it)."""
        if self.stopped:
            return ""
        return self._emit(_utf8_complete(bytes(self.buf[self.sent:])) + self.sent)


@dataclass
class LogprobTrace:
    """Per position of the echoed prompt and the generated tokens: the token, its log
    probability (None for the first prompt token, which nothing predicts) and the ``top`` most
    likely tokens with theirs."""

    top: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list[dict[int, float] | None] = field(default_factory=list)

    def first(self, token: int) -> None:
        self.tokens.append(token)
        self.logprobs.append(None)
        self.tops.append(None)

    def add(self, token: int, row: np.ndarray) -> None:
        """``token`` as predicted by the logits ``row`` (the position before it)."""
        lp, top = log_softmax_at(row, token, self.top)
        self.tokens.append(token)
        self.logprobs.append(lp)
        self.tops.append(top)

    def add_rows(self, tokens: list[int], rows: np.ndarray) -> None:
        """Several positions at once: ``rows[i]`` predicts ``tokens[i]``."""
        if not len(tokens):
            return
        rows = np.asarray(rows, dtype=np.float32)
        m = rows.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(rows - m).sum(axis=1))).astype(np.float64)
        idx = np.arange(len(tokens))
        picked = rows[idx, np.asarray(tokens)].astype(np.float64) - lse
        for i, t in enumerate(tokens):
            self.tokens.append(int(t))
            self.logprobs.append(float(picked[i]))
            self.tops.append(_top(rows[i], lse[i], self.top) if self.top else {})


def log_softmax_at(row: np.ndarray, token: int, top: int) -> tuple[float, dict[int, float]]:
    """log p(token) under ``row``'s distribution, and the ``top`` most likely tokens."""
    row = np.asarray(row, dtype=np.float32)
    m = float(row.max())
    lse = m + float(np.log(np.exp(row - m).sum()))
    return float(row[token]) - lse, (_top(row, lse, top) if top else {})


def _top(row: np.ndarray, lse: float, k: int) -> dict[int, float]:
    k = min(k, row.shape[0])
    idx = np.argpartition(-row, k - 1)[:k]
    idx = idx[np.argsort(-row[idx], kind="stable")]
    return {int(i): float(row[i]) - float(lse) for i in idx}


def openai_logprobs(trace: LogprobTrace, pieces: list[bytes], piece_of: Any, start_offset: int = 0) -> dict[str, Any]:
    """OpenAI's completion ``logprobs`` object: ``tokens`` (text of each), ``token_logprobs``,
    ``top_logprobs`` (text → logprob) and ``text_offset`` (the character at which each token's
    text begins in the echoed prompt plus the completion). ``pieces`` are the tokens' bytes in
    order; ``piece_of(id)`` gives any token's bytes (for the top alternatives)."""
    texts: list[str] = []
    offsets: list[int] = []
    so_far = bytearray()
    for p in pieces:
        offsets.append(start_offset + len(bytes(so_far).decode("utf-8", errors="ignore")))
        so_far += p
        texts.append(_token_text(p))
    tops: list[dict[str, float] | None] = []
    for t in trace.tops:
        if t is None:
            tops.append(None)
            continue
        named: dict[str, float] = {}
        for tid, lp in t.items():
            key = _token_text(piece_of(tid))
            while key in named:  # two tokens with the same text: keep both, told apart
                key += "\u200b"
            named[key] = lp
        tops.append(named)
    return {"tokens": texts, "token_logprobs": list(trace.logprobs), "top_logprobs": tops, "text_offset": offsets}


def _token_text(piece: bytes) -> str:
    """A token's text; part of a character (a byte-fallback token) as OpenAI writes it, ``bytes:\\xNN``."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)
