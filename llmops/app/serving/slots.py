"""Sequence slots of a batching context, and the prompt tokens each one still holds in the KV cache.

A request's KV cells are kept when it ends normally, and a new request is given the free slot
whose cells share the longest prefix with its prompt: only the rest of its prompt is decoded.
llama-server does the same (``cache_prompt``, slot selection by prompt similarity), and it is
what makes a chat's second turn, which resends the whole conversation, or prompts that share a
long system prompt, cheap. llama-cpp-python's ``Llama`` keeps one sequence's prefix; nothing in
it chooses among the slots of a multi-sequence context, so the choice is made here.

A slot never holds more than one sequence's context (``n_ctx``) of cells, so the unified cache
of ``parallel × n_ctx`` cells never overflows whatever the slots keep.
"""

from __future__ import annotations

import itertools


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Slots:
    """Free slot ids and the tokens whose cells each slot holds. Not thread-safe: its owner locks."""

    def __init__(self, parallel: int) -> None:
        self.parallel = parallel
        self._tick = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Every slot free and empty (after the cache was cleared or the context made anew)."""
        self.free: list[int] = list(range(self.parallel))
        self.held: dict[int, list[int]] = {s: [] for s in range(self.parallel)}
        self._used: dict[int, int] = {s: 0 for s in range(self.parallel)}

    def __bool__(self) -> bool:
        return bool(self.free)

    def take(self, tokens: list[int]) -> int:
        """The free slot to run ``tokens`` in: the one sharing the longest prefix with them, else
        the least recently used (an empty one first), so that a cache in use lives longest."""
        best = max(self.free, key=lambda s: (common_prefix(self.held[s], tokens), -self._used[s]))
        if not common_prefix(self.held[best], tokens):
            best = min(self.free, key=lambda s: (bool(self.held[s]), self._used[s]))
        self.free.remove(best)
        self._used[best] = next(self._tick)
        return best

    def reusable(self, slot: int, prompt: list[int]) -> int:
        """Prompt tokens that need not be decoded again in ``slot``: the shared prefix, less the
        prompt's last token, whose logits the first sample needs."""
        return max(0, min(common_prefix(self.held[slot], prompt), len(prompt) - 1))

    def give_back(self, slot: int, holding: list[int] | None) -> None:
        """``slot`` is free again, its cells holding ``holding`` (``None``: emptied)."""
        self.held[slot] = list(holding) if holding else []
        if slot not in self.free:
            self.free.append(slot)
