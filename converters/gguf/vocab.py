"""Tokenizer export: byte-level BPE (``tokenizer.ggml.model = gpt2``) and SentencePiece (``llama``).

llama.cpp re-implements each BPE pre-tokenizer natively and picks one from
``tokenizer.ggml.pre``. Which one a Hugging Face tokenizer needs has two opinions
(``pretokenizers``): the structure of ``tokenizer.json`` (its pre-tokenizer
steps, normalizer and ``ignore_merges``) matched against llama.cpp's pre-tokenizer
types, and the hash llama.cpp's own converter uses (token ids of a fixed check
string). A known hash decides, as it does in llama.cpp's converter (byte identity);
otherwise the structure does, so a fine-tune or re-save with a new vocabulary still
converts. Anything neither recognises is refused rather than written with a
pre-tokenizer that would silently tokenize differently.

The ``tokenizers`` library is used directly (not transformers' AutoTokenizer),
which keeps conversion free of the transformers import.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import gguf

from llmops.converters.gguf.tokenizer_facts import CHECK_TEXT, Pending, check_hash, facts_in_process  # noqa: F401
from llmops.converters.gguf.pretokenizers import LLAMA_CPP_HASHES, Recognition, Unrecognised, recognise, resolve
from llmops.core.errors import LLMOpsError

# sha256(str(token ids of CHECK_TEXT)) -> tokenizer.ggml.pre, as llama.cpp's converter maps them.
KNOWN_PRE_TOKENIZERS: dict[str, str] = LLAMA_CPP_HASHES

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
    """The pre-tokenizer name tokenizer.json's structure corresponds to, or None."""
    return recognise(tokenizer_json).name


def choose_pre_tokenizer(chkhsh: str, tokenizer_json: dict[str, Any], where: Path,
                         tokenizer_config: dict[str, Any] | None = None) -> tuple[str, str, str]:
    """(tokenizer.ggml.pre, check hash, which opinion decided) for a tokenizer whose check
    string hashes to ``chkhsh`` (:func:`check_hash`)."""
    try:
        structural = recognise(tokenizer_json, tokenizer_config)
    except Exception as e:  # noqa: BLE001 - a malformed structure is one more "not recognised"
        structural = Recognition(None, f"tokenizer.json structure unreadable ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0] if str(e) else ''})")
    try:
        pre, source = resolve(structural, KNOWN_PRE_TOKENIZERS.get(chkhsh))
    except Unrecognised as e:
        raise LLMOpsError(
            f"{where}: unrecognised BPE pre-tokenizer: {e} (check hash {chkhsh[:16]}... unknown too); "
            "llama.cpp would tokenize this model differently, so no GGUF was written"
        ) from None
    return pre, chkhsh, source


def add_vocab(writer: gguf.GGUFWriter, root: Path, config: dict[str, Any], *, prefer_spm: bool = False,
              pending: Pending | None = None) -> dict[str, Any]:
    """Write the tokenizer keys; returns a summary (model, pre, n_vocab, add_bos, bos id).

    ``pending``: the facts of ``root/tokenizer.json`` already being worked out in a child
    (``tokenizer_facts.start``), or None to work them out here."""
    tj = root / "tokenizer.json"
    spm = root / "tokenizer.model"

    def facts() -> dict[str, Any]:
        try:
            return pending.facts() if pending is not None else facts_in_process(str(tj))
        except Exception as e:  # noqa: BLE001 - the tokenizers library's errors are plain Exceptions
            raise LLMOpsError(f"{tj}: the tokenizers library cannot load it ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None

    if tj.is_file() and not (prefer_spm and spm.is_file()):
        try:
            tokenizer_json = json.loads(tj.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise LLMOpsError(f"{tj}: not a valid tokenizer.json ({e})") from None
        if not isinstance(tokenizer_json, dict):
            raise LLMOpsError(f"{tj}: not a valid tokenizer.json (not a JSON object)")
        model_type = (tokenizer_json.get("model") or {}).get("type")
        if model_type == "BPE" and not (tokenizer_json.get("model") or {}).get("byte_fallback"):
            return _add_bpe(writer, root, config, tokenizer_json, facts())
    if spm.is_file():
        from llmops.core.layouts import tokenizer_model_kind

        if tokenizer_model_kind(spm) == "tiktoken":
            return _add_tiktoken(writer, spm, config)
        return _add_sentencepiece(writer, root, config, facts() if tj.is_file() else None)
    if tj.is_file():
        raise LLMOpsError(f"{tj}: tokenizer type is not supported for GGUF export (byte-level BPE or SentencePiece)")
    raise LLMOpsError(f"{root}: no tokenizer.json or tokenizer.model; a GGUF needs the tokenizer")


def _read_tokenizer_json(root: Path) -> dict[str, Any] | None:
    try:
        tj = json.loads((root / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return tj if isinstance(tj, dict) else None


def _post_processors(tokenizer_json: dict[str, Any] | None) -> list[dict[str, Any]]:
    pp = (tokenizer_json or {}).get("post_processor")
    if not isinstance(pp, dict):
        return []
    procs = pp.get("processors", [pp])
    return [q for q in procs if isinstance(q, dict)] if isinstance(procs, list) else []


def _merges(tokenizer_json: dict[str, Any] | None) -> list[str]:
    """The BPE merges as gguf-py's ``SpecialVocab`` writes them (a space inside a part encoded as
    U+0120), from the tokenizer.json already parsed: gguf-py would parse the file again and
    rebuild each merge character by character, the largest cost of a small model's conversion."""
    merges = ((tokenizer_json or {}).get("model") or {}).get("merges")
    if not isinstance(merges, list) or not merges:
        return []
    if isinstance(merges[0], str):
        return merges
    if isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
        if " " not in "".join(itertools.chain.from_iterable(merges)):
            return [" ".join(pair) for pair in merges]
        shifted = chr(ord(" ") + 256)
        return [" ".join(part.replace(" ", shifted) for part in pair) for pair in merges]
    raise LLMOpsError("tokenizer.json: unknown format of the BPE merges")


def _reference_add_flags(sv: gguf.SpecialVocab, root: Path, n_vocab: int,
                         tokenizer_json: dict[str, Any] | None) -> None:
    """The ``add_*_token`` flags as llama.cpp's converter sets them (its gguf-py's ``SpecialVocab``,
    newer than the released package in two rules): a ``ByteLevel`` post-processor says no BOS
    and no EOS unless a later processor says otherwise, and what the post-processors say wins
    over ``tokenizer_config.json``'s ``add_*_token``, whose flags only fill in the rest. The
    order of the flags (the order of their GGUF keys) is the order they are first set in."""
    procs = _post_processors(tokenizer_json)
    tc = _tokenizer_config(root) or {}
    config_flags = {t: tc[f"add_{t}_token"] for t in sv.special_token_types
                    if isinstance(tc.get(f"add_{t}_token"), bool)}
    if not procs and not config_flags:
        return
    # what the post-processors alone say: the same files without the add_*_token entries
    from_pp: dict[str, bool] = {}
    if procs and not config_flags:
        from_pp = dict(sv.add_special_token)
    elif procs:
        tc_without_flags = {k: v for k, v in tc.items() if not (k.startswith("add_") and k.endswith("_token"))}
        from_pp = dict(_special_vocab(root, tokenizer_json, n_vocab, tc_without_flags).add_special_token)
    kinds = [q.get("type") for q in procs]
    flags: dict[str, bool] = {}
    others = [i for i, k in enumerate(kinds) if k in ("TemplateProcessing", "RobertaProcessing")]
    if "ByteLevel" in kinds and (not others or kinds.index("ByteLevel") < others[0]):
        flags = {"bos": False, "eos": False}
    flags.update(from_pp)
    if "ByteLevel" in kinds:
        flags.setdefault("bos", False)
        flags.setdefault("eos", False)
    for t, v in config_flags.items():
        flags.setdefault(t, v)
    sv.add_special_token = flags


_SPECIAL_VOCAB_FILES = ("tokenizer_config.json", "config.json", "chat_template.jinja", "chat_template.json",
                        "additional_chat_templates")


def _special_vocab(root: Path, tokenizer_json: dict[str, Any] | None, n_vocab: int,
                   tokenizer_config: dict[str, Any] | None = None) -> gguf.SpecialVocab:
    """gguf-py's ``SpecialVocab`` of ``root`` (merges aside), shown a view of the folder whose
    tokenizer.json holds only what it reads without merges (the added tokens and the
    post-processor): it would otherwise parse the whole file, megabytes of vocabulary, once
    more. ``tokenizer_config`` replaces tokenizer_config.json in the view."""
    import tempfile

    if tokenizer_json is None and tokenizer_config is None:
        return gguf.SpecialVocab(root, load_merges=False, n_vocab=n_vocab)
    with tempfile.TemporaryDirectory(prefix="llmops-special-") as tmp:
        view = Path(tmp)
        for name in _SPECIAL_VOCAB_FILES:
            if (root / name).exists():
                (view / name).symlink_to((root / name).absolute())
        if tokenizer_json is not None:
            slim = {k: tokenizer_json[k] for k in ("added_tokens", "post_processor") if k in tokenizer_json}
            (view / "tokenizer.json").write_text(json.dumps({**slim, "model": {}}), encoding="utf-8")
        elif (root / "tokenizer.json").exists():
            (view / "tokenizer.json").symlink_to((root / "tokenizer.json").absolute())
        if tokenizer_config is not None:
            (view / "tokenizer_config.json").unlink(missing_ok=True)
            (view / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
        return gguf.SpecialVocab(view, load_merges=False, n_vocab=n_vocab)


def _special(writer: gguf.GGUFWriter, root: Path, n_vocab: int, probe: list[int] | None, load_merges: bool,
             tokenizer_json: dict[str, Any] | None = None) -> dict[str, Any]:
    """``probe``: the ids the Hugging Face tokenizer gives "a" with its special tokens, if it has one."""
    if tokenizer_json is None:
        tokenizer_json = _read_tokenizer_json(root)
    sv = _special_vocab(root, tokenizer_json, n_vocab)
    if load_merges:  # what SpecialVocab(load_merges=True) loads: tokenizer.json's, else merges.txt
        sv.load_merges = True
        sv.merges = _merges(tokenizer_json)
        if not sv.merges:
            sv._try_load_merges_txt(root)
    _reference_add_flags(sv, root, n_vocab, tokenizer_json)
    # llama.cpp has per-model defaults for add_bos; write what the HF tokenizer actually does.
    if probe is not None:
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


def _tokenizer_config(root: Path) -> dict[str, Any] | None:
    """tokenizer_config.json, for its decoder flags (clean_up_tokenization_spaces); None if absent or unreadable."""
    try:
        cfg = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _add_bpe(writer: gguf.GGUFWriter, root: Path, config: dict[str, Any], tokenizer_json: dict[str, Any],
             facts: dict[str, Any], where: Path | None = None) -> dict[str, Any]:
    """``facts``: the tokenizer's (``tokenizer_facts.facts_of``); ``where``: the file to name in
    errors (default ``root/tokenizer.json``)."""
    where = where or root / "tokenizer.json"
    ids = facts["ids"]
    n_vocab = int(config.get("vocab_size") or len(ids))
    if ids and max(ids) >= n_vocab:
        raise LLMOpsError(f"{where}: tokenizer has token id {max(ids)} but config vocab_size is {n_vocab}")
    pre, _, pre_source = choose_pre_tokenizer(facts["chkhsh"], tokenizer_json, where, _tokenizer_config(root))
    # every id NORMAL, then the few exceptions patched in: the same lists as going id by id
    # through the vocabulary, without a Python step for each of its tens of thousands of entries
    tokens: list[Any] = [None] * n_vocab
    for t, i in zip(facts["tokens"], ids):
        tokens[i] = t
    types = [NORMAL] * n_vocab
    missing = {i for i, t in enumerate(tokens) if t is None} if None in tokens else set()
    for i in missing:
        tokens[i] = f"[PAD{i}]"
        types[i] = UNUSED
    for i, normalized, special, trip in facts["added"]:
        if i >= n_vocab or i in missing:
            continue
        token = tokens[i]
        if not normalized:
            # llama.cpp expects control/user tokens pre-normalized
            token = trip
        if special or _looks_special(token):
            types[i] = CONTROL
        else:
            token = token.replace("\u2581", " ")
            types[i] = USER_DEFINED
        tokens[i] = token
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    info = _special(writer, root, n_vocab, facts["probe"], load_merges=True, tokenizer_json=tokenizer_json)
    return {"model": "gpt2", "pre": pre, "pre_source": pre_source, "n_vocab": n_vocab, **info}


def _add_tiktoken(writer: gguf.GGUFWriter, model: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Llama 3's tiktoken ``tokenizer.model``: the Hugging Face files transformers would make of it
    (``tiktoken_vocab``), written to a temporary folder and exported like any byte-level BPE."""
    import tempfile

    from llmops.core.tiktoken_vocab import write_hf_tokenizer

    with tempfile.TemporaryDirectory(prefix="llmops-tiktoken-") as tmp:
        write_hf_tokenizer(model, Path(tmp), config)
        tokenizer_json = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        info = _add_bpe(writer, Path(tmp), config, tokenizer_json, facts_in_process(str(Path(tmp) / "tokenizer.json")),
                        where=model)
    return {**info, "source": "tiktoken"}


def _add_sentencepiece(writer: gguf.GGUFWriter, root: Path, config: dict[str, Any],
                       facts: dict[str, Any] | None) -> dict[str, Any]:
    """``facts``: those of the tokenizer.json beside ``tokenizer.model``, if there is one."""
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
    info = _special(writer, root, n_vocab, facts["probe"] if facts is not None else None, load_merges=False)
    return {"model": "llama", "pre": "default", "n_vocab": n_vocab, **info}
