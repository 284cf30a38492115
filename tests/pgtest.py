"""The PostgreSQL server the tests use (``LLMOPS_TEST_PG_URL``, by default the local one with
trust auth): reaching it, and a database of one's own on it, dropped afterwards even with
clients still connected. Plain helpers, shared by the fixtures and the fault campaign."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

PG_ADMIN_URL = os.environ.get("LLMOPS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def admin_engine(connect_timeout: int = 5):  # noqa: ANN201
    from sqlalchemy import create_engine

    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": connect_timeout})


def unreachable() -> str | None:
    """Why the server cannot be reached, or None when it can."""
    try:
        eng = admin_engine(3)
        with eng.connect() as c:
            c.exec_driver_sql("SELECT 1")
        eng.dispose()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def url_of(db: str, port: int | None = None) -> str:
    """The URL of database ``db`` (through ``port`` instead of the server's own, e.g. a proxy)."""
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    if port is not None:
        base = base.replace(":5432", f":{port}")
    return f"{base}/{db}"


@contextlib.contextmanager
def database(prefix: str = "llmops_test", template: str | None = None) -> Iterator[str]:
    """A new database's name, dropped (``WITH (FORCE)``) when the block ends."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    eng = admin_engine()
    with eng.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    try:
        yield name
    finally:
        with eng.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        eng.dispose()
