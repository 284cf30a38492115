"""Alembic environment for the llmops tables.

MLflow keeps its own ``alembic_version`` in the same database, so ours is
``llmops_alembic_version``, and autogenerate looks only at ``llmops_`` tables.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from llmops.registry.tables import PREFIX, Base

config = context.config
VERSION_TABLE = "llmops_alembic_version"


def include_object(obj, name, type_, reflected, compare_to):  # noqa: ANN001 - alembic's hook signature
    if type_ == "table":
        return bool(name) and name.startswith(PREFIX)
    return True


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        include_object=include_object,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as conn:
        _run(conn)


def _run(connection) -> None:  # noqa: ANN001
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        include_object=include_object,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
