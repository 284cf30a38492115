"""Registering a model version: MLflow holds the version, we hold the bytes' identity.

A registration is one operation across two databases: the MLflow run (with its
parameters, metrics, dataset inputs and the artifact), its LoggedModel and model version,
then our artifact, version, lineage and run rows, and the results of any evaluation that
came with it (``convert --verify``), in one transaction; only then are the evaluation's
figures logged to the LoggedModel, the LoggedModel finalized and the MLflow run
terminated. If anything fails, the MLflow side is deleted again (and rows already
committed are removed), so a failed registration leaves no version, no LoggedModel, no
active run and no rows behind. The lineage picture is drawn last, outside the operation. The same bytes registered twice are one artifact and one stored
copy (MLflow's local artifact store copies bytes, so each blob is logged once).

The bytes registered are those a symbolic link points to (``core.walk``): a folder of links
(a Hugging Face cache snapshot) is stored as real files, and a link that leads nowhere is
refused before anything is written. The recorded sha256 is always that of the bytes stored:
hashed while they are copied into a local store, or while they are read for the upload to a
tracking server (``intake``); a hash given by the caller is only checked against it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from sqlalchemy import delete, event, select

from llmops.core.errors import UsageError
from llmops.core.hashing import sha256_path, size_of
from llmops.registry import artifacts
from llmops.registry import evaluations as _evaluations
from llmops.registry import upload as _upload
from llmops.registry.intake import EarlyCopy, identify_and_copy, source_path
from llmops.registry import logged_models, mlflow_rows
from llmops.registry.datasets import DatasetInfo, mlflow_input
from llmops.registry.refs import Ref, is_ref, validate_name
from llmops.registry.locks import named_lock
from llmops.registry.store import Store, actor
from llmops.registry.db import best_effort
from llmops.registry.versions import (
    ARTIFACT_PATH,
    RUN_TAG,
    ParentSpec,
    VersionInfo,
    _run_id_in,
    resolve_artifact,
    show,
)
from llmops.registry.tables import Artifact, BenchmarkResult, Hardware, LineageEdge, Run, Version, utcnow


def _parent_artifact(store: Store, session, parent: ParentSpec) -> Artifact:  # noqa: ANN001
    if is_ref(parent.ref_or_path):
        art = resolve_artifact(store, parent.ref_or_path)
        return session.get(Artifact, art.id)
    path = Path(parent.ref_or_path).expanduser().resolve()
    if not path.exists():
        raise UsageError(f"--from {parent.ref_or_path}: no such file or folder")
    return artifacts.upsert(
        session,
        sha256=parent.sha256 or sha256_path(path),
        kind="checkpoint",
        name=path.name,
        uri=path.as_uri(),
        size_bytes=size_of(path),
        meta={"stored": False},
        created_by=actor(),
    )


# -- registering -----------------------------------------------------------------
def register(
    store: Store,
    path: str | Path,
    name: str,
    *,
    fmt: str | None = None,
    quant: str | None = None,
    bits_per_weight: float | None = None,
    tags: dict[str, str] | None = None,
    parents: list[ParentSpec] | None = None,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    tool_versions: dict[str, str] | None = None,
    command: str = "models register",
    sha256: str | None = None,
    evaluations: list[_evaluations.Evaluation] | None = None,
    dataset_inputs: list[tuple[DatasetInfo, str]] | None = None,
    link: bool = False,
) -> VersionInfo:
    """Register the bytes at ``path`` as a new version of ``name``, all or nothing.

    ``evaluations`` (figures measured on these bytes, e.g. by ``convert --verify``) become
    benchmark results and ``evaluated_on`` edges in the registration's transaction;
    ``dataset_inputs`` (dataset version, context) are logged as inputs of its MLflow run.
    ``link``: a local store hard-links the bytes instead of copying them where it can (same
    filesystem): registration at the speed of one read, the store sharing the file with its
    owner (``core.hashing.link_file_hashing``)."""
    validate_name(name, "model name")
    src = source_path(path)
    for key in tags or {}:
        validate_name(key, "tag key")
    parents = parents or []
    for p in parents:  # fail on a bad --from before anything is written
        if is_ref(p.ref_or_path):
            resolve_artifact(store, p.ref_or_path)
        elif not Path(p.ref_or_path).expanduser().exists():
            raise UsageError(f"--from {p.ref_or_path}: no such file or folder")

    t0 = time.time()
    size = size_of(src)  # walks a folder: a broken symbolic link is refused before anything is written
    # The bytes start moving into the store now, while MLflow is imported and the run created:
    # on a local store the copy (hashed on the way) is most of a large registration's time.
    early = EarlyCopy(src, store.settings.artifact_root, link) if store.settings.tracking_is_local_db else None
    try:
        store.open()
        client = store.mlflow
    except BaseException:
        if early is not None:
            early.discard()
        raise
    try:
        run = client.create_run(
            store.experiment_id,
            run_name=f"{command.split()[0]}-{name}",
            tags={"llmops.command": command, "llmops.model": name, "mlflow.user": actor(),
                  **mlflow_rows.owner_tags()},
        )
    except BaseException:
        if early is not None:
            early.discard()
        raise
    from llmops.registry.pictures import preload

    preload()  # the lineage picture's imports, while the bytes are copied and hashed
    try:
        sha, stored, in_run = identify_and_copy(store, src, sha256, run.info.artifact_uri, early, link)
    except BaseException:
        if early is not None:
            early.discard()
        _undo(store, client, name, None, run.info.run_id, False, run.info.artifact_uri)
        raise
    stored_uri, stored_source = (stored.uri, stored.meta.get("source")) if stored else (None, None)

    source_label = parents[0].ref_or_path if parents else str(src)
    version_tags = {
        "format": fmt or "unknown",
        "quant": quant or "none",
        "sha256": sha,
        "size_bytes": str(size),
        "source": source_label,
        **({"bits_per_weight": f"{bits_per_weight:.4g}"} if bits_per_weight is not None else {}),
        **(tags or {}),
    }
    run_id = run.info.run_id
    created_model = False
    mv = None
    model_id: str | None = None
    written = _Written()
    undone = finished = rows_stay = False
    try:
        from mlflow.entities import Metric, Param

        all_params = {"format": fmt, "quant": quant, "sha256": sha, "size_bytes": size, "source": source_label}
        all_params.update(params or {})
        ts = int(time.time() * 1000)
        client.log_batch(
            run_id,
            params=[Param(k, str(v)[:6000]) for k, v in all_params.items() if v is not None],
            metrics=[Metric(k, float(v), ts, 0) for k, v in (metrics or {}).items() if v is not None],
            tags=[],
        )
        for k, v in (tool_versions or {}).items():
            client.set_tag(run_id, f"llmops.version.{k}", str(v))
        if dataset_inputs:
            client.log_inputs(run_id, [mlflow_input(info, context) for info, context in dataset_inputs])
        if in_run:  # already in this run's artifacts, hashed on the way
            stored_uri = f"{run.info.artifact_uri}/{ARTIFACT_PATH}" + ("" if src.is_dir() else f"/{src.name}")
            stored_source = f"{run.info.artifact_uri}/{ARTIFACT_PATH}"
        # One registration of a model at a time, across processes and machines: MLflow numbers
        # versions by reading the last one, and two bytes-identical artifacts must be one row.
        with named_lock(store, f"register:{name}"):
            try:
                try:
                    client.create_registered_model(name, tags={mlflow_rows.MADE_TAG: mlflow_rows.MADE_BY})
                    created_model = True
                except Exception as exc:  # noqa: BLE001 - already exists is fine
                    if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                        raise
                # Behind a tracking server MLflow only accepts a source inside the version's own
                # run; bytes stored by an earlier run keep that run as the version's MLflow run, and
                # this registration's run (parameters, metrics, lineage picture) is named in a tag.
                source_run = run_id
                if stored is not None and not store.settings.tracking_is_local_db:
                    source_run = _run_id_in(stored_source) or run_id
                # The LoggedModel first, so that the version names it from its first moment (a
                # server deploying the new version at once finds the link, never makes another).
                expected = _next_version(client, name)
                model_id = logged_models.create(client, store.experiment_id, name=name, version=expected,
                                                run_id=run_id, version_tags=version_tags)
                mv = client.create_model_version(
                    name, stored_source, run_id=source_run,
                    tags={**version_tags, RUN_TAG: run_id, logged_models.VERSION_TAG: model_id},
                    description=logged_models.version_description(store.experiment_id, model_id,
                                                                  logged_models.logged_name(name, expected)))
                if str(mv.version) != expected:  # another writer numbered a version meanwhile
                    logged_models.link(client, model_id, name, str(mv.version),
                                       logged_models.identity(version_tags).params)

                with store.session() as s:
                    event.listen(s, "after_flush", written.collect)
                    art = artifacts.by_sha(s, sha)
                    meta = {"stored": True, "source": stored_source, "is_dir": src.is_dir(), "filename": src.name}
                    if art is None:
                        art = Artifact(
                            kind="model", name=name, version=str(mv.version), uri=stored_uri, sha256=sha,
                            size_bytes=size, format=fmt, quant=quant, meta=meta, created_by=actor(),
                        )
                        s.add(art)
                        s.flush()
                    elif not art.meta.get("stored"):
                        # Known before only as a lineage parent (a path outside the store): now it is stored.
                        written.restore = (art.id, {"kind": art.kind, "uri": art.uri, "meta": dict(art.meta),
                                                    "format": art.format, "quant": art.quant})
                        art.kind, art.uri, art.meta = "model", stored_uri, {**art.meta, **meta}
                        art.format, art.quant = art.format or fmt, art.quant or quant
                    run_row = Run(
                        kind=command.split()[0], command=command, parameters={**all_params, "name": name},
                        tool_versions=tool_versions or {}, status="finished", finished_at=utcnow(),
                        seconds=time.time() - t0, mlflow_run_id=run_id,
                    )
                    s.add(run_row)
                    s.flush()
                    s.add(Version(kind="model", name=name, version=str(mv.version), artifact_id=art.id, mlflow_run_id=run_id))
                    linked: set[tuple[int, str]] = set()
                    for p in parents:
                        parent_art = _parent_artifact(store, s, p)
                        key = (parent_art.id, p.relation)
                        if parent_art.id == art.id or key in linked or s.scalars(select(LineageEdge.id).where(
                                LineageEdge.parent_id == parent_art.id, LineageEdge.child_id == art.id,
                                LineageEdge.relation == p.relation)).first() is not None:
                            continue  # the same parent named twice (by path and by reference) is one edge
                        linked.add(key)
                        s.add(LineageEdge(parent_id=parent_art.id, child_id=art.id, relation=p.relation,
                                          parameters=p.parameters, run_id=run_row.id))
                    s.flush()
                    for evaluation in evaluations or []:
                        _evaluations.write(s, art.id, evaluation, run_row)
                    s.flush()
                    art_id = art.id
                # Our rows are committed; the LoggedModel's figures, its finalization and the run's
                # termination come last. Two databases cannot commit together (and on SQLite they
                # share one file, so MLflow cannot write while our transaction is open): if one of
                # these fails, the committed rows are removed.
                try:
                    logged_models.log_figures(client, model_id, run_id, [
                        f for ev in evaluations or [] for f in logged_models.figures_of(ev.measurements, ev.dataset)])
                    logged_models.finalize(client, model_id)
                    client.set_terminated(run_id, "FINISHED")
                except BaseException:
                    # Rows that cannot be removed stay, and with them everything they record: the
                    # version is whole in our tables (``llmops gc`` finishes its LoggedModel and run).
                    rows_stay = not written.remove(store)
                    raise
                # Whole now: whatever comes after (the lock's release, a signal) leaves it so.
                finished = True
            except BaseException:
                # Undone while the lock is held: no other registration of this name can have
                # started on a registered model that this one created.
                undone = True
                if not rows_stay:
                    _undo(store, client, name, mv, run_id, created_model,
                          run.info.artifact_uri if stored is None else None, model_id)
                raise
    except BaseException:
        if not undone and not finished:
            _undo(store, client, name, mv, run_id, created_model,
                  run.info.artifact_uri if stored is None else None, model_id)
        raise
    from llmops.registry.pictures import redraw

    redraw(store, art_id)  # after every edge is written; a failure is a warning
    return show(store, Ref("model", name, str(mv.version)))


def _next_version(client, name: str) -> str:  # noqa: ANN001 - MlflowClient
    """The number MLflow will give the next version of ``name`` (the highest one plus one; the
    caller holds the model's registration lock)."""
    versions = client.search_model_versions(f"name='{name}'")
    return str(max((int(v.version) for v in versions), default=0) + 1)


# Rows a registration inserts, in the order they can be deleted (children first).
_UNDO_ORDER = (BenchmarkResult, LineageEdge, Version, Run, Artifact, Hardware)


class _Written:
    """What a registration's transaction inserted (and the one row it may change), so that the
    rows can be removed again when the MLflow side fails after the commit."""

    def __init__(self) -> None:
        self.inserted: dict[type, set[int]] = {}
        self.restore: tuple[int, dict[str, Any]] | None = None

    def collect(self, session, _context) -> None:  # noqa: ANN001 - SQLAlchemy's after_flush hook
        for obj in session.new:
            if type(obj) in _UNDO_ORDER:
                self.inserted.setdefault(type(obj), set()).add(obj.id)

    def remove(self, store: Store) -> bool:
        """Whether the rows are gone (False: they stay, committed)."""
        try:
            with store.session() as s:
                for table in _UNDO_ORDER:
                    ids = self.inserted.get(table)
                    if ids:
                        s.execute(delete(table).where(table.id.in_(sorted(ids))))
                if self.restore is not None:
                    art = s.get(Artifact, self.restore[0])
                    if art is not None:
                        for k, v in self.restore[1].items():
                            setattr(art, k, v)
        except Exception as exc:  # noqa: BLE001 - best effort; the original error is what matters
            import sys

            sys.stderr.write(f"warning: could not remove the rows of a failed registration: {exc}\n")
            return False
        return True


def _undo(store: Store, client, name: str, mv, run_id: str, created_model: bool,  # noqa: ANN001
          logged_uri: str | None, model_id: str | None = None) -> None:
    """Compensate a half-done registration on the MLflow side (best effort).

    The model version is purged, so that its number is given again (``mlflow_rows``), the
    LoggedModel is deleted, the run marked FAILED, then deleted (MLflow's deletes of both are
    soft deletes that keep the artifacts; bytes this registration copied into a local store, or
    uploaded to a tracking server that allows deletes, are removed here). What fails here is
    left for ``llmops gc``.
    """
    logged = artifacts.local_path(logged_uri) if logged_uri else None
    remote = logged_uri if logged_uri and logged is None else None
    best_effort(
        (lambda: shutil.rmtree(logged)) if logged is not None and logged.exists() else None,
        (lambda: _upload.delete_uploaded(remote, client.tracking_uri, ARTIFACT_PATH)) if remote else None,
        (lambda: mlflow_rows.purge_version(store, client, name, mv.version, run_id)) if mv is not None else None,
        (lambda: client.delete_registered_model(name)) if created_model else None,
        (lambda: logged_models.discard(client, model_id)) if model_id else None,
        lambda: client.set_terminated(run_id, "FAILED"),
        lambda: client.delete_run(run_id),
    )
