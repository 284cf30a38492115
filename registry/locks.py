"""A named lock that serialises read-decide-write sequences across processes.

Promotion reads the alias holder, evaluates gates and moves the alias; two of
those at once must not interleave. On PostgreSQL that is an advisory lock
(held on its own connection for the duration); on SQLite, whose writers share
one machine, a file lock in the store folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text

from llmops.registry.store import Store


def _key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextmanager
def named_lock(store: Store, name: str) -> Iterator[None]:
    store.open()
    if store.engine.dialect.name == "postgresql":
        with store.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _key(name)})
            try:
                yield
            finally:
                _unlock(conn, _key(name))
        return
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    path = store.settings.store_dir / f".lock-{safe}"
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _unlock(conn, key: int) -> None:  # noqa: ANN001 - a SQLAlchemy Connection
    """Release an advisory lock. If that fails, the lock's session is gone (a dropped connection, a
    terminated backend), and PostgreSQL released the lock with it: what ran under the lock has
    finished, so the failure is not the caller's; the connection is discarded, never reused.
    (Raised here, it turned a finished registration into a failed one, undone after its commit.)"""
    try:
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        conn.commit()
    except Exception:  # noqa: BLE001 - see the docstring
        conn.invalidate()


@contextmanager
def try_named_lock(store: Store, name: str) -> Iterator[bool]:
    """The lock of :func:`named_lock` if it is free at once (True, held for the block), else
    False at once: whether a writer is in the middle of ``name`` (``llmops doctor`` does not take
    an operation in flight for debris)."""
    store.open()
    if store.engine.dialect.name == "postgresql":
        with store.engine.connect() as conn:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _key(name)}).scalar())
            try:
                yield got
            finally:
                if got:
                    _unlock(conn, _key(name))
                conn.commit()
        return
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    path = store.settings.store_dir / f".lock-{safe}"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
