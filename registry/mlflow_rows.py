"""What llmops marks on the MLflow objects it makes, and the one write it makes to MLflow's own
tables: removing a model version that never became one.

Marks. Every MLflow run, LoggedModel and prompt version llmops makes carries its owner
(``llmops.owner``: the making process, ``core.owners.token``), so that one left unfinished by a
process that is gone is told from one still being made; a registered model llmops creates is
tagged ``llmops.made_by``. ``llmops doctor`` reads these marks.

Purging. MLflow's ``delete_model_version`` is a soft delete that keeps the number: a registration
that failed (or was killed) after MLflow numbered its version would leave that number unused for
good, and the next registration a gap (versions 1, 2, 4). A version that never had llmops rows
is not history anyone saw, so it is removed outright where MLflow's tables are in llmops'
database (the local store, and a tracking server on the same database, as the README sets one
up): its tags, then its row, in one transaction. Elsewhere the soft delete is all there is.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import inspect, text

from llmops.core import owners
from llmops.registry.store import Store

OWNER_TAG = "llmops.owner"
MADE_TAG = "llmops.made_by"
MADE_BY = "llmops"
# MLflow's stage of a soft-deleted model version
DELETED_STAGE = "Deleted_Internal"


def owner_tags() -> dict[str, str]:
    return {OWNER_TAG: owners.token()}


def owner_state(tags: dict[str, Any] | None) -> bool | None:
    """Whether the process that made an object still runs: True, False, or None (no mark, or
    another host's: nobody here can tell)."""
    mark = (tags or {}).get(OWNER_TAG)
    return owners.alive(mark) if mark else None


def registry_tables_here(store: Store) -> bool:
    """Whether MLflow's registry tables are in llmops' database (purging is possible)."""
    try:
        return inspect(store.engine).has_table("model_versions")
    except Exception:  # noqa: BLE001 - an unreachable database: not now
        return False


def purge_version(store: Store, client, name: str, version: str | int,  # noqa: ANN001 - MlflowClient
                  run_id: str | None = None) -> bool:
    """Remove model version ``name``/``version`` so that its number is given again; True when it
    was purged, False when only MLflow's soft delete could be done. ``run_id``: purge only if the
    version names this registration run (a guard against removing another writer's version)."""
    if registry_tables_here(store):
        with store.engine.begin() as conn:
            row = conn.execute(text("SELECT run_id FROM model_versions WHERE name = :n AND version = :v"),
                               {"n": name, "v": int(version)}).first()
            if row is None:
                return True
            if run_id is not None:
                tagged = conn.execute(text("SELECT value FROM model_version_tags WHERE name = :n AND version = :v "
                                           "AND key = 'llmops.run_id'"), {"n": name, "v": int(version)}).scalar()
                if run_id not in (row[0], tagged):
                    return False
            conn.execute(text("DELETE FROM registered_model_aliases WHERE name = :n AND version = :v"),
                         {"n": name, "v": int(version)})
            conn.execute(text("DELETE FROM model_version_tags WHERE name = :n AND version = :v"),
                         {"n": name, "v": int(version)})
            conn.execute(text("DELETE FROM model_versions WHERE name = :n AND version = :v"),
                         {"n": name, "v": int(version)})
        return True
    client.delete_model_version(name, str(version))
    return False


def deleted_versions(store: Store) -> list[dict[str, Any]]:
    """Soft-deleted model versions with their tags (empty where MLflow's tables are elsewhere)."""
    if not registry_tables_here(store):
        return []
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT name, version FROM model_versions WHERE current_stage = :s"),
                            {"s": DELETED_STAGE}).all()
        out = []
        for name, version in rows:
            tags = dict(conn.execute(text("SELECT key, value FROM model_version_tags WHERE name = :n AND "
                                          "version = :v"), {"n": name, "v": version}).all())
            out.append({"name": name, "version": str(version), "tags": tags})
    return out


def highest_version(store: Store, name: str) -> int | None:
    """The highest number MLflow has given a version of ``name``, deleted ones included (None
    where its tables are elsewhere)."""
    if not registry_tables_here(store):
        return None
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT MAX(version) FROM model_versions WHERE name = :n"), {"n": name}).scalar() or 0
