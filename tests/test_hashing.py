"""Copying with the hash: one read of the source gives the same hash as hashing it, and the same bytes."""

from __future__ import annotations

import os

import pytest

from llmops.core.hashing import copy_path_hashing, sha256_path


def test_file_copy_hash_equals_hash_and_bytes(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom((8 << 20) * 2 + 12345))  # more than two copy blocks, ragged end
    dst = tmp_path / "store" / "a.bin"
    assert copy_path_hashing(src, dst) == sha256_path(src)
    assert dst.read_bytes() == src.read_bytes()


def test_empty_file(tmp_path):
    src = tmp_path / "empty"
    src.write_bytes(b"")
    assert copy_path_hashing(src, tmp_path / "copy") == sha256_path(src)


def test_folder_copy_hash_equals_manifest_hash(tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "w.bin").write_bytes(os.urandom(100_000))
    dst = tmp_path / "copy"
    assert copy_path_hashing(src, dst) == sha256_path(src)
    assert sha256_path(dst) == sha256_path(src)


def _direct_used(monkeypatch) -> list:  # noqa: ANN001 - pytest's monkeypatch
    """Every file goes by direct I/O, in windows of 1 MiB; the list collects ``_copy_direct``'s
    answers (None: the filesystem took no direct I/O)."""
    import llmops.core.hashing as hashing

    answers: list = []
    real = hashing._copy_direct

    def recorded(*args, **kwargs):  # noqa: ANN002, ANN003
        answers.append(real(*args, **kwargs))
        return answers[-1]

    monkeypatch.setattr(hashing, "DIRECT_MIN", 0)
    monkeypatch.setattr(hashing, "MAP_WINDOW", 1 << 20)
    monkeypatch.setattr(hashing, "_copy_direct", recorded)
    return answers


def test_direct_copy_writes_the_hashed_bytes(tmp_path, monkeypatch):
    """Direct I/O from the source's mapping: every size around the block and window edges gives
    the source's bytes and hash."""
    answers = _direct_used(monkeypatch)
    for size in (1, 4095, 4096, 4097, (1 << 20) - 1, (3 << 20) + 4096, (3 << 20) + 12345):
        src, dst = tmp_path / f"s{size}", tmp_path / "store" / f"s{size}"
        src.write_bytes(os.urandom(size))
        assert copy_path_hashing(src, dst) == sha256_path(src), size
        assert dst.read_bytes() == src.read_bytes(), size
    if answers and answers[0] is None:
        pytest.skip("this filesystem takes no direct I/O (the page-cache copy ran)")
    assert all(a is not None for a in answers)


def test_direct_copy_refuses_a_source_changed_meanwhile(tmp_path, monkeypatch):
    """The hash and the device read the source at different moments: a source rewritten during
    the copy fails it instead of storing bytes that are not the ones hashed."""
    import hashlib

    import llmops.core.hashing as hashing
    from llmops.core.errors import LLMOpsError

    answers = _direct_used(monkeypatch)
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(3 << 20))
    real_sha = hashlib.sha256

    class Rewriting:  # rewrites a byte of the source after the first window is hashed
        def __init__(self) -> None:
            self.h, self.calls = real_sha(), 0

        def update(self, data) -> None:  # noqa: ANN001
            self.h.update(data)
            self.calls += 1
            if self.calls == 1:
                with open(src, "r+b") as f:
                    f.seek(2 << 20)
                    f.write(b"\1")

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    monkeypatch.setattr(hashing.hashlib, "sha256", Rewriting)
    try:
        copy_path_hashing(src, tmp_path / "copy.bin")
    except LLMOpsError as e:
        assert "changed while it was being copied" in str(e)
    else:
        if answers and answers[0] is None:
            pytest.skip("this filesystem takes no direct I/O")
        raise AssertionError("a source changed during the copy was stored")
