"""The tokenizer's facts read in a child process are the facts read here, and a child that gives
no answer costs only its time: the conversion works them out in process instead."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmops.converters.gguf import tokenizer_facts as TF


def _tokenizer(dest: Path) -> Path:
    """A byte-level BPE with a special token, an added token that is not normalized (its facts
    hold an encode/decode round trip) and one that is."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = [("h", "e"), ("l", "l"), ("he", "ll")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.add_tokens([AddedToken("<tool call>", normalized=False), AddedToken("hello world", normalized=True)])
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    return dest / "tokenizer.json"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tokenizer(tmp_path_factory.mktemp("tok"))


def test_facts_of_a_made_tokenizer(made: Path) -> None:
    facts = TF.facts_in_process(str(made))
    by_id = dict(zip(facts["ids"], facts["tokens"]))
    assert sorted(facts["ids"]) == list(range(len(facts["ids"])))
    added = {by_id[i]: (normalized, special, trip) for i, normalized, special, trip in facts["added"]}
    assert added["<|endoftext|>"][1] is True
    assert added["<tool call>"][0] is False and added["<tool call>"][2] is not None
    assert added["hello world"] == (True, False, None)
    assert len(facts["chkhsh"]) == 64


def _same(facts: dict) -> dict:
    """The facts with the vocabulary as a mapping: the library lists it in a random order (a hash
    map), a different one in each process."""
    return {**facts, "tokens": None, "ids": None, "vocab": dict(zip(facts["tokens"], facts["ids"]))}


def test_child_gives_the_facts_read_here(made: Path, smollm2: Path) -> None:
    for path in (str(made), str(smollm2 / "tokenizer.json")):
        pending = TF.start(path)
        assert pending is not None
        try:
            got = pending._collect()
            assert got is not None and _same(got) == _same(TF.facts_in_process(path))
        finally:
            pending.close()


def test_a_child_that_gives_no_answer_costs_only_time(made: Path) -> None:
    pending = TF.start(str(made))
    assert pending is not None and pending._proc is not None
    pending._proc.kill()
    try:
        assert _same(pending.facts()) == _same(TF.facts_in_process(str(made)))
    finally:
        pending.close()


def test_a_tokenizer_the_library_refuses_raises_its_error_here(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 5, "merges": []}}')
    pending = TF.start(str(bad))
    assert pending is not None
    with pytest.raises(Exception) as child_path:
        pending.facts()
    with pytest.raises(Exception) as here:
        TF.facts_in_process(str(bad))
    assert str(child_path.value) == str(here.value)
    pending.close()


def test_close_ends_a_child_still_working(smollm2: Path) -> None:
    pending = TF.start(str(smollm2 / "tokenizer.json"))
    assert pending is not None
    proc = pending._proc
    assert proc is not None
    pending.close()
    assert proc.returncode is not None  # ended and reaped: no process outlives the conversion
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)


def test_no_tokenizer_json_no_child(tmp_path: Path) -> None:
    assert TF.start(str(tmp_path / "tokenizer.json")) is None


def test_the_conversion_reads_the_facts_from_the_child(tiny_models, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the converter interface (the CLI's path) the child's facts are used, and the file
    is the same bytes as with the facts read in process."""
    import shutil

    from llmops.converters.api import convert

    src = tmp_path / "m"
    shutil.copytree(tiny_models("llama"), src)
    used: list[str] = []
    collect = TF.Pending._collect

    def spy(self: TF.Pending) -> dict | None:
        got = collect(self)
        used.append("child" if got is not None else "none")
        return got

    monkeypatch.setattr(TF.Pending, "_collect", spy)
    a = convert(src, "gguf-f16", tmp_path / "a.gguf")
    assert used == ["child"]
    monkeypatch.setattr(TF, "start", lambda path: None)
    b = convert(src, "gguf-f16", tmp_path / "b.gguf")
    assert used == ["child"]
    assert a.sha256 == b.sha256 and (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
