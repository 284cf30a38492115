"""Llama 3's tiktoken ``tokenizer.model`` (Meta's original layout) as the Hugging Face tokenizer it stands for.

Meta ships Llama 3 and later with ``tokenizer.model`` in tiktoken's BPE format: one line per
token, ``base64(token bytes) rank``, the rank being both the token id and its merge priority.
The special tokens are not in the file: Meta's reference ``llama/tokenizer.py`` numbers 256 of
them after the ranks. llama.cpp's converter reads only Hugging Face files, so the tokenizer is
rebuilt here as exactly the ``tokenizer.json`` transformers makes of it (``TikTokenConverter`` in
``convert_slow_tokenizer``, as ``convert_llama_weights_to_hf.py`` calls it), with the BOS that
the published Llama 3 tokenizers add. ``vocab.py`` then exports it through the same code as any
byte-level BPE folder, so a Meta-layout checkpoint and its Hugging Face conversion give the same
GGUF bytes.

No chat template is written: base and instruct downloads have the same ``params.json`` and
``tokenizer.model``, so nothing in the folder says whether the weights follow Llama 3's chat
format, and a template on a base model would make servers format chats for it.

The tiktoken package is not needed: the format is two fields per line.
"""

from __future__ import annotations

import base64
import binascii
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from llmops.core.errors import LLMOpsError

# Llama 3's split regex, as Meta's tokenizer.py and transformers' TikTokenConverter spell it.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
N_SPECIAL = 256
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def llama3_special_tokens(llama31: bool) -> list[str]:
    """The 256 special tokens, in id order after the BPE ranks.

    Llama 3: Meta's ``llama/tokenizer.py``. Llama 3.1 and later (3.2, 3.3) renamed some reserved
    slots (``<|finetune_right_pad_id|>``, ``<|eom_id|>``, ``<|python_tag|>``) and renumbered the
    rest, as transformers' ``DEFAULT_LLAMA_SPECIAL_TOKENS["3.1"]`` lists them; the ranks file is the
    same, so which applies comes from ``params.json`` (``use_scaled_rope``, 3.1's RoPE scaling)."""
    r = "<|reserved_special_token_{}|>".format
    if llama31:
        head = [BOS, EOS, r(0), r(1), "<|finetune_right_pad_id|>", r(2), "<|start_header_id|>",
                "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        return head + [r(i) for i in range(3, N_SPECIAL - 8)]
    head = [BOS, EOS, r(0), r(1), r(2), r(3), "<|start_header_id|>", "<|end_header_id|>", r(4), "<|eot_id|>"]
    return head + [r(i) for i in range(5, N_SPECIAL - 5)]


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file as {token bytes: rank}; ranks must be 0..n-1, each once."""
    ranks: dict[bytes, int] = {}
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LLMOpsError(f"{path}: not readable ({e.strerror or e})") from None
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise LLMOpsError(f"{path}: line {n} is not 'base64-token rank' (tiktoken BPE)") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise LLMOpsError(f"{path}: tiktoken ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


@lru_cache(maxsize=1)
def _byte_encoder() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level BPE vocabulary and merges of tiktoken ranks, as transformers'
    ``TikTokenConverter.extract_vocab_merges_from_model`` recovers them: every split of a token
    into two tokens is a merge at the token's rank; at one rank, splits ordered by the ranks of
    their left then right parts."""
    enc = _byte_encoder()

    def text(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab: dict[str, int] = {}
    merges: list[tuple[bytes, bytes, int]] = []
    for token, rank in ranks.items():
        vocab[text(token)] = rank
        if len(token) == 1:
            continue
        local = [(token[:i], token[i:], rank) for i in range(1, len(token))
                 if token[:i] in ranks and token[i:] in ranks]
        local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])  # stable: the per-token order above stays within a rank
    return vocab, [(text(a), text(b)) for a, b, _ in merges]


def llama3_tokenizer(path: Path, llama31: bool) -> Any:
    """The ``tokenizers.Tokenizer`` transformers builds from Llama 3's ``tokenizer.model``
    (``TikTokenConverter.converted`` with the special tokens), plus the BOS post-processor of
    the published Llama 3 tokenizers (Meta's reference code always starts with BOS)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    ranks = read_ranks(path)
    vocab, merges = vocab_and_merges(ranks)
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in llama3_special_tokens(llama31)])
    bos_id = len(ranks)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    return tok


def write_hf_tokenizer(path: Path, dest: Path, config: dict[str, Any]) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``config.json`` in ``dest``: the files a
    Hugging Face conversion of the Meta folder has, which ``vocab.py`` reads like any other."""
    rope = config.get("rope_scaling") or {}
    llama31 = isinstance(rope, dict) and str(rope.get("rope_type", "")).lower() == "llama3"
    tok = llama3_tokenizer(path, llama31)
    n_vocab = int(config.get("vocab_size") or tok.get_vocab_size(with_added_tokens=True))
    if tok.get_vocab_size(with_added_tokens=True) > n_vocab:
        raise LLMOpsError(f"{path}: {tok.get_vocab_size(with_added_tokens=False)} tiktoken ranks and {N_SPECIAL} "
                          f"special tokens do not fit the embedding's {n_vocab} rows")
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}), encoding="utf-8")
    (dest / "config.json").write_text(json.dumps(config), encoding="utf-8")
