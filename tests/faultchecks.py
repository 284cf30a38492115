"""What must hold after every fault of the campaign, read straight from the database and the disk:
no recorded byte lost or changed, version numbers without gaps or duplicates, every alias where
its audit trail says. Plain SQL on MLflow's and llmops' tables, not llmops' own code: a check
that went through the code under test could share its mistakes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _engine(db_url: str):  # noqa: ANN202
    from sqlalchemy import create_engine

    return create_engine(db_url, connect_args={"connect_timeout": 10} if db_url.startswith("postgresql") else {})


def rows(db_url: str, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
    """The rows one query returns, on a connection of its own (closed before returning)."""
    from sqlalchemy import text

    eng = _engine(db_url)
    try:
        with eng.connect() as c:
            return list(c.execute(text(sql), params or {}).all())
    finally:
        eng.dispose()

def _path(uri: str, store_dir: Path) -> Path | None:
    from llmops.registry.artifacts import local_path

    local = local_path(uri)
    if local is not None:
        return local
    if uri.startswith("mlflow-artifacts:"):
        return store_dir / "artifacts" / uri.split(":", 1)[1].lstrip("/")
    return None


HASH_LIMIT = 64 << 20  # bytes up to this size are hashed; larger ones compared by size


def recorded_bytes(db_url: str, store_dir: Path) -> dict[str, tuple[int, str | None]]:
    """Every stored artifact's bytes: path -> (size, sha256 when small enough to hash)."""
    out = {}
    for uri, sha, size, meta in rows(db_url, "SELECT uri, sha256, size_bytes, metadata FROM llmops_artifacts"):
        meta = json.loads(meta) if isinstance(meta, str) else (meta or {})
        path = _path(uri, store_dir) if meta.get("stored") else None
        if path is not None:
            out[str(path)] = (size, sha if size <= HASH_LIMIT else None)
    return out


def lost_bytes(before: dict[str, tuple[int, str | None]]) -> list[str]:
    from llmops.core.hashing import sha256_path, size_of

    lost = []
    for path, (size, sha) in before.items():
        p = Path(path)
        if not p.exists():
            lost.append(f"{path}: gone")
        elif size_of(p) != size:
            lost.append(f"{path}: {size_of(p)} bytes, {size} recorded")
        elif sha is not None and sha256_path(p) != sha:
            lost.append(f"{path}: changed")
    return lost


LIVE_VERSIONS = "SELECT name, version FROM model_versions WHERE current_stage <> 'Deleted_Internal'"


def numbering_gaps(db_url: str) -> list[str]:
    """Model and prompt versions (MLflow's, deleted ones aside) and dataset versions (ours): 1..N."""
    mv = rows(db_url, LIVE_VERSIONS)
    ds = rows(db_url, "SELECT name, version FROM llmops_versions WHERE kind = 'dataset'")
    out = []
    for what, found in (("model/prompt", mv), ("dataset", ds)):
        by: dict[str, list[int]] = {}
        for name, version in found:
            by.setdefault(name, []).append(int(version))
        for name, numbers in sorted(by.items()):
            if sorted(numbers) != list(range(1, len(numbers) + 1)):
                out.append(f"{what} {name}: versions {sorted(numbers)}")
    return out


def alias_problems(db_url: str) -> list[str]:
    """Each alias of a model llmops knows is where the last audited move put it."""
    moves = rows(db_url, "SELECT model, alias, version FROM llmops_promotions WHERE verdict IN "
                         "('passed', 'forced', 'rollback') ORDER BY id")
    actual = {(n, a): str(v) for n, a, v in rows(db_url, "SELECT name, alias, version FROM registered_model_aliases")}
    live = {(n, str(v)) for n, v in rows(db_url, LIVE_VERSIONS)}
    ours = {n for (n,) in rows(db_url, "SELECT DISTINCT name FROM llmops_versions WHERE kind = 'model'")}
    want: dict[tuple[str, str], str] = {}
    for model, alias, version in moves:
        want[(model, alias)] = str(version)
    out = []
    for key in sorted(set(want) | {k for k in actual if k[0] in ours}):
        w = want.get(key)
        if w is not None and (key[0], w) not in live:
            w = None
        if actual.get(key) != w:
            out.append(f"models:/{key[0]}@{key[1]} on {actual.get(key)}, audit trail says {w}")
    return out
