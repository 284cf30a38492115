"""BPE pre-tokenizers recognised by their structure: llama.cpp tokenizes each family like Hugging Face.

Every family's tokenizer is trained here (a new vocabulary, so no check-string hash knows it),
put beside a tiny random-weight llama, converted to GGUF, and loaded vocabulary-only in
llama.cpp, whose token ids must equal the ``tokenizers`` library's. The fidelity variant runs
the whole wikitext-2 test text: ``pytest -m fidelity tests/test_pretokenizers.py``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from llmops.converters.gguf import pretokenizers as P
from tokenizer_specs import (MADE_UP_PRE, MADE_UP_REGEX, MIXED, SPECS, TINY_AYA_PRE, build, build_spec,
                             training_text)

N_VOCAB = 4096  # config vocab_size: above every trained vocabulary (3000 + special)


@pytest.fixture(scope="module")
def corpus(eval_text: str) -> list[str]:
    return training_text(eval_text)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config.json + model.safetensors of a tiny random llama with room for a 4k vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dest = tmp_path_factory.mktemp("tiny-llama-weights")
    cfg = LlamaConfig(vocab_size=N_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(dest, safe_serialization=True)
    return dest


def _model_dir(weights: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(weights / name, dest / name)
    return dest


def _convert(src: Path, out: Path):  # noqa: ANN202
    from llmops.converters.gguf.convert import convert_to_gguf
    from llmops.core.checkpoint import open_checkpoint

    return convert_to_gguf(open_checkpoint(src), "F32", out / "m.gguf")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, weights: Path, corpus: list[str]):  # noqa: ANN201
    """family -> (tokenizer folder, GGUF path, vocab summary); each built once per module."""
    made: dict[str, tuple[Path, Path, dict]] = {}

    def get(family: str) -> tuple[Path, Path, dict]:
        if family not in made:
            base = tmp_path_factory.mktemp(f"tok-{family}")
            src = _model_dir(weights, base / f"tiny-{family}")
            build_spec(src, SPECS[family], corpus)
            res = _convert(src, base)
            made[family] = (src, res.path, res.vocab)
        return made[family]

    return get


def _llama_ids(gguf_path: Path, text: str) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()


def _hf_ids(src: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(src / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def _written_pre(gguf_path: Path) -> str:
    import gguf

    field = gguf.GGUFReader(gguf_path).fields["tokenizer.ggml.pre"]
    return bytes(field.parts[field.data[0]]).decode()


@pytest.mark.parametrize("family", list(SPECS))
def test_structure_converts_and_llama_cpp_tokenizes_like_hf(converted, family: str) -> None:
    src, path, vocab = converted(family)
    spec = SPECS[family]
    assert vocab["pre_source"] == "structure"  # a new vocabulary: the check hash is unknown
    assert vocab["pre"] == spec.expect == _written_pre(path)
    want = _hf_ids(src, MIXED)
    got = _llama_ids(path, MIXED)
    assert got == want


@pytest.mark.slow
@pytest.mark.fidelity
@pytest.mark.parametrize("family", list(SPECS))
def test_llama_cpp_tokenizes_wikitext_like_hf(converted, eval_text: str, family: str) -> None:
    src, path, _ = converted(family)
    got, want = _llama_ids(path, eval_text), _hf_ids(src, eval_text)
    assert len(got) == len(want)
    assert got == want


def test_chatglm4_split_tokenizes_as_llama_cpp_glm4(converted) -> None:
    """GLM-4's split is Llama 3's: the structural name and llama.cpp's glm4 run the same regexes."""
    assert P.same_tokenization(converted("chatglm4")[2]["pre"], "glm4")


def test_made_up_regex_is_refused_in_one_line(tmp_path: Path, weights: Path, corpus: list[str]) -> None:
    from llmops.core.errors import LLMOpsError

    src = _model_dir(weights, tmp_path / "tiny-madeup")
    build(src, MADE_UP_PRE, corpus)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LLMOpsError) as e:
        _convert(src, out)
    msg = str(e.value)
    assert "\n" not in msg and repr(MADE_UP_REGEX) in msg and "unrecognised BPE pre-tokenizer" in msg
    assert list(out.iterdir()) == []  # nothing written, not even a temporary file


def test_falcon_needs_a_vocabulary_without_merges_across_digits(tmp_path: Path, converted,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's falcon regexes split coarser than falcon's (no Digits step); exact only while no
    merge joins a digit to a non-digit. A vocabulary with such a merge is refused, and forcing the
    name (as a known hash would) shows llama.cpp tokenizing it differently."""
    from tokenizers import Tokenizer

    from llmops.converters.gguf import vocab
    from llmops.core.errors import LLMOpsError

    src = tmp_path / "tiny-falcon-merged"
    shutil.copytree(converted("falcon")[0], src)
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tj["model"]["vocab"]["Ġ1"] = len(tj["model"]["vocab"])
    tj["model"]["merges"].insert(0, ["Ġ", "1"] if isinstance(tj["model"]["merges"][0], list) else "Ġ 1")
    (src / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    rec = P.recognise(tj)
    assert rec.name is None and "numeric" in rec.reason
    with pytest.raises(LLMOpsError, match="numeric"):
        _convert(src, tmp_path)
    chk = vocab.check_hash(Tokenizer.from_file(str(src / "tokenizer.json")))
    monkeypatch.setitem(vocab.KNOWN_PRE_TOKENIZERS, chk, "falcon")
    res = _convert(src, tmp_path)
    assert res.vocab["pre"] == "falcon" and res.vocab["pre_source"] == "check hash"
    text = "in 12 cats"
    assert _llama_ids(res.path, text) != _hf_ids(src, text)


@pytest.mark.parametrize(("pre", "needle"), [(TINY_AYA_PRE, "tiny_aya")])
def test_inexact_llama_cpp_pre_tokenizers_are_refused(pre: dict, needle: str) -> None:
    """Structures llama.cpp names but cannot reproduce are refused (their exact hashes still convert)."""
    rec = P.recognise({"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": pre})
    assert rec.name is None and needle in rec.reason and "\n" not in rec.reason


def test_known_hash_wins_over_structure(tmp_path: Path, weights: Path, corpus: list[str],
                                        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A known hash is written even where the structure names another llama.cpp name: silently when
    both tokenize alike (smollm / starcoder), with a warning when they would not."""
    from tokenizers import Tokenizer

    from llmops.converters.gguf import vocab

    src = _model_dir(weights, tmp_path / "tiny-smollm")
    build_spec(src, SPECS["smollm"], corpus)
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    assert P.recognise(tj, {"clean_up_tokenization_spaces": False}).name == "smollm"
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    monkeypatch.setitem(vocab.KNOWN_PRE_TOKENIZERS, vocab.check_hash(tok), "starcoder")
    with caplog.at_level(logging.WARNING):
        assert vocab.choose_pre_tokenizer(vocab.check_hash(tok), tj, src)[::2] == ("starcoder", "check hash")
    assert not caplog.records
    monkeypatch.setitem(vocab.KNOWN_PRE_TOKENIZERS, vocab.check_hash(tok), "qwen2")
    with caplog.at_level(logging.WARNING):
        assert vocab.choose_pre_tokenizer(vocab.check_hash(tok), tj, src)[0] == "qwen2"
    assert any("smollm" in r.getMessage() and "qwen2" in r.getMessage() for r in caplog.records)


def test_ignore_merges_mismatch_accepted_only_when_immaterial(converted) -> None:
    """A Llama 3 split without ignore_merges is smaug-bpe; tekken (which llama.cpp runs with
    ignore_merges) without it is accepted only if merges reproduce every vocabulary token."""
    src, _, _ = converted("tekken")
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tj["model"]["ignore_merges"] = False
    assert P.merges_reproduce_vocab(tj)  # a trained vocabulary is reachable by its own merges
    assert P.recognise(tj).name == "tekken"
    # a vocabulary token its merges cannot build: now the flag matters, and it is refused
    vocab = tj["model"]["vocab"]
    vocab["ĠthereZZ"] = len(vocab)
    rec = P.recognise(tj)
    assert rec.name is None and "ignore_merges" in rec.reason


@pytest.mark.parametrize(("change", "needle"), [
    ({"normalizer": {"type": "Lowercase"}}, "normalizer Lowercase"),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}}, "Metaspace"),
    ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}}, "add_prefix_space"),
    ({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Removed", "invert": False}},
     "behavior Removed"),
    ({"pre_tokenizer": {"type": "Whitespace"}}, "Whitespace"),
])
def test_unrecognised_parts_are_named(change: dict, needle: str) -> None:
    tj = {"model": {"type": "BPE", "vocab": {}, "merges": []}, "normalizer": None,
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    rec = P.recognise({**tj, **change})
    assert rec.name is None and needle in rec.reason and "\n" not in rec.reason


def test_table_names_are_llama_cpp_names() -> None:
    """Every name the table or the hash list writes is one llama.cpp's vocabulary loader accepts."""
    for name in [e.name for e in P.TABLE] + list(P.LLAMA_CPP_HASHES.values()):
        assert name in P._GROUP_OF, name
    for e in P.TABLE:
        assert P._GROUP_OF[e.name][1] == e.ignore_merges, e.name
