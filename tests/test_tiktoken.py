"""Llama 3's tiktoken ``tokenizer.model`` in Meta's layout.

The tiktoken file is made from a byte-level BPE trained here with Llama 3's split regex, so every
id is known. A tiny Meta-layout checkpoint with it converts; llama.cpp tokenizes a mixed string
as the Hugging Face tokenizer transformers makes of the same file (and as tiktoken's algorithm
does), special tokens included; and the same weights and tokenizer in Hugging Face layout give
the same GGUF bytes, from our converter and (fidelity) from llama.cpp's.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from llmops.core.tiktoken_vocab import LLAMA3_PATTERN, N_SPECIAL, llama3_special_tokens

N_RANKS = 600
MIXED = ("Hello, World! 12345 and 3.14159 — naïve café 我想在apple工作 日本語のテキスト 🦙🚀😶\u200d🌫️\n"
         "    def f(x):\n\treturn x**2  # comment\n\n\n   trailing   spaces   \r\n"
         "I've 'RE we'LL HTTP/1.1 {\"k\": [1, 2]}  <tag attr='v'/>")
CONTROL = 3  # gguf.TokenType.CONTROL


def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def write_tiktoken_model(dest: Path, text: str, n_ranks: int = N_RANKS) -> dict[bytes, int]:
    """Train a byte-level BPE (Llama 3's regex) on ``text`` and write it as a tiktoken file:
    each token's bytes in base64 and its id as the rank."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=n_ranks, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    dec = _byte_decoder()
    ranks = {bytes(dec[c] for c in t): i for t, i in tok.get_vocab().items()}
    assert sorted(ranks.values()) == list(range(n_ranks))
    lines = [f"{base64.b64encode(b).decode()} {r}" for b, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    dest.write_text("\n".join(lines) + "\n", encoding="ascii")
    return ranks


def tiktoken_ids(ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's algorithm, spelled out: split by the regex, then within each piece merge the
    adjacent pair whose concatenation has the lowest rank (leftmost first) until none is a token."""
    import regex

    out: list[int] = []
    for piece in regex.findall(LLAMA3_PATTERN, text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            rank, i = min((ranks.get(parts[i] + parts[i + 1], math.inf), i) for i in range(len(parts) - 1))
            if rank == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        out.extend(ranks[p] for p in parts)
    return out


def _transformers_tokenizer(model: Path, specials: list[str]) -> Any:
    """What transformers' own converter (``TikTokenConverter``, as ``convert_llama_weights_to_hf``
    uses it) makes of the file, with the BOS post-processor of the published Llama 3 tokenizers.
    Without the tiktoken package its loader is replaced by the two-field parse of the format."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path: str) -> dict[bytes, int]:
            try:
                from tiktoken.load import load_tiktoken_bpe
            except ImportError:
                return {base64.b64decode(t): int(r) for t, r in
                        (line.split() for line in Path(path).read_bytes().splitlines() if line)}
            return load_tiktoken_bpe(path)

    tok = Converter(str(model), pattern=LLAMA3_PATTERN, extra_special_tokens=specials).converted()
    bos = specials[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=specials[1])


def _weights(dest: Path, vocab_size: int, llama31: bool) -> Path:
    """A tiny random Llama 3 in Hugging Face layout, no tokenizer files yet."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192} if llama31 else None
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0,
                      vocab_size=vocab_size, tie_word_embeddings=False, bos_token_id=vocab_size - N_SPECIAL,
                      eos_token_id=vocab_size - N_SPECIAL + 1, rope_scaling=rope)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(dest, safe_serialization=True)
    return dest


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory, eval_text_path: Path):
    """(Meta folder, Hugging Face folder, ranks) per Llama version, built once."""
    from test_layouts import meta_checkpoint

    base = tmp_path_factory.mktemp("tiktoken")
    model = base / "tokenizer.model"
    ranks = write_tiktoken_model(model, eval_text_path.read_text(encoding="utf-8")[:300_000])
    made: dict[bool, tuple[Path, Path, dict[bytes, int]]] = {}

    def get(llama31: bool) -> tuple[Path, Path, dict[bytes, int]]:
        if llama31 not in made:
            root = base / ("3.1" if llama31 else "3")
            hf = _weights(root / "weights" / "tiny", len(ranks) + N_SPECIAL, llama31)
            meta = meta_checkpoint(hf, root / "meta" / "tiny")
            if llama31:  # Meta's params.json for Llama 3.1 on
                params = json.loads((meta / "params.json").read_text())
                params.update(use_scaled_rope=True, rope_scaling_factor=8.0)
                (meta / "params.json").write_text(json.dumps(params))
            shutil.copyfile(model, meta / "tokenizer.model")
            _transformers_tokenizer(model, llama3_special_tokens(llama31)).save_pretrained(hf)
            made[llama31] = (meta, hf, ranks)
        return made[llama31]

    return get


def _convert(src: Path, out: Path, target: str = "gguf-f16") -> Path:
    from llmops.app.converting import convert

    return convert(src, target, out, verify=False).output


def _fields(path: Path) -> dict[str, Any]:
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def test_kind_of_tokenizer_model_is_told_by_content(tmp_path: Path, eval_text_path: Path) -> None:
    import sentencepiece as spm

    from llmops.core.layouts import tokenizer_model_kind

    write_tiktoken_model(tmp_path / "tiktoken.model", eval_text_path.read_text(encoding="utf-8")[:20_000], 300)
    (tmp_path / "corpus.txt").write_text(eval_text_path.read_text(encoding="utf-8")[:50_000], encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=300, minloglevel=2)
    assert tokenizer_model_kind(tmp_path / "tiktoken.model") == "tiktoken"
    assert tokenizer_model_kind(tmp_path / "sp.model") == "sentencepiece"


def test_merges_are_transformers_own(llama3) -> None:
    """The port of TikTokenConverter's merge recovery gives transformers' vocabulary and merges."""
    from llmops.core.tiktoken_vocab import read_ranks, vocab_and_merges

    meta, hf, ranks = llama3(False)
    assert read_ranks(meta / "tokenizer.model") == ranks
    vocab, merges = vocab_and_merges(ranks)
    tj = json.loads((hf / "tokenizer.json").read_text(encoding="utf-8"))
    assert vocab == tj["model"]["vocab"]
    assert [tuple(m) for m in merges] == [tuple(m) for m in tj["model"]["merges"]]
    assert tj["model"]["ignore_merges"] is True


@pytest.mark.parametrize("llama31", [False, True], ids=["llama3", "llama3.1"])
def test_meta_tiktoken_is_byte_identical_to_hf_layout(llama3, tmp_path: Path, llama31: bool) -> None:
    meta, hf, ranks = llama3(llama31)
    a = _convert(hf, tmp_path / "hf.gguf")
    b = _convert(meta, tmp_path / "meta.gguf")
    assert a.read_bytes() == b.read_bytes()
    f = _fields(b)
    n = len(ranks)
    specials = llama3_special_tokens(llama31)
    assert len(specials) == N_SPECIAL and len(set(specials)) == N_SPECIAL
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "llama-bpe"
    assert f["tokenizer.ggml.bos_token_id"] == n and f["tokenizer.ggml.eos_token_id"] == n + 1
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.ggml.tokens"][n:] == specials
    assert set(f["tokenizer.ggml.token_type"][n:]) == {CONTROL}
    assert "tokenizer.chat_template" not in f  # nothing in a Meta folder says it is an instruct model
    assert len(f["tokenizer.ggml.merges"]) >= n - 256


@pytest.mark.parametrize("llama31", [False, True], ids=["llama3", "llama3.1"])
def test_llama_cpp_ids_are_the_hf_tokenizers(llama3, tmp_path: Path, llama31: bool) -> None:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    meta, hf, ranks = llama3(llama31)
    path = _convert(meta, tmp_path / "meta.gguf")
    want = AutoTokenizer.from_pretrained(hf)(MIXED, add_special_tokens=False)["input_ids"]
    assert want == tiktoken_ids(ranks, MIXED)
    llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(MIXED.encode(), add_bos=False, special=False) == want
        assert llm.tokenize(MIXED.encode(), add_bos=True, special=False) == [len(ranks), *want]
        specials = llama3_special_tokens(llama31)
        for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eot_id|>", "<|reserved_special_token_0|>", specials[-1]):
            assert llm.tokenize(name.encode(), add_bos=False, special=True) == [len(ranks) + specials.index(name)]
        chat = "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        hf_chat = AutoTokenizer.from_pretrained(hf)(chat, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == hf_chat
    finally:
        llm.close()


def test_too_small_an_embedding_is_one_line(llama3, tmp_path: Path) -> None:
    import torch

    from llmops.core.errors import LLMOpsError

    meta, _, ranks = llama3(False)
    small = tmp_path / "tiny"
    shutil.copytree(meta, small)
    sd = torch.load(small / "consolidated.00.pth", weights_only=True)
    for k in ("tok_embeddings.weight", "output.weight"):
        sd[k] = sd[k][: len(ranks) + 10].clone()
    torch.save(sd, small / "consolidated.00.pth")
    params = json.loads((small / "params.json").read_text())
    params["vocab_size"] = len(ranks) + 10
    (small / "params.json").write_text(json.dumps(params))
    with pytest.raises(LLMOpsError, match="special tokens do not fit"):
        _convert(small, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.slow
@pytest.mark.fidelity
def test_meta_tiktoken_is_llama_cpps_gguf_of_the_hf_layout(llama3, reference_converter: Path,
                                                            tmp_path: Path) -> None:
    """llama.cpp's converter on the Hugging Face folder writes the bytes we write from Meta's
    (told the pre-tokenizer name, as tests/test_archs.py tells it: a trained vocabulary has no
    check hash it knows)."""
    from test_archs import _reference, _sha256, _where_they_differ

    meta, hf, _ = llama3(True)
    ours = _convert(meta, tmp_path / "ours.gguf")
    ref = _reference(reference_converter, hf, "f16", tmp_path / "ref.gguf", "llama-bpe")
    assert _sha256(ours) == _sha256(ref), _where_they_differ(ours, ref)


def test_the_view_config_has_meta_bos_and_eos(llama3) -> None:
    from llmops.core.checkpoint import open_checkpoint

    meta, _, ranks = llama3(False)
    cfg = open_checkpoint(meta).config
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (len(ranks), len(ranks) + 1)
    assert cfg["vocab_size"] == len(ranks) + N_SPECIAL


def test_meta_tiktoken_folder_verifies_and_its_source_tokenizes_alike(llama3, tmp_path: Path,
                                                                     eval_text_path: Path) -> None:
    """The torch runner of a Meta folder holding only a tiktoken tokenizer.model tokenizes as the
    Hugging Face folder does (so ``--verify`` and ``bench`` of the source work), and verification
    of its GGUF runs end to end."""
    from llmops.app.converting import convert
    from llmops.benchmarks.runners import RunnerSpec, make_runner

    meta, hf, _ = llama3(False)
    text = MIXED + eval_text_path.read_text(encoding="utf-8")[:5000]
    ours = make_runner(RunnerSpec("torch", str(meta), 64, 1), vocab_only=True)
    theirs = make_runner(RunnerSpec("torch", str(hf), 64, 1), vocab_only=True)
    assert list(ours.tokenize(text)) == list(theirs.tokenize(text))
    assert (ours.add_bos, ours.bos_id) == (theirs.add_bos, theirs.bos_id)
    res = convert(meta, "gguf-f16", tmp_path / "meta.gguf", verify=True, threads=2)
    assert res.output.is_file()
    assert res.verification["kld"] < 1e-3
