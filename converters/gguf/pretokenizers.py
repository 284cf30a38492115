"""Which llama.cpp pre-tokenizer (``tokenizer.ggml.pre``) a byte-level BPE ``tokenizer.json`` needs.

llama.cpp does not read a tokenizer's pre-tokenizer: it re-implements each family's split rules
natively (a list of regexes per ``LLAMA_VOCAB_PRE_TYPE_*`` in its ``src/llama-vocab.cpp``, plus a
few per-name flags) and picks one by the name its converter writes. Its converter finds the name
by hashing the token ids of a check string, so a fine-tune or re-save with a new vocabulary (new
hash) is refused even when its pre-tokenizer is exactly Llama 3's.

This module reads the pre-tokenizer for what it is. ``tokenizer.json``'s ``pre_tokenizer`` is
reduced to a canonical list of steps: each ``Split`` (behaviour ``Isolated``) is its regex,
``Digits`` is ``\\p{N}`` or ``\\p{N}+``, ``ByteLevel`` with ``use_regex`` is GPT-2's regex, and
the byte mapping itself is a marker (its position matters: a split after it sees mapped bytes).
That list, the normalizer, and the BPE model's ``ignore_merges`` are matched against a table of
the HF-side structures that correspond to llama.cpp's regex sets (``TABLE``). Anything not in the
table is refused with one line naming what was not recognised.

Two facts about the vocabulary are checked where the structure alone cannot settle identity:
``ignore_merges`` differing from llama.cpp's per-name flag is accepted only when merges rebuild
every vocabulary token (then the flag cannot change an id), and falcon, whose llama.cpp regexes
split coarser than its Hugging Face pre-tokenizer, only when no merge crosses the boundaries
llama.cpp does not make. Structures llama.cpp splits *differently* (``INEXACT``) are refused.

Two opinions, one decision (``resolve``):

* The check-string hash, when llama.cpp's converter knows it, wins. A known hash means this
  tokenizer produced exactly the ids of a tokenizer llama.cpp's maintainers verified under that
  name, and writing that name is what byte identity with llama.cpp's converter requires. Where
  the structure names a different llama.cpp name with the same behaviour (llama.cpp's list gives
  structurally identical tokenizers different names, e.g. ``starcoder``/``smollm`` or
  ``mpt``/``olmo``, which share one regex set in ``llama-vocab.cpp``), either is correct for
  tokenization, so nothing is lost. Where they would tokenize differently, the hash still wins
  (the table is a reconstruction; the hash is an observation) and a warning names both.
* The structure decides when the hash is unknown: that is the case this module exists for.
* Neither: refused, with the structural reason.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

BYTES = "<byte-level mapping>"  # marker step: ByteLevel maps bytes to printable characters here

# --- HF-side regexes (as tokenizer.json spells them, JSON-decoded) ------------------------------
# Contractions: tokenizer.json files spell them ``(?i:...)``; llama.cpp's adapted form (its regex
# engine has no inline flags) is what canonical steps use, so both spellings match.
_CONTRACTIONS_I = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SEED_CODER = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|\p{{N}}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
         rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TINY_AYA_DIGITS = r"\d{1,3}(?=(?:\d{3})*\b)"
JAIS2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
         r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}")
EXAONE_MOE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+")
# Ling's tokenizer.json uses possessive quantifiers; llama.cpp runs them greedy, which cannot
# change a match here (what follows each possessive part can never fail).
BAILINGMOE = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
MINICPM5 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
            r"|\s+(?!\S)|\s+")
LAGUNA_LINES = r"[^\n]+|[\n]+"
BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"
_BLOOM_NESTED = r" ?[^(\s|[.,!?…。，、।۔،])]+"  # bigscience/bloom's own spelling: the same class
# Written with escapes: the class holds characters (U+1F7D, U+2126, U+212A...) that an editor's
# Unicode normalization would silently replace with their canonical equivalents.
DEEPSEEK_LLM_LETTERS = (
    "\\s?["
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370"
    "-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-"
    "\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-"
    "\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-"
    "\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a"
    "-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-"
    "\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-"
    "\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-"
    "\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-"
    "\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
    "]+"
)
DEEPSEEK_LLM_PUNCT = r"\s?[!-/:-~！-／：-～‘-‟　-。]+"
DEEPSEEK_CJK = r"[一-龥ࠀ-一가-퟿]+"
DEEPSEEK3_CJK = r"[一-龥぀-ゟ゠-ヿ]+"
_ASCII_PUNCT = '[!"#$%&' + "'" + r"()*+,\-./:;<=>?@\[\\\]^_`{|}~]"
DEEPSEEK3_MAIN = (_ASCII_PUNCT + r"[A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                  r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPARK_MAIN = (_ASCII_PUNCT + r"[A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
              r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+")
YOUTU_CJK = r"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+"
YOUTU_MAIN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
              rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
              r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# HF's Punctuation pre-tokenizer (ASCII punctuation or Unicode P), behaviour Contiguous
PUNCTUATION = r"[\p{P}\$\+<=>\^~\|`]+"
DIGITS, DIGIT_RUNS = r"\p{N}", r"\p{N}+"

_SPELLINGS = {_BLOOM_NESTED: BLOOM}


@dataclass(frozen=True)
class Entry:
    """One HF-side pre-tokenizer structure and the llama.cpp name that tokenizes like it.

    ``normalizer`` and ``clean_spaces`` (llama.cpp's per-name ``clean_up_tokenization_spaces``,
    which only affects detokenization) pick among names that share a regex set; ``ignore_merges``
    is part of tokenization and must agree (or be immaterial for the vocabulary)."""

    name: str
    steps: tuple[str, ...]
    ignore_merges: bool = False
    normalizer: str = ""
    clean_spaces: bool = True
    family: str = ""
    condition: str = ""  # a CONDITIONS key the vocabulary must satisfy, where llama.cpp splits coarser


# The HF structures of the families whose tokenizer.json llama.cpp's regex sets reproduce
# (regexes from llama-vocab.cpp's ``llm_tokenizer_bpe`` and the originals it quotes; structures
# from the families' own tokenizer.json). Order breaks ties: the first of equals is written.
TABLE: tuple[Entry, ...] = (
    Entry("llama-bpe", (LLAMA3, BYTES), ignore_merges=True, family="Llama 3 (tiktoken cl100k-style)"),
    Entry("smaug-bpe", (LLAMA3, BYTES), family="Llama 3 re-saves without ignore_merges, DBRX"),
    Entry("qwen2", (QWEN2, BYTES), normalizer="NFC", clean_spaces=False, family="Qwen1.5/2/2.5/3"),
    Entry("stablelm2", (QWEN2, BYTES), family="StableLM 2 (Arcade100k)"),
    Entry("qwen35", (QWEN35, BYTES), normalizer="NFC", clean_spaces=False, family="Qwen3.5"),
    Entry("ufakzeka", (UFAKZEKA, BYTES), clean_spaces=False, family="Qwen2 split without contractions"),
    Entry("gpt-2", (GPT2, BYTES), family="GPT-2, Phi-2"),
    Entry("olmo", (GPT2, BYTES), normalizer="NFC", family="GPT-NeoX-20B style: OLMo, MPT"),
    Entry("smollm", (DIGITS, GPT2, BYTES), clean_spaces=False, family="SmolLM/SmolLM2"),
    Entry("starcoder", (DIGITS, GPT2, BYTES), family="StarCoder2, Refact, CodeShell"),
    Entry("command-r", (DIGITS, GPT2, BYTES), normalizer="NFC", clean_spaces=False, family="Command-R"),
    Entry("deepseek-llm", ("[\\r\\n]", DEEPSEEK_LLM_LETTERS, DEEPSEEK_LLM_PUNCT, r"\s+$", DEEPSEEK_CJK,
                           DIGIT_RUNS, BYTES), clean_spaces=False, family="DeepSeek LLM"),
    Entry("deepseek-coder", ("[\\r\\n]", r"\s?\p{L}+", r"\s?\p{P}+", DEEPSEEK_CJK, DIGITS, BYTES),
          clean_spaces=False, family="DeepSeek Coder"),
    Entry("deepseek-v3", (r"\p{N}{1,3}", DEEPSEEK3_CJK, DEEPSEEK3_MAIN, BYTES), clean_spaces=False,
          family="DeepSeek V3/R1, Hunyuan dense, JoyAI"),
    Entry("spark2_5", (r"\p{N}{1,3}", DEEPSEEK3_CJK, SPARK_MAIN, DIGITS, BYTES), clean_spaces=False,
          family="Spark X2.5"),
    Entry("youtu", (YOUTU_CJK, YOUTU_MAIN, BYTES), ignore_merges=True, clean_spaces=False, family="Youtu-LLM"),
    Entry("tekken", (TEKKEN, BYTES), ignore_merges=True, clean_spaces=False, family="Mistral Nemo (tekken)"),
    Entry("gpt-4o", (GPT4O, BYTES), clean_spaces=False, family="o200k: GPT-4o, Phi-4, Llama 4, MiniMax-M2"),
    Entry("seed-coder", (SEED_CODER, BYTES), clean_spaces=False, family="Seed-Coder"),
    Entry("bailingmoe", (BAILINGMOE, BYTES), clean_spaces=False, family="Ling (BailingMoE)"),
    Entry("exaone-moe", (EXAONE_MOE, BYTES), clean_spaces=False, family="K-EXAONE"),
    Entry("jais-2", (JAIS2, BYTES), family="Jais 2"),
    Entry("minicpm5", (r"\p{N}{1,3}", MINICPM5, BYTES), ignore_merges=True, family="MiniCPM5"),
    Entry("laguna", (LAGUNA_LINES, QWEN2, BYTES), clean_spaces=False, family="Laguna"),
    Entry("bloom", (BLOOM, BYTES), family="BLOOM, GPT-3 Finnish, Poro"),
    Entry("viking", (BLOOM, DIGITS, BYTES), clean_spaces=False, family="Viking"),
    Entry("falcon", (PUNCTUATION, GPT2, BYTES, DIGIT_RUNS, "[0-9][0-9][0-9]"), family="Falcon",
          condition="no merge across a numeric boundary"),
)

# llama.cpp's names by the regex set llama-vocab.cpp runs for them, with the per-name
# ``ignore_merges`` flag (the only other flag that changes token ids). Names in one group with
# the same flag tokenize identically.
LLAMA_CPP_GROUPS: dict[str, dict[str, bool]] = {
    "llama3": {**dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                                "lfm2", "jina-v5-nano", "glm4", "glm5"), True),
               **dict.fromkeys(("dbrx", "smaug-bpe", "chatglm-bpe"), False)},
    "qwen2": dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
                            "solar-open", "grok-2"), False),
    "qwen35": {"qwen35": False},
    "ufakzeka": {"ufakzeka": False},
    "gpt2": dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                           "mellum", "modern-bert", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4",
                           "jina-v1-en", "jina-v2-code", "roberta-bpe"), False),
    "digits-gpt2": dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
                                  "mellum2"), False),
    "deepseek-llm": {"deepseek-llm": False},
    "deepseek-coder": {"deepseek-coder": False},
    "deepseek-v3": dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), False),
    "spark2_5": {"spark2_5": False},
    "youtu": {"youtu": True},
    "tekken": {"tekken": True},
    "gpt-4o": dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), False),
    "granite-embed-multi": {"granite-embed-multi-97m": True},
    "tiny_aya": dict.fromkeys(("tiny_aya", "cohere2moe"), False),
    "seed-coder": {"seed-coder": False},
    "bailingmoe": dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), False),
    "exaone-moe": {"exaone-moe": False},
    "jais-2": {"jais-2": False},
    "minicpm5": {"minicpm5": True},
    "laguna": {"laguna": False},
    "bloom": dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), False),
    "viking": {"viking": False},
    "falcon": {"falcon": False},
    "chameleon": {"chameleon": False},
    "superbpe": {"superbpe": False},
    "afmoe": {"afmoe": False},
    "kimi-k2": {"kimi-k2": False},
}
_GROUP_OF = {name: (group, im) for group, names in LLAMA_CPP_GROUPS.items() for name, im in names.items()}

# Structures llama.cpp has a name for but whose regexes split differently from Hugging Face's;
# refused structurally (their exact tokenizers still convert by hash, as llama.cpp does).
INEXACT: dict[tuple[str, ...], str] = {
    (TINY_AYA_DIGITS, GPT4O, BYTES): (
        "tiny_aya's digit split uses \\b, which llama.cpp runs in std::wregex (C locale: non-ASCII letters are "
        "not word characters), so digits beside them ('作1314151天') split differently"),
}


class Unrecognised(Exception):
    """A tokenizer.json whose pre-tokenization llama.cpp has no exact equivalent for (one line)."""


@dataclass(frozen=True)
class Structure:
    steps: tuple[str, ...]
    normalizer: str
    ignore_merges: bool


def _regex(pattern: Any) -> str:
    if not isinstance(pattern, dict):
        raise Unrecognised(f"Split pattern {pattern!r}")
    if "Regex" not in pattern:
        raise Unrecognised(f"Split on a literal string {json.dumps(pattern.get('String'), ensure_ascii=False)}")
    r = pattern["Regex"]
    r = r.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t").replace(_CONTRACTIONS_I, _CONTRACTIONS)
    return _SPELLINGS.get(r, r)


def _steps(pre: dict[str, Any] | None) -> list[str]:
    if not pre:
        raise Unrecognised("no pre_tokenizer (llama.cpp always splits byte-level BPE text first)")
    kind = pre.get("type")
    if kind == "Sequence":
        return [s for p in pre.get("pretokenizers") or [] for s in _steps(p)]
    if kind == "ByteLevel":
        if pre.get("add_prefix_space", True):
            raise Unrecognised("ByteLevel add_prefix_space=true (llama.cpp adds no space before byte-level BPE text)")
        return [GPT2, BYTES] if pre.get("use_regex", True) else [BYTES]
    if kind == "Split":
        if pre.get("invert", False):
            raise Unrecognised(f"inverted Split {_regex(pre.get('pattern'))!r}")
        if pre.get("behavior", "Isolated") != "Isolated":
            raise Unrecognised(f"Split behavior {pre.get('behavior')} on {_regex(pre.get('pattern'))!r} "
                               "(llama.cpp's regex splits are Isolated)")
        return [_regex(pre.get("pattern"))]
    if kind == "Digits":
        return [DIGITS if pre.get("individual_digits", False) else DIGIT_RUNS]
    if kind == "Punctuation" and pre.get("behavior", "Isolated") == "Contiguous":
        return [PUNCTUATION]
    detail = {k: v for k, v in pre.items() if k != "type"}
    raise Unrecognised(f"{kind} pre-tokenizer{' ' + json.dumps(detail) if detail else ''}")


def _normalizer(norm: dict[str, Any] | None) -> str:
    if not norm:
        return ""
    if norm.get("type") == "Sequence":
        parts = [p for p in (_normalizer(n) for n in norm.get("normalizers") or []) if p]
        if len(parts) > 1:
            raise Unrecognised(f"normalizer sequence {'+'.join(parts)}")
        return parts[0] if parts else ""
    if norm.get("type") == "NFC":
        return "NFC"
    raise Unrecognised(f"normalizer {norm.get('type')} (llama.cpp applies no normalizer to byte-level BPE text)")


def structure(tokenizer_json: dict[str, Any]) -> Structure:
    """The canonical form of a byte-level BPE tokenizer.json's pre-tokenization; raises Unrecognised."""
    model = tokenizer_json.get("model") or {}
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise Unrecognised(f"BPE {key}={model[key]!r}")
    if model.get("dropout"):
        raise Unrecognised(f"BPE dropout={model['dropout']}")
    steps = tuple(_steps(tokenizer_json.get("pre_tokenizer")))
    if BYTES not in steps:
        raise Unrecognised("no ByteLevel step: the vocabulary is not byte-level")
    return Structure(steps, _normalizer(tokenizer_json.get("normalizer")), bool(model.get("ignore_merges", False)))


def merges_reproduce_vocab(tokenizer_json: dict[str, Any]) -> bool:
    """Whether BPE merges alone turn every vocabulary token's text back into that token.

    If so, ``ignore_merges`` (look a whole word up in the vocabulary before merging) cannot change
    any token id, so a tokenizer and a llama.cpp name that differ only in that flag agree."""
    from tokenizers import Tokenizer

    tj = json.loads(json.dumps(tokenizer_json))
    tj["model"]["ignore_merges"] = False
    model = Tokenizer.from_str(json.dumps(tj)).model
    added = {t.get("content") for t in tj.get("added_tokens") or []}  # split off before BPE ever runs
    vocab = tj["model"].get("vocab") or {}
    return all([t.id for t in model.tokenize(text)] == [i] for text, i in vocab.items() if text not in added)


def _merge_pairs(tokenizer_json: dict[str, Any]) -> list[tuple[str, str]]:
    merges = (tokenizer_json.get("model") or {}).get("merges") or []
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]  # type: ignore[misc]


def no_merge_across_numeric(tokenizer_json: dict[str, Any]) -> bool:
    """Whether no merge joins a numeric character to a non-numeric one (in byte-mapped text).

    Falcon's Hugging Face pre-tokenizer splits digits (Unicode N, after the byte mapping) from
    their neighbours; llama.cpp's falcon regexes do not, so its pieces are coarser. BPE on a
    coarser piece gives the same tokens exactly when no merge can cross the missing boundaries,
    which holds for any vocabulary trained with falcon's pre-tokenizer."""
    import unicodedata

    def numeric(c: str) -> bool:
        return unicodedata.category(c).startswith("N")

    return all(not a or not b or numeric(a[-1]) == numeric(b[0]) for a, b in _merge_pairs(tokenizer_json))


# Conditions on the vocabulary under which llama.cpp's regexes, coarser than the structure's
# splits, still give Hugging Face's tokens (see no_merge_across_numeric).
CONDITIONS = {"no merge across a numeric boundary": no_merge_across_numeric}


@dataclass(frozen=True)
class Recognition:
    """A structural answer: the name to write (None when not recognised) and why."""

    name: str | None
    reason: str

    @property
    def group(self) -> str | None:
        return _GROUP_OF[self.name][0] if self.name in _GROUP_OF else None


def recognise(tokenizer_json: dict[str, Any], tokenizer_config: dict[str, Any] | None = None) -> Recognition:
    """The llama.cpp pre-tokenizer name this tokenizer.json's structure corresponds to."""
    try:
        s = structure(tokenizer_json)
    except Unrecognised as e:
        return Recognition(None, str(e))
    if s.steps in INEXACT:
        return Recognition(None, INEXACT[s.steps])
    same = [e for e in TABLE if e.steps == s.steps]
    if not same:
        unknown = [st for st in s.steps if st != BYTES and all(st not in e.steps for e in TABLE)]
        what = f"regex {unknown[0]!r}" if unknown else "sequence " + " -> ".join(repr(st) for st in s.steps)
        return Recognition(None, f"pre-tokenizer {what} matches none of llama.cpp's pre-tokenizers")
    unmet = [e for e in same if e.condition and not CONDITIONS[e.condition](tokenizer_json)]
    if unmet and len(unmet) == len(same):
        return Recognition(None, f"{unmet[0].family} pre-tokenizer, but llama.cpp's {unmet[0].name} splits "
                                 f"coarser and this vocabulary breaks the condition that makes it exact "
                                 f"({unmet[0].condition})")
    same = [e for e in same if e not in unmet]
    flagged = [e for e in same if e.ignore_merges == s.ignore_merges]
    note = ""
    if not flagged:
        if not merges_reproduce_vocab(tokenizer_json):
            return Recognition(None, f"BPE ignore_merges={str(s.ignore_merges).lower()} but llama.cpp's "
                                     f"{same[0].name} has it {str(not s.ignore_merges).lower()}, and it matters "
                                     "for this vocabulary")
        flagged, note = same, " (ignore_merges differs, immaterial for this vocabulary)"
    clean = (tokenizer_config or {}).get("clean_up_tokenization_spaces")
    best = max(flagged, key=lambda e: (e.normalizer == s.normalizer,
                                       clean is not None and e.clean_spaces == bool(clean)))
    return Recognition(best.name, f"structure of {best.family}{note}")


def same_tokenization(a: str, b: str) -> bool:
    """Whether llama.cpp tokenizes identically under names ``a`` and ``b`` (same regexes and flags)."""
    return a == b or (a in _GROUP_OF and _GROUP_OF.get(a) == _GROUP_OF.get(b))


def resolve(structural: Recognition, hash_name: str | None) -> tuple[str, str]:
    """(name to write, which opinion decided): the hash when llama.cpp knows it, else the structure.

    See the module docstring for why the hash wins a disagreement. Raises Unrecognised when
    neither answers."""
    if hash_name is not None:
        if structural.name is not None and not same_tokenization(hash_name, structural.name):
            log.warning("tokenizer check hash says pre-tokenizer %r, its structure says %r; writing %r as "
                        "llama.cpp's converter does", hash_name, structural.name, hash_name)
        return hash_name, "check hash"
    if structural.name is None:
        raise Unrecognised(structural.reason)
    return structural.name, "structure"


# sha256(str(ids of the check string)) -> name, as llama.cpp's convert_hf_to_gguf.py
# (get_vocab_base_pre) maps them, for the names it writes with tokenizer.ggml.model = gpt2 and a
# byte-level vocabulary. Left out: WordPiece models (bert-bge*, jina-v2-en), names needing another
# vocabulary export (gemma4, granite-embed-multi-311m, sarvam-moe: raw UTF-8 vocabularies;
# kimi-k2: tiktoken without merges) and roberta-style ones that add a separator (roberta-bpe,
# jina-v1-en, jina-v2-code). Where llama.cpp lists one hash twice, the later name (its answer) is kept.
LLAMA_CPP_HASHES: dict[str, str] = {
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",
    "cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267": "glm4",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664": "hunyuan",
    "bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6": "hunyuan-dense",
    "e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c": "hy_v4",
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",
    "66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273": "grok-2",
    "b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df": "jina-v2-de",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7": "lfm2",
    "0a766d034107bc736a3f2dc4968fd62e54a3570f1454443e0c5a4cc6bd7941ed": "spark2_5",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",  # also mpt-7b
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1": "tiny_aya",
    "52df12b4c8d4176e7481aab4b6e8454d1fd0a210a04a574f6d4e067d10e23c3e": "cohere2moe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643": "jina-v2-es",
    "27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6": "jina-v2-de",
    "a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d": "jina-v5-nano",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a": "jais-2",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224": "bailingmoe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",
    "a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152": "modern-bert",
    "49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df": "afmoe",
    "9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206": "bailingmoe2",
    "53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e": "granite-docling",
    "f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95": "minimax-m2",
    "4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665": "kormo",
    "9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1": "youtu",
    "16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91": "solar-open",
    "6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f": "exaone-moe",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d": "joyai-llm",
    "e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869": "kanana2",
    "862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015": "f2llmv2",
    "f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af": "talkie",
    "36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4": "minicpm5",
    "f241072145675bf8322086f115aebad05e9f869557a238bf2150a2a417d1bf60": "granite-embed-multi-97m",
    "9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d": "mellum2",
    "972da7b59cec44d1f0a490a86c96df53859e486e481563e5dddac155013d87ac": "laguna",
    "653660222fb704f61cbf2b618a8ae6502b7f8b20c980f9a5de07ed78e13319cd": "ufakzeka",
}
