"""The evaluation text: wikitext-2-raw test, the corpus llama.cpp's and most papers' perplexity tables use.

Perplexity is only comparable across runs and tools on byte-identical text, so the
corpus is pinned by the sha256 of its LF-normalised form, whichever copy it comes from:
a path the caller names, ``LLMOPS_EVAL_TEXT``, a cached copy, or a fresh download.
"""

from __future__ import annotations

import os
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmops.core.atomic import new_file
from llmops.core.errors import LLMOpsError
from llmops.core.settings import cache_dir
from llmops.core.hashing import sha256_text

ENV_VAR = "LLMOPS_EVAL_TEXT"
FILE_NAME = "wiki.test.raw"
# Of the text after CRLF -> LF; the CRLF original (1,290,547 bytes) is 4f3e427e...4103c.
WIKITEXT2_SHA256 = "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a"
WIKITEXT2_BYTES = 1_287_656
ZIP_URL = "https://wikitext.smerity.com/wikitext-2-raw-v1.zip"
ZIP_MEMBER = "wikitext-2-raw/wiki.test.raw"
PARQUET_URL = (
    "https://huggingface.co/datasets/Salesforce/wikitext/resolve/main/"
    "wikitext-2-raw-v1/test-00000-of-00001.parquet"
)
# Tried in order: the original distribution first, Hugging Face's copy second.
SOURCES: tuple[str, ...] = (ZIP_URL, PARQUET_URL)
TIMEOUT_S = 60.0

Progress = Callable[[str], None] | None


@dataclass(frozen=True)
class EvalText:
    text: str
    path: Path
    sha256: str
    source: str

    @property
    def is_wikitext2(self) -> bool:
        return self.sha256 == WIKITEXT2_SHA256


# Calibration data (GPTQ) must never be text the evaluation scores. Evaluation reads
# windows from the start of the text and stops at the split; calibration draws from
# the part after it. 16 chunks of 512 tokens use the first ~3% of wikitext-2 test, so
# reserving the last fifth changes no published-style figure.
CALIBRATION_FRACTION = 0.2


def calibration_split(text: str) -> int:
    """Character offset where the calibration part begins: the first line start at or after 80%."""
    if not text:
        return 0
    at = int(len(text) * (1.0 - CALIBRATION_FRACTION))
    nl = text.find("\n", at)
    return len(text) if nl < 0 else nl + 1


def evaluation_part(text: str) -> str:
    return text[: calibration_split(text)]


def calibration_part(text: str) -> tuple[str, int]:
    """(the text calibration may use, its character offset in ``text``)."""
    cut = calibration_split(text)
    return text[cut:], cut


def normalise(text: str) -> str:
    """CRLF to LF, as published evaluations do before tokenizing."""
    return text.replace("\r\n", "\n")


def cached_path() -> Path:
    return cache_dir() / "data" / "wikitext-2-raw" / FILE_NAME


def load_eval_text(
    path: str | Path | None = None,
    *,
    sources: Sequence[str] | None = None,
    progress: Progress = None,
) -> EvalText:
    """The text to evaluate on: ``path``, else ``LLMOPS_EVAL_TEXT``, else wikitext-2 (cached or downloaded).

    A folder is accepted where it holds ``wiki.test.raw``, so the dataset folder itself can be named.
    """
    if path is not None:
        return _read(_existing(Path(path), "eval text"), f"file {path}")
    env = os.environ.get(ENV_VAR)
    if env:
        return _read(_existing(Path(env), f"{ENV_VAR}"), f"{ENV_VAR}={env}")

    cached = cached_path()
    if cached.is_file():
        loaded = _read(cached, f"cached wikitext-2-raw test ({cached})")
        if loaded.is_wikitext2:
            return loaded
        if progress is not None:
            progress(f"cached copy {cached} does not match wikitext-2-raw test; downloading it again")
    download_wikitext2(cached, sources=SOURCES if sources is None else sources, progress=progress)
    return _read(cached, f"wikitext-2-raw test, downloaded to {cached}")


def _existing(path: Path, what: str) -> Path:
    path = path.expanduser()
    if path.is_dir() and (path / FILE_NAME).is_file():
        return path / FILE_NAME
    if not path.is_file():
        raise LLMOpsError(f"{what}: no such file: {path}")
    return path


def _read(path: Path, source: str) -> EvalText:
    try:
        text = normalise(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise LLMOpsError(f"eval text {path} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise LLMOpsError(f"cannot read eval text {path}: {exc.strerror or exc}") from None
    return EvalText(text=text, path=path, sha256=sha256_text(text), source=source)


def download_wikitext2(
    dest: Path, *, sources: Sequence[str] = SOURCES, progress: Progress = None, timeout: float = TIMEOUT_S
) -> Path:
    """Fetch wikitext-2-raw test to ``dest`` (LF line endings), refusing any text but the pinned one.

    Each source is downloaded to a temporary file and only the verified text is renamed into
    place, so a failed or wrong download never leaves a file a later run would pick up.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in sources:
        if progress is not None:
            progress(f"downloading wikitext-2-raw test from {url}")
        try:
            text = _fetch(url, dest.parent, timeout)
        except LLMOpsError as exc:
            failures.append(f"{url}: {exc}")
            continue
        digest = sha256_text(text)
        if digest != WIKITEXT2_SHA256:
            size = len(text.encode("utf-8"))
            failures.append(
                f"{url}: text has sha256 {digest} ({size} bytes), expected {WIKITEXT2_SHA256} ({WIKITEXT2_BYTES} bytes)"
            )
            continue
        _write_atomic(dest, text)
        return dest
    raise LLMOpsError("could not obtain wikitext-2-raw test: " + "; ".join(failures or ["no sources given"]))


def _fetch(url: str, workdir: Path, timeout: float) -> str:
    fd, tmp_name = tempfile.mkstemp(prefix=".download.", suffix=".tmp", dir=workdir)
    tmp = Path(tmp_name)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "llmops"})
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
                while block := response.read(1 << 20):
                    out.write(block)
        except OSError as exc:  # URLError, HTTPError and timeouts are all OSErrors
            raise LLMOpsError(f"download failed: {getattr(exc, 'reason', None) or exc}") from None
        return normalise(_extract(url, tmp))
    finally:
        tmp.unlink(missing_ok=True)


def _extract(url: str, payload: Path) -> str:
    name = url.split("?", 1)[0].lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(payload) as zf:
                return _without_blank_lines(zf.read(ZIP_MEMBER).decode("utf-8"))
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            # One row per line, each keeping its own newline.
            return "".join(pq.read_table(payload, columns=["text"]).column("text").to_pylist())
        return _without_blank_lines(payload.read_bytes().decode("utf-8"))
    except KeyError:
        raise LLMOpsError(f"archive has no {ZIP_MEMBER}") from None
    except (zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise LLMOpsError(f"unreadable download ({exc})") from None
    except Exception as exc:  # pyarrow raises its own error types for a damaged file
        if type(exc).__module__.startswith("pyarrow"):
            raise LLMOpsError(f"unreadable parquet ({exc})") from None
        raise


def _without_blank_lines(text: str) -> str:
    """The distribution file in the form the pinned hash has.

    Hugging Face's copy was made by reading the original file line by line in text mode
    and storing whitespace-only lines as empty rows, so its rows joined (the pinned form)
    have no blank lines, while the original file still has them.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    kept = [line + "\n" for line in lines[:-1] if line.strip()]
    if lines[-1].strip():
        kept.append(lines[-1])
    return "".join(kept)


def _write_atomic(dest: Path, text: str) -> None:
    # an ordinary file's permissions (0o666 less the umask), not mkstemp's private ones
    fd, tmp = new_file(dest.parent, f".{dest.name}.", ".tmp", 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(text.encode("utf-8"))
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
