"""Tokenizer export: byte-level BPE (``tokenizer.ggml.model = gpt2``) and SentencePiece (``llama``).

llama.cpp re-implements each BPE pre-tokenizer natively and picks one from
``tokenizer.ggml.pre``. Which one a Hugging Face tokenizer needs is detected the
way llama.cpp's own converter does: tokenize llama.cpp's fixed check string and
hash the token ids. Hashes of tokenizers we have not listed fall back to reading
the pre-tokenizer's structure from ``tokenizer.json`` (plain GPT-2 byte-level,
or SmolLM's digits-then-byte-level); anything else is refused rather than
written with a pre-tokenizer that would silently tokenize differently.

The ``tokenizers`` library is used directly (not transformers' AutoTokenizer),
which keeps conversion free of the transformers import.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from llmops.core.errors import LLMOpsError

# The check string llama.cpp's converter tokenizes to identify a BPE pre-tokenizer.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(token ids of CHECK_TEXT)) -> tokenizer.ggml.pre, for the families this converter supports
# (and their common fine-tunes); values agree with llama.cpp's converter.
KNOWN_PRE_TOKENIZERS: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Llama 3 fine-tunes
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / 2 / 2.5 / 3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3 embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # Phi-4
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
}

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _looks_special(token: str) -> bool:
    """Added tokens some models forget to mark special (same rule as llama.cpp's converter)."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _structural_pre(tokenizer_json: dict[str, Any]) -> str | None:
    """Identify simple byte-level pre-tokenizers from tokenizer.json when the hash is unknown."""
    if tokenizer_json.get("normalizer") not in (None, {}):
        return None
    pre = tokenizer_json.get("pre_tokenizer") or {}

    def is_bytelevel(p: dict[str, Any]) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    if is_bytelevel(pre):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        seq = pre.get("pretokenizers") or []
        if len(seq) == 2 and seq[0].get("type") == "Digits" and seq[0].get("individual_digits") and is_bytelevel(seq[1]):
            return "smollm"
    return None


def detect_pre_tokenizer(tok: Any, tokenizer_json: dict[str, Any], where: Path) -> tuple[str, str]:
    """(tokenizer.ggml.pre, check hash) for a ``tokenizers.Tokenizer``."""
    ids = tok.encode(CHECK_TEXT).ids
    chkhsh = sha256(str(ids).encode()).hexdigest()
    if chkhsh in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[chkhsh], chkhsh
    pre = _structural_pre(tokenizer_json)
    if pre is not None:
        return pre, chkhsh
    raise LLMOpsError(
        f"{where}: unrecognised BPE pre-tokenizer (check hash {chkhsh[:16]}...); llama.cpp would tokenize "
        "this model differently, so no GGUF was written"
    )


def add_vocab(writer: gguf.GGUFWriter, root: Path, config: dict[str, Any], *, prefer_spm: bool = False) -> dict[str, Any]:
    """Write the tokenizer keys; returns a summary (model, pre, n_vocab, add_bos, bos id)."""
    tj = root / "tokenizer.json"
    spm = root / "tokenizer.model"
    if tj.is_file() and not (prefer_spm and spm.is_file()):
        tokenizer_json = json.loads(tj.read_text(encoding="utf-8"))
        model_type = (tokenizer_json.get("model") or {}).get("type")
        if model_type == "BPE" and not (tokenizer_json.get("model") or {}).get("byte_fallback"):
            return _add_bpe(writer, root, config, tokenizer_json)
    if spm.is_file():
        return _add_sentencepiece(writer, root, config)
    if tj.is_file():
        raise LLMOpsError(f"{tj}: tokenizer type is not supported for GGUF export (byte-level BPE or SentencePiece)")
    raise LLMOpsError(f"{root}: no tokenizer.json or tokenizer.model; a GGUF needs the tokenizer")


def _special(writer: gguf.GGUFWriter, root: Path, n_vocab: int, tok: Any | None, load_merges: bool) -> dict[str, Any]:
    sv = gguf.SpecialVocab(root, load_merges=load_merges, n_vocab=n_vocab)
    # llama.cpp has per-model defaults for add_bos; write what the HF tokenizer actually does.
    if tok is not None:
        probe = tok.encode("a", add_special_tokens=True).ids
        bos = sv.special_token_ids.get("bos")
        eos = sv.special_token_ids.get("eos")
        sv.add_special_token.setdefault("bos", bool(probe) and bos is not None and probe[0] == bos)
        sv.add_special_token.setdefault("eos", bool(probe) and eos is not None and probe[-1] == eos and len(probe) > 1)
    sv.add_to_gguf(writer, quiet=True)
    return {
        "add_bos": bool(sv.add_special_token.get("bos", False)),
        "bos_id": sv.special_token_ids.get("bos"),
        "eos_id": sv.special_token_ids.get("eos"),
        "chat_template": sv.chat_template is not None,
    }


def _add_bpe(writer: gguf.GGUFWriter, root: Path, config: dict[str, Any], tokenizer_json: dict[str, Any]) -> dict[str, Any]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    n_vocab = int(config.get("vocab_size") or len(vocab))
    if vocab and max(vocab.values()) >= n_vocab:
        raise LLMOpsError(
            f"{root}: tokenizer has token id {max(vocab.values())} but config vocab_size is {n_vocab}"
        )
    pre, _ = detect_pre_tokenizer(tok, tokenizer_json, root / "tokenizer.json")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_tokens_decoder()
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = reverse[i]
        if i in added:
            at = added[i]
            if not at.normalized:
                # llama.cpp expects control/user tokens pre-normalized
                token = tok.decode(tok.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if at.special or _looks_special(token):
                types.append(CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    info = _special(writer, root, n_vocab, tok, load_merges=True)
    return {"model": "gpt2", "pre": pre, "n_vocab": n_vocab, **info}


def _add_sentencepiece(writer: gguf.GGUFWriter, root: Path, config: dict[str, Any]) -> dict[str, Any]:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:  # pragma: no cover
        raise LLMOpsError("the sentencepiece package is needed to export this tokenizer") from None
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(root / "tokenizer.model"))
    n_vocab = int(config.get("vocab_size") or sp.vocab_size())
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [UNUSED] * n_vocab
    for i in range(min(sp.vocab_size(), n_vocab)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i)
                    else UNUSED if sp.IsUnused(i) else BYTE if sp.IsByte(i) else NORMAL)
    added_file = root / "added_tokens.json"
    if added_file.is_file():
        for text, i in json.loads(added_file.read_text(encoding="utf-8")).items():
            if i < n_vocab:
                tokens[i], scores[i], types[i] = text.encode(), -1000.0, USER_DEFINED
    tc_file = root / "tokenizer_config.json"
    if tc_file.is_file():
        tc = json.loads(tc_file.read_text(encoding="utf-8"))
        for sid, data in (tc.get("added_tokens_decoder") or {}).items():
            i = int(sid)
            if i >= n_vocab:
                continue
            text = data["content"]
            if data.get("special") or _looks_special(text):
                types[i] = CONTROL
            else:
                text = text.replace("\u2581", " ")
                types[i] = USER_DEFINED
            tokens[i], scores[i] = text.encode(), -1000.0
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    tok = None
    if (root / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    info = _special(writer, root, n_vocab, tok, load_merges=False)
    return {"model": "llama", "pre": "default", "n_vocab": n_vocab, **info}
