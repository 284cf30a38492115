"""Byte-level BPE tokenizers built to each family's pre-tokenizer specification, for the tests.

Each spec is the ``normalizer`` / ``pre_tokenizer`` / BPE ``ignore_merges`` of the family's
``tokenizer.json`` (the form Hugging Face writes, regexes spelled as the family spells them);
``build`` trains a small vocabulary with it on a slice of the eval text, in seconds, so every
tokenizer has a vocabulary no check-string hash list knows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmops.converters.gguf import pretokenizers as P

BOS = "<|endoftext|>"

# Mixed text the identity checks run on: CJK, kana, Hangul, emoji (with ZWJ), digit runs,
# whitespace runs, tabs/newlines, code, accented Latin (precomposed), Cyrillic, contractions.
MIXED = (
    "Hello world! I'm sure you don't know; I'M SURE YOU DON'T. We'Ve a'lL 'd 's 're\n"
    "数字 1234567 and 12 3.14159 1,234,567.89 ٣٤٥ ½ x² — 我想在apple工作1314151天～ 東京タワーへ行きます。"
    " ひらがな カタカナ 한국어 텍스트 🚀 🦙🦙 😶\u200d🌫️ ✅\n\n\n   \t\t  \n    indented\r\n"
    "def f(x):\n\treturn {'a': [1, 2, 3]} # comment  \n  if (a&&b||c) { x += 0x1F; }\n"
    "Café naïve résumé Ærøskøbing façade São Paulo Zürich Ελληνικά нещо на Български Привет, мир!\n"
    "------======= ''''''```````\"\"\"\"......!!!!!!?????? end   "
)

_EXTRA_TRAINING = [MIXED] * 20 + [
    "東京は日本の首都です。私はラーメンが好きです。カタカナとひらがな。中文文本，我想在北京工作。",
    "한국어 문장은 이렇게 씁니다. Русский текст для обучения. Ελληνικό κείμενο. Français, déjà vu.",
] * 20


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _bytelevel(use_regex: bool, trim_offsets: bool = True) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": trim_offsets, "use_regex": use_regex}


def _digits(individual: bool) -> dict[str, Any]:
    return {"type": "Digits", "individual_digits": individual}


def _seq(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Sequence", "pretokenizers": list(steps)}


NFC = {"type": "NFC"}
_I = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
LLAMA3_ORIG = _I + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_ORIG = _I + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_U, _L = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
GPT4O_ORIG = (rf"[^\r\n\p{{L}}\p{{N}}]?{_U}*{_L}+{_I}?|[^\r\n\p{{L}}\p{{N}}]?{_U}+{_L}*{_I}?"
              r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK_V3_PRE = _seq(_split(r"\p{N}{1,3}"), _split(P.DEEPSEEK3_CJK), _split(P.DEEPSEEK3_MAIN),
                       _bytelevel(False))


@dataclass(frozen=True)
class Spec:
    """One family's tokenizer.json pre-tokenization and the llama.cpp name it should get."""

    family: str
    pre_tokenizer: dict[str, Any]
    expect: str
    normalizer: dict[str, Any] | None = None
    ignore_merges: bool = False
    clean_spaces: bool | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)


# tiiuae/falcon-7b's pre_tokenizer
FALCON_PRE = _seq({"type": "Punctuation", "behavior": "Contiguous"}, _bytelevel(True), _digits(False),
                  _split("[0-9][0-9][0-9]"))

SPECS: dict[str, Spec] = {s.family: s for s in (
    Spec("llama3", _seq(_split(LLAMA3_ORIG), _bytelevel(False)), "llama-bpe", ignore_merges=True),
    Spec("llama3-merges", _seq(_split(LLAMA3_ORIG), _bytelevel(False)), "smaug-bpe"),
    Spec("qwen2", _seq(_split(QWEN2_ORIG), _bytelevel(False, trim_offsets=False)), "qwen2", normalizer=NFC,
         clean_spaces=False),
    Spec("stablelm2", _seq(_split(QWEN2_ORIG), _bytelevel(False)), "stablelm2"),
    Spec("gpt2", _bytelevel(True), "gpt-2"),
    Spec("olmo", _bytelevel(True), "olmo", normalizer=NFC),
    Spec("smollm", _seq(_digits(True), _bytelevel(True)), "smollm", clean_spaces=False),
    Spec("starcoder", _seq(_digits(True), _bytelevel(True)), "starcoder", clean_spaces=True),
    Spec("command-r", _seq(_digits(True), _bytelevel(True)), "command-r", normalizer=NFC, clean_spaces=False),
    Spec("deepseek-llm", _seq(_split("[\r\n]"), _split(P.DEEPSEEK_LLM_LETTERS), _split(P.DEEPSEEK_LLM_PUNCT),
                              _split(r"\s+$"), _split(P.DEEPSEEK_CJK), _digits(False), _bytelevel(False)),
         "deepseek-llm"),
    Spec("deepseek-coder", _seq(_split("[\r\n]"), _split(r"\s?\p{L}+"), _split(r"\s?\p{P}+"),
                                _split(P.DEEPSEEK_CJK), _digits(True), _bytelevel(False)), "deepseek-coder"),
    Spec("deepseek-v3", DEEPSEEK_V3_PRE, "deepseek-v3"),
    Spec("tekken", _seq(_split(P.TEKKEN), _bytelevel(False)), "tekken", ignore_merges=True),
    Spec("gpt-4o", _seq(_split(GPT4O_ORIG), _bytelevel(False)), "gpt-4o"),
    # GLM-4's tokenizer.json is Llama 3's split; llama.cpp's chatglm names run the same regexes
    Spec("chatglm4", _seq(_split(LLAMA3_ORIG), _bytelevel(False)), "llama-bpe", ignore_merges=True),
    Spec("qwen35", _seq(_split(_I + P.QWEN35[len(P._CONTRACTIONS):]), _bytelevel(False)), "qwen35",
         normalizer=NFC),
    Spec("seed-coder", _seq(_split(P.SEED_CODER), _bytelevel(False)), "seed-coder"),
    Spec("bailingmoe", _seq(_split(P.BAILINGMOE), _bytelevel(False)), "bailingmoe"),
    Spec("exaone-moe", _seq(_split(P.EXAONE_MOE), _bytelevel(False)), "exaone-moe"),
    Spec("jais-2", _seq(_split(P.JAIS2), _bytelevel(False)), "jais-2"),
    Spec("minicpm5", _seq(_split(r"\p{N}{1,3}"), _split(P.MINICPM5), _bytelevel(False)), "minicpm5",
         ignore_merges=True),
    Spec("laguna", _seq(_split(P.LAGUNA_LINES), _split(P.QWEN2), _bytelevel(False)), "laguna"),
    Spec("bloom", _seq(_split(r" ?[^(\s|[.,!?…。，、।۔،])]+"), _bytelevel(False)), "bloom"),
    Spec("viking", _seq(_split(P.BLOOM), _digits(True), _bytelevel(False)), "viking"),
    Spec("spark2_5", _seq(_split(r"\p{N}{1,3}"), _split(P.DEEPSEEK3_CJK), _split(P.SPARK_MAIN), _digits(True),
                          _bytelevel(False)), "spark2_5"),
    Spec("youtu", _seq(_split(P.YOUTU_CJK), _split(P.YOUTU_MAIN), _bytelevel(False)), "youtu",
         ignore_merges=True),
    Spec("ufakzeka", _seq(_split(P.UFAKZEKA), _bytelevel(False)), "ufakzeka"),
    Spec("falcon", FALCON_PRE, "falcon"),
)}

# CohereLabs/tiny-aya-base's: refused structurally (llama.cpp's \b is ASCII-only)
TINY_AYA_PRE = _seq(_split(P.TINY_AYA_DIGITS), _split(GPT4O_ORIG), _bytelevel(False))
# a made-up split no llama.cpp pre-tokenizer implements
MADE_UP_REGEX = r"\p{L}{1,4}|\p{N}+|[^\s\p{L}\p{N}]+|\s+"
MADE_UP_PRE = _seq(_split(MADE_UP_REGEX), _bytelevel(False))


def training_text(eval_text: str, chars: int = 400_000) -> list[str]:
    """A slice of the eval text (line by line) plus multilingual lines, so merges cover every script."""
    return eval_text[:chars].splitlines() + _EXTRA_TRAINING


def build(dest: Path, pre_tokenizer: dict[str, Any], corpus: list[str], *, normalizer: dict[str, Any] | None = None,
          ignore_merges: bool = False, vocab_size: int = 3000, clean_spaces: bool | None = None) -> Path:
    """Train a byte-level BPE with this pre-tokenization and save tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    base = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    base.decoder = decoders.ByteLevel()
    tj = json.loads(base.to_str())
    tj["pre_tokenizer"], tj["normalizer"] = pre_tokenizer, normalizer
    tok = Tokenizer.from_str(json.dumps(tj))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": BOS,
                              "model_max_length": 512}
    if clean_spaces is not None:
        config["clean_up_tokenization_spaces"] = clean_spaces
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


def build_spec(dest: Path, spec: Spec, corpus: list[str]) -> Path:
    return build(dest, spec.pre_tokenizer, corpus, normalizer=spec.normalizer, ignore_merges=spec.ignore_merges,
                 clean_spaces=spec.clean_spaces)
