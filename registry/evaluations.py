"""What an evaluation leaves in the registry: benchmark results with their hardware and protocol,
the ``evaluated_on`` edge to the eval text, and the figures on the version's MLflow run and its
LoggedModel (with the dataset they were measured on).

Callers pass plain values (measurements, a hardware profile, a dataset version); the
rows are written here. A verification measured while converting travels with the
registration (``registration.register(evaluations=...)``) and lands in its transaction;
``record_bench`` records an ``llmops bench`` of an artifact already known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from llmops.core.hashing import sha256_path, size_of
from llmops.registry import artifacts, results
from llmops.registry.datasets import DatasetInfo
from llmops.registry.results import Measurement
from llmops.registry.store import Store, actor
from llmops.registry.tables import LineageEdge, Run, utcnow


@dataclass
class Evaluation:
    """Figures measured on one artifact on this machine (``convert --verify``, ``llmops bench``)."""

    measurements: list[Measurement]
    hardware: dict[str, Any]
    backend: str
    device: str
    dataset: DatasetInfo | None = None  # the eval text, a dataset version: the evaluated_on edge
    purpose: str = "verification"
    link: bool = True  # draw the evaluated_on edge (the dataset was what was evaluated on)
    edge_parameters: dict[str, Any] = field(default_factory=dict)
    target: str | None = None  # measured on a fleet target (``llmops bench --on``), by this node
    node: str | None = None
    job_key: str | None = None  # the fleet job: its results are recorded once


def link_evaluated_on(session: Session, dataset_artifact_id: int, artifact_id: int, parameters: dict[str, Any],
                      run_id: int | None = None) -> bool:
    """The ``evaluated_on`` edge, once per (dataset, artifact); True when it is new."""
    exists = session.scalars(select(LineageEdge.id).where(
        LineageEdge.parent_id == dataset_artifact_id, LineageEdge.child_id == artifact_id,
        LineageEdge.relation == "evaluated_on")).first()
    if exists is None:
        session.add(LineageEdge(parent_id=dataset_artifact_id, child_id=artifact_id, relation="evaluated_on",
                                parameters=parameters, run_id=run_id))
        session.flush()
        return True
    return False


def write(session: Session, artifact_id: int, evaluation: Evaluation, run: Run | None = None) -> bool:
    """An evaluation's rows, in the caller's transaction; True when it added a lineage edge
    (the caller redraws the lineage picture once the transaction is committed)."""
    dataset_art = artifacts.by_sha(session, evaluation.dataset.sha256) if evaluation.dataset is not None else None
    if evaluation.dataset is not None and dataset_art is None:
        raise LookupError(f"{evaluation.dataset.uri} has no llmops record")
    added = False
    if dataset_art is not None and evaluation.link:
        added = link_evaluated_on(session, dataset_art.id, artifact_id,
                                  {"dataset": evaluation.dataset.uri, "purpose": evaluation.purpose,  # type: ignore[union-attr]
                                   **evaluation.edge_parameters}, run.id if run is not None else None)
    results.record(session, artifact_id=artifact_id, hardware=evaluation.hardware, backend=evaluation.backend,
                   device=evaluation.device, measurements=evaluation.measurements, run=run,
                   eval_dataset_id=dataset_art.id if dataset_art is not None else None, target=evaluation.target,
                   node=evaluation.node, job_key=evaluation.job_key)
    return added


def record_bench(store: Store, *, ref: str | None, path: Path, kind: str, fmt: str | None, quant: str | None,
                 evaluation: Evaluation, parameters: dict[str, Any], tool_versions: dict[str, str],
                 seconds: float, mlflow_metrics: dict[str, float] | None = None,
                 log_dataset: bool = False) -> str | None:
    """An ``llmops bench`` of one artifact: a run row, its results, the ``evaluated_on`` edge (when
    accuracy was measured on a dataset), and for a registered version its ``bench.*`` metrics and
    dataset input on the version's MLflow run, the metrics also on its LoggedModel (created for a
    version registered before LoggedModels), and the lineage picture redrawn when the edge is new.
    A fleet target's figures are named ``TARGET/bench.METRIC`` on the run (the MLflow UI groups
    a run's charts by the part before the slash: one section per target). A fleet job already
    recorded records nothing again. Returns the hardware fingerprint (None: recorded before)."""
    from llmops.registry import logged_models
    from llmops.registry.tables import Artifact
    from llmops.registry.versions import resolve_artifact, resolve_model_version, run_of

    mv = resolve_model_version(store, ref) if ref and ref.startswith("models:/") else None
    known = resolve_artifact(store, ref) if ref else None
    mlflow_run = run_of(mv) if mv is not None else None
    # found (or made) before this run's results exist, so that a new one does not log them twice
    model_id = logged_models.for_version(store, mv.name, str(mv.version), mlflow_run) if mlflow_run else None
    with store.session() as s:
        if evaluation.job_key is not None and results.recorded(s, evaluation.job_key):
            return None
        if known is not None:
            art = s.get(Artifact, known.id)
        else:
            art = artifacts.upsert(s, sha256=sha256_path(path), kind=kind, name=path.name, uri=path.as_uri(),
                                   size_bytes=size_of(path), format=fmt, quant=quant, meta={"stored": False},
                                   created_by=actor())
        run = Run(kind="bench", command="bench", parameters=parameters, tool_versions=tool_versions,
                  status="finished", finished_at=utcnow(), seconds=seconds, mlflow_run_id=mlflow_run)
        s.add(run)
        s.flush()
        added = write(s, art.id, evaluation, run)
        art_id = art.id
    if mlflow_run:
        if log_dataset and evaluation.dataset is not None:
            from llmops.registry.datasets import log_use

            log_use(store, mlflow_run, evaluation.dataset, "evaluation")
        protocols = {m.metric: m.protocol for m in evaluation.measurements}
        prefix = f"{evaluation.target}/bench." if evaluation.target else "bench."
        figures = [logged_models.Figure(f"{prefix}{k}", float(v), protocols.get(k),
                                        evaluation.dataset if (protocols.get(k) or {}).get("family") == "accuracy"
                                        else None)
                   for k, v in (mlflow_metrics or {}).items() if v == v]
        logged_models.log_figures(store.mlflow, model_id, mlflow_run, figures)
    if added:
        from llmops.registry.pictures import redraw

        redraw(store, art_id)
    return results.fingerprint(evaluation.hardware)
