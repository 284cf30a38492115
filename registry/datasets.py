"""Versioned, content-addressed datasets (evaluation text, calibration data).

A new version only when the content changes. The bytes are stored once, as the
artifact of the MLflow run that added them; every run that uses a dataset logs
it as an MLflow dataset input, so the UI shows which data a model saw.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from llmops.core.errors import LLMOpsError, UsageError
from llmops.core.hashing import sha256_path, size_of
from llmops.registry import artifacts
from llmops.registry.locks import named_lock
from llmops.registry.mlflow_rows import owner_tags
from llmops.registry.refs import Ref, parse_ref, validate_name
from llmops.registry.store import Store, actor
from llmops.registry.db import best_effort
from llmops.registry.tables import Artifact, Version

ARTIFACT_PATH = "dataset"


@dataclass
class DatasetInfo:
    name: str
    version: str
    uri: str
    sha256: str
    size_bytes: int
    records: int | None
    format: str
    stored_uri: str
    message: str | None = None
    created: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def profile(path: Path) -> tuple[str, int | None]:
    """Format and record count, read cheaply (lines for text-like files)."""
    if path.is_dir():
        from llmops.core.walk import files_of

        return "folder", len(files_of(path))  # the files registration stores: linked folders' included
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return "parquet", pq.ParquetFile(path).metadata.num_rows
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            return "csv", max(sum(1 for _ in csv.reader(fh)) - 1, 0)
    if suffix in (".jsonl", ".ndjson"):
        with open(path, "rb") as fh:
            return "jsonl", sum(1 for line in fh if line.strip())
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return "json", len(data) if isinstance(data, list) else 1
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "json", None
    with open(path, "rb") as fh:
        return "text", sum(1 for _ in fh)


def _info(v: Version, message: str | None = None, created: bool = True) -> DatasetInfo:
    a = v.artifact
    return DatasetInfo(v.name, v.version, f"datasets:/{v.name}/{v.version}", a.sha256, a.size_bytes,
                       a.meta.get("records"), a.format or "text", a.uri, message or a.meta.get("message"), created)


def add(store: Store, name: str, path: str | Path, message: str | None = None) -> DatasetInfo:
    """A new version of dataset ``name`` holding the bytes at ``path``, or the latest version when
    it holds them already. Versions are numbered under a per-name lock (as model versions are),
    so concurrent adds of different files get 1..N."""
    validate_name(name, "dataset name")
    src = Path(path).expanduser().resolve()
    if not src.exists():
        raise UsageError(f"{path}: no such file or folder")
    sha = sha256_path(src)
    size = size_of(src)
    fmt, records = profile(src)
    store.open()
    with named_lock(store, f"dataset:{name}"):
        with store.session() as s:
            versions = s.scalars(select(Version).where(Version.kind == "dataset", Version.name == name)
                                 .order_by(Version.id.desc())).all()
            if versions and versions[0].artifact.sha256 == sha:
                return _info(versions[0], created=False)
            existing = artifacts.by_sha(s, sha)
            stored_uri = existing.uri if existing is not None and existing.meta.get("stored") else None
            number = max((int(v.version) for v in versions if v.version.isdigit()), default=0) + 1
        client = store.mlflow
        run = client.create_run(store.experiment_id, run_name=f"dataset-{name}",
                                tags={"llmops.command": "datasets add", "llmops.dataset": name, "mlflow.user": actor(),
                                      **owner_tags()})
        logged_uri = None
        try:
            if stored_uri is None:
                if src.is_dir():
                    client.log_artifacts(run.info.run_id, str(src), ARTIFACT_PATH)
                    stored_uri = f"{run.info.artifact_uri}/{ARTIFACT_PATH}"
                else:
                    client.log_artifact(run.info.run_id, str(src), ARTIFACT_PATH)
                    stored_uri = f"{run.info.artifact_uri}/{ARTIFACT_PATH}/{src.name}"
                logged_uri = f"{run.info.artifact_uri}/{ARTIFACT_PATH}"
            info = DatasetInfo(name, str(number), f"datasets:/{name}/{number}", sha, size, records, fmt, stored_uri,
                               message, True)
            client.log_inputs(run.info.run_id, [mlflow_input(info, "source")])
            client.set_terminated(run.info.run_id, "FINISHED")
            # The version row last: if it cannot be written, the run (and its copy) is undone.
            with store.session() as s:
                art = artifacts.upsert(s, sha256=sha, kind="dataset", name=name, uri=stored_uri, size_bytes=size,
                                       format=fmt, meta={}, created_by=actor())
                art.meta = {**art.meta, "stored": True, "records": records, "filename": src.name, "message": message}
                s.add(Version(kind="dataset", name=name, version=str(number), artifact_id=art.id,
                              mlflow_run_id=run.info.run_id))
                s.flush()
        except BaseException:
            _undo_run(client, run.info.run_id, logged_uri)
            raise
    return info


def _undo_run(client, run_id: str, logged_uri: str | None) -> None:  # noqa: ANN001 - MlflowClient
    """Best effort: the copied bytes, then the run (marked failed, then deleted)."""
    import shutil

    logged = artifacts.local_path(logged_uri) if logged_uri else None
    best_effort((lambda: shutil.rmtree(logged)) if logged is not None and logged.exists() else None,
                lambda: client.set_terminated(run_id, "FAILED"),
                lambda: client.delete_run(run_id))


def mlflow_digest(info: DatasetInfo) -> str:
    """The digest MLflow shows for a dataset version: its sha256, short. A metric logged with
    this name and digest is linked, in the UI, to the run's dataset input of that version."""
    return info.sha256[:12]


def mlflow_input(info: DatasetInfo, context: str):  # noqa: ANN201 - mlflow DatasetInput
    """The MLflow dataset input that shows a run's data on its page in the UI."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    ds = Dataset(name=info.name, digest=mlflow_digest(info), source_type="llmops", source=json.dumps(
        {"uri": info.uri, "stored_uri": info.stored_uri, "sha256": info.sha256}),
        schema=None, profile=json.dumps({"records": info.records, "size_bytes": info.size_bytes, "format": info.format}))
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", context), InputTag("llmops.version", info.version)])


def log_use(store: Store, run_id: str, info: DatasetInfo, context: str) -> None:
    """Record that an MLflow run used this dataset (calibration, evaluation)."""
    store.mlflow.log_inputs(run_id, [mlflow_input(info, context)])


def show(store: Store, ref: str | Ref) -> DatasetInfo:
    ref = parse_ref(ref, kind="dataset") if isinstance(ref, str) else ref
    if ref.alias:
        raise UsageError("datasets have versions, not aliases: use datasets:/NAME/VERSION")
    with store.session() as s:
        q = select(Version).where(Version.kind == "dataset", Version.name == ref.name)
        if ref.version != "latest":
            q = q.where(Version.version == ref.version)
        v = s.scalars(q.order_by(Version.id.desc())).first()
        if v is None:
            raise LLMOpsError(f"{ref} not found")
        return _info(v, created=False)


def info_for_artifact(session, artifact_id: int) -> DatasetInfo | None:  # noqa: ANN001 - Session
    """The newest dataset version holding an artifact's bytes (None: not a dataset)."""
    v = session.scalars(select(Version).where(Version.kind == "dataset", Version.artifact_id == artifact_id)
                        .order_by(Version.id.desc())).first()
    return _info(v, created=False) if v is not None else None


def local_copy(store: Store, ref: str):  # noqa: ANN201 - context manager yielding a Path
    info = show(store, ref)
    return artifacts.materialize(info.stored_uri, store.settings.tracking_uri)


def list_datasets(store: Store) -> list[dict[str, Any]]:
    with store.session() as s:
        rows = s.execute(select(Version, Artifact).join(Artifact, Version.artifact_id == Artifact.id)
                         .where(Version.kind == "dataset").order_by(Version.name, Version.id)).all()
        latest: dict[str, dict[str, Any]] = {}
        for v, a in rows:
            latest[v.name] = {"name": v.name, "latest_version": v.version, "sha256": a.sha256,
                              "size_bytes": a.size_bytes, "records": a.meta.get("records"), "format": a.format,
                              "versions": latest.get(v.name, {}).get("versions", 0) + 1}
        return list(latest.values())
