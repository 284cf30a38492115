"""Calibration data for GPTQ: which text, which tokens, and a record of exactly that.

GPTQ fits each layer to activations produced by calibration text, so that text
must never be text the evaluation later scores, or the reported perplexity would
flatter the artifact. By default the calibration tokens come from the part of the
eval text that :mod:`llmops.core.evaltext` reserves for calibration (the tail, which
evaluation never reads); a user-named file is used as it is.

The tokens are cut as consecutive windows of ``tokens_per_sample`` tokens from the
start of that text, so the record (file, sha256, character range) names every
character that influenced the weights, and a rerun picks the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.core.errors import LLMOpsError, UsageError
from llmops.core.progress import as_reporter

DEFAULT_SAMPLES = 32
DEFAULT_TOKENS = 256
MIN_TOKENS = 8
# Characters tokenized at first per wanted token; doubled until there are enough tokens.
_CHARS_PER_TOKEN = 6


@dataclass
class Calibration:
    samples: list[list[int]]  # token ids, each exactly tokens_per_sample long
    path: Path
    sha256: str
    char_offset: int  # first character used, in the (LF-normalised for eval text) text of ``path``
    char_end: int  # one past the last character whose tokens were used
    tokens_per_sample: int
    source: str  # "eval-text tail" or "file"

    def record(self) -> dict[str, Any]:
        """What ``record.parameters["calibration"]`` holds (the registry turns it into a dataset edge)."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "char_offset": self.char_offset,
            "char_end": self.char_end,
            "samples": len(self.samples),
            "tokens_per_sample": self.tokens_per_sample,
            "source": self.source,
        }


def _positive_int(options: dict[str, Any], key: str, default: int, minimum: int = 1) -> int:
    value = options.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"GPTQ option {key} must be an integer >= {minimum}, got {value!r}")
    return value


def calibration_text(options: dict[str, Any], progress: Callable[[str], None]) -> tuple[str, int, Path, str]:
    """(text to draw from, its offset in the file's text, the file, "file" | "eval-text tail")."""
    from llmops.core.evaltext import calibration_part, load_eval_text

    named = options.get("calibration_file")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise UsageError(f"calibration file {path}: no such file")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise LLMOpsError(f"calibration file {path} is not UTF-8 ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise LLMOpsError(f"cannot read calibration file {path}: {e.strerror or e}") from None
        return text, 0, path, "file"
    ev = load_eval_text(options.get("eval_text_file"), progress=progress)
    part, offset = calibration_part(ev.text)
    return part, offset, Path(ev.path), "eval-text tail"


def build_calibration(tokenizer: Any, options: dict[str, Any], progress: Callable[[str], None]) -> Calibration:
    """Tokenize just enough of the calibration text for ``samples`` windows of ``tokens`` tokens
    (a progress phase counting the samples cut so far)."""
    from llmops.core.hashing import sha256_file

    rep = as_reporter(progress)
    samples = _positive_int(options, "calibration_samples", DEFAULT_SAMPLES)
    per = _positive_int(options, "calibration_tokens", DEFAULT_TOKENS, MIN_TOKENS)
    text, offset, path, source = calibration_text(options, rep)
    if not text.strip():
        raise LLMOpsError(f"calibration text from {path} is empty")
    want = samples * per
    n_chars = min(len(text), want * _CHARS_PER_TOKEN)
    with rep.phase("calibration", total=samples, unit="sample") as bar:
        while True:
            enc = tokenizer(text[:n_chars], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            # The last token of a cut text may be a fragment of a longer one: never use it
            # unless the whole text was tokenized.
            usable = len(ids) if n_chars >= len(text) else max(0, len(ids) - 1)
            bar.advance(min(samples, usable // per) - bar.done)
            if usable >= want or n_chars >= len(text):
                break
            n_chars = min(len(text), n_chars * 2)
    n = min(samples, usable // per)
    if n == 0:
        raise LLMOpsError(f"calibration text from {path} has only {usable} tokens; one sample needs {per} "
                          "(use a longer text or fewer calibration tokens)")
    if n < samples:
        rep.warn(f"calibration text from {path} holds {usable} tokens: using {n} samples of {per} "
                 f"instead of {samples}")
    used = [ids[i * per:(i + 1) * per] for i in range(n)]
    char_end = offset + int(offsets[n * per - 1][1])
    return Calibration(samples=used, path=path.resolve(), sha256=sha256_file(path), char_offset=offset,
                       char_end=char_end, tokens_per_sample=per, source=source)
