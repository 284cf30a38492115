"""The serve cache: verified private copies of the bytes a server loads.

``serve/<sha256>/<name>`` under the cache folder holds a version's bytes where nothing but
llmops writes them: downloaded from a tracking server, or copied out of a local store whose
file is shared with its owner (``models register --link``). Bytes take an entry's place only
once they hash right; an entry is hashed again before each use, and one that no longer
matches is removed and filled again. A failed fill leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from llmops.app.output import log
from llmops.core.errors import LLMOpsError
from llmops.core.hashing import sha256_path
from llmops.core.settings import cache_dir
from llmops.core.walk import files_of

SERVE_CACHE = "serve"


def check(actual: str, expected: str, label: str) -> None:
    if actual != expected:
        raise LLMOpsError(f"the stored bytes of {label} do not match the registry "
                          f"(sha256 {actual[:16]}…, recorded {expected[:16]}…): refusing to load them")


def shared(path: Path) -> bool:
    """Whether a stored file (or any file of a stored folder) has another name outside the store
    (``models register --link``): its owner can change it in place."""
    files = [e.path for e in files_of(path)] if path.is_dir() else [path]
    return any(os.stat(f).st_nlink > 1 for f in files)


def cached(sha256: str, uri: str, label: str, fill: Callable[[Path], str]) -> Path:
    """The verified copy of these bytes in the serve cache (``serve/<sha256>/<name>``).

    An entry is re-hashed before each use; one that no longer matches (a disk error, a partial
    copy by hand, an edit) is removed and filled again. ``fill(folder)`` writes the bytes into an
    empty private folder under the entry's name and returns their sha256; only bytes that match
    take the entry's place, and a failed fill leaves nothing behind."""
    root = cache_dir() / SERVE_CACHE
    root.mkdir(parents=True, exist_ok=True)
    dest = root / sha256
    entry_name = uri.rstrip("/").rsplit("/", 1)[-1]
    if dest.exists():
        entry = dest / entry_name
        if entry.exists() and sha256_path(entry) == sha256:
            return entry
        log(f"warning: the cached copy of {label} at {dest} does not match its sha256: fetching it again")
        _remove(dest, root)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        check(fill(tmp), sha256, label)
        _read_only(tmp)
        try:
            os.replace(tmp, dest)
        except OSError as exc:  # another server put its checked copy there first, or no room
            if not (dest / entry_name).exists():
                raise LLMOpsError(f"cannot write the serve cache at {dest}: {exc.strerror or exc}") from None
            check(sha256_path(dest / entry_name), sha256, label)
        return dest / entry_name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(dest: Path, root: Path) -> None:
    """Take a cache entry away at once (a rename), then delete it: a server still mapping its
    files keeps them until it unloads."""
    aside = Path(tempfile.mkdtemp(prefix=".removing-", dir=root))
    try:
        os.replace(dest, aside / "entry")
    except OSError:
        pass  # gone already
    shutil.rmtree(aside, ignore_errors=True)


def _read_only(folder: Path) -> None:
    """The cached files may not be written by mistake (their folders stay writable, to be removed)."""
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o444)
