from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from llmops.core import evaltext
from llmops.core.errors import LLMOpsError
from llmops.core.evaltext import WIKITEXT2_BYTES, WIKITEXT2_SHA256, load_eval_text

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def _shared_copy() -> Path:
    for candidate in (os.environ.get(evaltext.ENV_VAR), SHARED):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    if os.environ.get("CI"):
        pytest.fail(f"no local copy of wikitext-2-raw test at {SHARED} (set LLMOPS_EVAL_TEXT)")
    pytest.skip("no local copy of wikitext-2-raw test (set LLMOPS_EVAL_TEXT)")


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cache and no LLMOPS_EVAL_TEXT, so resolution reaches the download step."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMOPS_CACHE", str(cache))
    monkeypatch.delenv(evaltext.ENV_VAR, raising=False)
    return cache


@pytest.fixture
def wikitext_lf() -> str:
    return _shared_copy().read_bytes().decode("utf-8").replace("\r\n", "\n")


def _original_layout(text: str) -> str:
    # The distribution zip separates records with whitespace-only lines.
    return "".join(" \n" + line for line in text.splitlines(keepends=True)) + " \n"


def _zip(path: Path, text: str, member: str = evaltext.ZIP_MEMBER) -> str:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, text.encode("utf-8"))
        zf.writestr("wikitext-2-raw/wiki.valid.raw", b" \n = Other = \n")
    return path.as_uri()


def _parquet(path: Path, text: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for line in text.splitlines(keepends=True):
        rows += ["", line]
    pq.write_table(pa.table({"text": rows}), path)
    return path.as_uri()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_explicit_path_normalises_crlf(tmp_path: Path) -> None:
    f = tmp_path / "t.raw"
    f.write_bytes(b" = Title = \r\n body 1 @,@ 000 .\r\n")
    loaded = load_eval_text(f)
    assert loaded.text == " = Title = \n body 1 @,@ 000 .\n"
    assert loaded.path == f
    assert loaded.sha256 == hashlib.sha256(b" = Title = \n body 1 @,@ 000 .\n").hexdigest()
    assert str(f) in loaded.source
    assert not loaded.is_wikitext2


def test_folder_holding_the_file_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "wiki.test.raw").write_text("x\n", encoding="utf-8")
    assert load_eval_text(tmp_path).text == "x\n"


def test_explicit_path_wins_over_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("from a\n", encoding="utf-8")
    b.write_text("from b\n", encoding="utf-8")
    monkeypatch.setenv(evaltext.ENV_VAR, str(b))
    assert load_eval_text().text == "from b\n"
    assert evaltext.ENV_VAR in load_eval_text().source
    assert load_eval_text(a).text == "from a\n"


def test_missing_explicit_file_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(LLMOpsError) as err:
        load_eval_text(tmp_path / "nope.raw")
    assert "nope.raw" in str(err.value) and "\n" not in str(err.value)


def test_missing_env_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(evaltext.ENV_VAR, str(tmp_path / "gone.raw"))
    with pytest.raises(LLMOpsError, match=evaltext.ENV_VAR):
        load_eval_text()


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(LLMOpsError, match="UTF-8"):
        load_eval_text(f)


def test_shared_copy_is_the_pinned_corpus(wikitext_lf: str) -> None:
    loaded = load_eval_text(_shared_copy())
    assert loaded.is_wikitext2
    assert len(loaded.text.encode("utf-8")) == WIKITEXT2_BYTES


def test_download_from_distribution_zip(isolated: Path, tmp_path: Path, wikitext_lf: str) -> None:
    url = _zip(tmp_path / "wikitext-2-raw-v1.zip", _original_layout(wikitext_lf))
    messages: list[str] = []
    loaded = load_eval_text(sources=[url], progress=messages.append)
    assert loaded.sha256 == WIKITEXT2_SHA256
    assert loaded.path == evaltext.cached_path()
    assert loaded.path.read_bytes() == wikitext_lf.encode("utf-8")
    assert any(url in m for m in messages)
    assert _leftovers(loaded.path.parent) == ["wiki.test.raw"]

    # Served from the cache afterwards: no source is contacted.
    again = load_eval_text(sources=[(tmp_path / "absent.zip").as_uri()])
    assert again.sha256 == WIKITEXT2_SHA256 and "cached" in again.source


def test_crlf_zip_member_is_accepted(isolated: Path, tmp_path: Path) -> None:
    raw = _shared_copy().read_bytes().decode("utf-8")
    url = _zip(tmp_path / "w.zip", raw)
    assert load_eval_text(sources=[url]).sha256 == WIKITEXT2_SHA256


def test_parquet_is_the_fallback(isolated: Path, tmp_path: Path, wikitext_lf: str) -> None:
    broken = (tmp_path / "missing.zip").as_uri()
    url = _parquet(tmp_path / "test-00000-of-00001.parquet", wikitext_lf)
    loaded = load_eval_text(sources=[broken, url])
    assert loaded.sha256 == WIKITEXT2_SHA256
    assert _leftovers(loaded.path.parent) == ["wiki.test.raw"]


def test_wrong_text_is_refused_and_not_cached(isolated: Path, tmp_path: Path, wikitext_lf: str) -> None:
    tampered = wikitext_lf.replace("Robert Boulter", "Robert Boulder", 1)
    url = _zip(tmp_path / "w.zip", tampered)
    with pytest.raises(LLMOpsError, match="sha256") as err:
        load_eval_text(sources=[url])
    assert "\n" not in str(err.value)
    assert not evaltext.cached_path().exists()
    assert _leftovers(evaltext.cached_path().parent) == []


def test_zip_without_the_member_is_refused(isolated: Path, tmp_path: Path) -> None:
    url = _zip(tmp_path / "w.zip", "text\n", member="other/wiki.test.raw")
    with pytest.raises(LLMOpsError, match="no wikitext-2-raw/wiki.test.raw"):
        load_eval_text(sources=[url])
    assert not evaltext.cached_path().exists()


def test_all_sources_failing_names_each(isolated: Path, tmp_path: Path) -> None:
    a, b = (tmp_path / "a.zip").as_uri(), (tmp_path / "b.parquet").as_uri()
    (tmp_path / "b.parquet").write_bytes(b"not parquet")
    with pytest.raises(LLMOpsError) as err:
        load_eval_text(sources=[a, b])
    assert a in str(err.value) and b in str(err.value)
    assert _leftovers(evaltext.cached_path().parent) == []


def test_damaged_cache_is_fetched_again(isolated: Path, tmp_path: Path, wikitext_lf: str) -> None:
    cached = evaltext.cached_path()
    cached.parent.mkdir(parents=True)
    cached.write_text("truncated", encoding="utf-8")
    url = _zip(tmp_path / "w.zip", wikitext_lf)
    assert load_eval_text(sources=[url]).sha256 == WIKITEXT2_SHA256
    assert cached.read_text(encoding="utf-8") == wikitext_lf


def test_blank_lines_are_dropped_like_the_hub_copy() -> None:
    assert evaltext._without_blank_lines(" \n = A = \n \n b \r\n\t\n c") == " = A = \n b \n c"
