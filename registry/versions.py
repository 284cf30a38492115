"""Registered model versions: resolving references, reading versions, verifying stored bytes.

The write path (a registration, all or nothing) is ``registration.py``.
"""


from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select

from llmops.core.errors import LLMOpsError
from llmops.registry import artifacts
from llmops.registry.refs import Ref, parse_ref
from llmops.registry.store import Store
from llmops.registry.tables import Artifact, Version

ARTIFACT_PATH = "model"


@dataclass
class VersionInfo:
    name: str
    version: str
    uri: str
    run_id: str | None
    source: str | None
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    sha256: str | None = None
    size_bytes: int | None = None
    format: str | None = None
    quant: str | None = None
    stored_uri: str | None = None
    created_at: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ParentSpec:
    """What a new version came from: a registry reference or a path on disk."""

    ref_or_path: str
    relation: str = "converted_from"
    parameters: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None  # of a path, when the caller has hashed it already


def _ms_to_iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat()


# -- resolving -----------------------------------------------------------------
def resolve_model_version(store: Store, ref: Ref | str):  # noqa: ANN201 - mlflow ModelVersion
    from mlflow.exceptions import MlflowException

    ref = parse_ref(ref, kind="model") if isinstance(ref, str) else ref
    client = store.open().mlflow
    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        if ref.version == "latest":
            versions = client.search_model_versions(f"name='{ref.name}'")
            if not versions:
                raise LLMOpsError(f"model {ref.name!r} has no versions")
            return max(versions, key=lambda v: int(v.version))
        return client.get_model_version(ref.name, str(ref.version))
    except MlflowException as exc:
        raise LLMOpsError(f"{ref} not found in the registry") from exc


def artifact_for(store: Store, kind: str, name: str, version: str) -> Artifact | None:
    with store.session() as s:
        row = s.scalars(
            select(Version).where(Version.kind == kind, Version.name == name, Version.version == str(version))
        ).first()
        return row.artifact if row is not None else None


def resolve_artifact(store: Store, ref_or_path: str, session=None) -> Artifact:  # noqa: ANN001
    """The artifact row for a registry reference (which must exist)."""
    ref = parse_ref(ref_or_path)
    if ref.kind == "model":
        mv = resolve_model_version(store, ref)
        art = artifact_for(store, "model", mv.name, mv.version)
    else:
        art = None
        with store.session() as s:
            q = select(Version).where(Version.kind == ref.kind, Version.name == ref.name)
            if ref.version and ref.version != "latest":
                q = q.where(Version.version == ref.version)
            rows = s.scalars(q).all()
            if rows:
                art = max(rows, key=lambda r: int(r.version)).artifact
    if art is None:
        raise LLMOpsError(f"{ref_or_path} has no llmops record")
    return art


RUN_TAG = "llmops.run_id"


def run_of(mv) -> str | None:  # noqa: ANN001 - mlflow ModelVersion
    """The MLflow run that holds this version's parameters and metrics (see ``register``)."""
    return (getattr(mv, "tags", None) or {}).get(RUN_TAG) or mv.run_id


def _run_id_in(uri: str | None) -> str | None:
    m = re.search(r"/([0-9a-f]{32})/artifacts(/|$)", uri or "")
    return m.group(1) if m else None


# -- reading ---------------------------------------------------------------------
def show(store: Store, ref: Ref | str) -> VersionInfo:
    mv = resolve_model_version(store, ref)
    art = artifact_for(store, "model", mv.name, mv.version)
    metrics: dict[str, float] = {}
    if run_of(mv):
        try:
            metrics = dict(store.mlflow.get_run(run_of(mv)).data.metrics)
        except Exception:  # noqa: BLE001 - a deleted run leaves the version readable
            metrics = {}
    return VersionInfo(
        name=mv.name,
        version=str(mv.version),
        uri=f"models:/{mv.name}/{mv.version}",
        run_id=run_of(mv),
        source=mv.source,
        aliases=list(mv.aliases or []),
        tags=dict(mv.tags or {}),
        sha256=art.sha256 if art else (mv.tags or {}).get("sha256"),
        size_bytes=art.size_bytes if art else None,
        format=art.format if art else (mv.tags or {}).get("format"),
        quant=art.quant if art else (mv.tags or {}).get("quant"),
        stored_uri=art.uri if art else None,
        created_at=_ms_to_iso(mv.creation_timestamp),
        metrics=metrics,
    )


def list_models(store: Store) -> list[dict[str, Any]]:
    client = store.open().mlflow
    out = []
    for rm in client.search_registered_models(max_results=1000):
        versions = client.search_model_versions(f"name='{rm.name}'")
        latest = max(versions, key=lambda v: int(v.version)) if versions else None
        out.append(
            {
                "name": rm.name,
                "versions": len(versions),
                "latest_version": str(latest.version) if latest else None,
                "aliases": dict(rm.aliases or {}),
                "format": (latest.tags or {}).get("format") if latest else None,
                "quant": (latest.tags or {}).get("quant") if latest else None,
                "updated_at": _ms_to_iso(rm.last_updated_timestamp),
            }
        )
    return sorted(out, key=lambda r: r["name"])


def verify(store: Store, ref: str) -> dict[str, Any]:
    """Re-hash the stored bytes behind a reference and compare with the record."""
    art = resolve_artifact(store, ref)
    sha, size = artifacts.rehash(art.uri, store.settings.tracking_uri)
    ok = sha == art.sha256
    result = {"ref": ref, "uri": art.uri, "expected_sha256": art.sha256, "actual_sha256": sha,
              "size_bytes": size, "ok": ok}
    if not ok:
        raise VerifyFailed(result)
    return result


class VerifyFailed(LLMOpsError):
    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(
            f"{result['ref']}: stored bytes do not match the record "
            f"(expected sha256 {result['expected_sha256'][:16]}…, found {result['actual_sha256'][:16]}…)"
        )
        self.result = result
