"""Content hashes: one definition of "the same bytes" for files and folders.

A folder's hash is the sha256 of a manifest (relative path, size, sha256 of each
file, sorted), so the same checkpoint copied elsewhere hashes the same, and a
single changed byte anywhere changes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def folder_manifest(path: str | os.PathLike[str]) -> list[dict[str, object]]:
    root = Path(path)
    entries = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            entries.append(
                {"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
            )
    return entries


def sha256_path(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, or of a folder's manifest."""
    p = Path(path)
    if p.is_dir():
        manifest = json.dumps(folder_manifest(p), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(manifest.encode()).hexdigest()
    return sha256_file(p)


def size_of(path: str | os.PathLike[str]) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    return p.stat().st_size


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
