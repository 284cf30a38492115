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
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _key(name)})
                conn.commit()
        return
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    path = store.settings.store_dir / f".lock-{safe}"
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
