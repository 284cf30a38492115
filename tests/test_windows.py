"""Perplexity windows from a prefix of the text: the same tokens as the whole text's, or the whole text."""

from __future__ import annotations

import numpy as np

from llmops.benchmarks.windows import leading_tokens, make_windows, windows_tokens

TEXT = "".join(f" = Section {i} = \n word{i} and more words {i * 7} here .\n" for i in range(20000))


def _words(seen: list[int]):  # noqa: ANN202 - a tokenizer recording how much text it was given
    def tokenize(text: str) -> np.ndarray:
        seen.append(len(text))
        return np.asarray([hash(w) % 50000 for w in text.split()], dtype=np.int32)
    return tokenize


def test_a_prefix_gives_the_whole_texts_first_tokens_for_a_fraction_of_the_text() -> None:
    seen: list[int] = []
    tok = _words(seen)
    full = tok(TEXT)
    seen.clear()
    needed = windows_tokens(16, 512)
    got = leading_tokens(tok, TEXT, needed)
    assert np.array_equal(got[:needed], full[:needed])
    assert sum(seen) < len(TEXT) / 4
    a = make_windows(got, 512, 16, True, 1)
    b = make_windows(full, 512, 16, True, 1)
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets)


def test_a_tokenizer_whose_start_depends_on_the_end_gets_the_whole_text() -> None:
    def tokenize(text: str) -> np.ndarray:  # the first id encodes the length: no prefix agrees
        return np.asarray([len(text) % 1000] + [hash(w) % 50000 for w in text.split()], dtype=np.int32)

    assert np.array_equal(leading_tokens(tokenize, TEXT, 8192), tokenize(TEXT))


def test_all_windows_or_more_than_the_text_holds_tokenize_everything() -> None:
    seen: list[int] = []
    tok = _words(seen)
    assert windows_tokens(None, 512) is None and windows_tokens(-1, 512) is None
    leading_tokens(tok, TEXT, None)
    leading_tokens(tok, TEXT, 10 ** 9)
    assert seen[0] == len(TEXT) and seen[-1] == len(TEXT)
