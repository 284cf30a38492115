"""Copying with the hash: one read of the source gives the same hash as hashing it, and the same bytes."""

from __future__ import annotations

import os

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
