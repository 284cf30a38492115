"""Engines, sessions and migrations for the llmops tables.

SQLite runs in WAL mode with a busy timeout so that two processes (a CLI and
the UI server, or two CI jobs) can write at once. The same code targets
PostgreSQL: nothing here or in the queries is SQLite-only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.orm import Session, sessionmaker

VERSION_TABLE = "llmops_alembic_version"
SQLITE_BUSY_MS = 60_000


def _on_sqlite_connect(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI hook
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}")
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


_ENGINES: dict[str, Engine] = {}


def engine_for(url: str) -> Engine:
    """One pooled engine per database URL for the life of the process."""
    engine = _ENGINES.get(url)
    if engine is None:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000})
            event.listen(engine, "connect", _on_sqlite_connect)
        else:
            engine = create_engine(url, pool_pre_ping=True)
        _ENGINES[url] = engine
    return engine


def dispose_all() -> None:
    while _ENGINES:
        _ENGINES.popitem()[1].dispose()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: committed on success, rolled back on any error."""
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def migrations_dir() -> Path:
    """The Alembic script folder, in a wheel or in a source checkout.

    ``alembic/`` has no ``__init__.py`` on purpose: a regular package named
    ``alembic`` at the repository root would shadow the real Alembic (and break
    MLflow) whenever the root is on ``sys.path``. In a wheel it is the namespace
    package ``llmops.migrations``; an editable install cannot map a namespace
    package, so there we find it beside ``registry/``.
    """
    spec = importlib.util.find_spec("llmops.migrations")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "env.py").is_file():
                return Path(loc)
    source_tree = Path(__file__).resolve().parent.parent / "alembic"
    if (source_tree / "env.py").is_file():
        return source_tree
    raise RuntimeError("llmops migrations are not installed")


def _alembic_config(url: str):  # noqa: ANN202 - alembic.config.Config, imported lazily
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head() or ""


def current_revision(engine: Engine) -> str | None:
    if not inspect(engine).has_table(VERSION_TABLE):
        return None
    with engine.connect() as conn:
        row = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).first()
    return row[0] if row else None


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Apply our migrations; cheap when already at head (one SELECT)."""
    if revision == "head" and current_revision(engine) == head_revision():
        return current_revision(engine)
    from alembic import command

    cfg = _alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return current_revision(engine)


def add_unique(session: Session, row: object, find: Callable[[], object | None]) -> object:
    """Add ``row`` (whose unique key another writer may insert at the same moment) or, if that
    writer won, return its row: on PostgreSQL inside a savepoint, so the caller's transaction
    stays alive; SQLite writers are serialised, so there the insert simply goes through."""
    from sqlalchemy.exc import IntegrityError

    if session.get_bind().dialect.name == "sqlite":
        session.add(row)
        session.flush()
        return row
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        found = find()
        if found is None:
            raise
        return found
    return row


def best_effort(*steps: Callable[[], object] | None) -> None:
    """Run each clean-up step, ignoring its failure: the error that made us clean up matters."""
    for step in steps:
        if step is None:
            continue
        try:
            step()
        except Exception:  # noqa: BLE001, S110 - see docstring
            pass
