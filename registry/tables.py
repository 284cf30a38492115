"""The llmops tables (SQLAlchemy 2 typed ORM).

They hold what MLflow cannot: content hashes, the lineage graph, hardware
profiles, benchmark results with their hardware, and the promotion audit.
MLflow's own tables have generic names (runs, datasets, ...), so every table
here carries the ``llmops_`` prefix.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

PREFIX = "llmops_"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Artifact(Base):
    """One set of bytes. A sha256 seen before is the same artifact."""

    __tablename__ = "llmops_artifacts"
    __table_args__ = (UniqueConstraint("sha256", name="uq_llmops_artifacts_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # checkpoint, model, prompt, dataset, benchmark
    name: Mapped[str] = mapped_column(String(256))
    version: Mapped[str | None] = mapped_column(String(64))
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str | None] = mapped_column(String(32))
    quant: Mapped[str | None] = mapped_column(String(32))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(128))


class Version(Base):
    """A registry name/version (model, prompt, dataset) and the bytes it stands for.

    MLflow owns the version numbers; this row maps them onto an artifact so that
    two versions of the same bytes share one artifact and one stored copy.
    """

    __tablename__ = "llmops_versions"
    __table_args__ = (UniqueConstraint("kind", "name", "version", name="uq_llmops_versions_kind_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(256))
    version: Mapped[str] = mapped_column(String(64))
    artifact_id: Mapped[int] = mapped_column(ForeignKey("llmops_artifacts.id"), index=True)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    artifact: Mapped[Artifact] = relationship()


class LineageEdge(Base):
    __tablename__ = "llmops_lineage"
    __table_args__ = (
        UniqueConstraint("parent_id", "child_id", "relation", name="uq_llmops_lineage_edge"),
        Index("ix_llmops_lineage_child", "child_id"),
        Index("ix_llmops_lineage_parent", "parent_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("llmops_artifacts.id"))
    child_id: Mapped[int] = mapped_column(ForeignKey("llmops_artifacts.id"))
    relation: Mapped[str] = mapped_column(String(32))  # converted_from, calibrated_with, evaluated_on, uses_prompt, promoted
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("llmops_runs.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Run(Base):
    """A job (register, convert, bench): what ran, with which tools, and how it ended."""

    __tablename__ = "llmops_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    command: Mapped[str] = mapped_column(Text)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    tool_versions: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="running")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), index=True)


class Hardware(Base):
    __tablename__ = "llmops_hardware"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    cpu_model: Mapped[str | None] = mapped_column(String(256))
    cores: Mapped[int | None] = mapped_column(Integer)
    isa_flags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    ram_bytes: Mapped[int | None] = mapped_column(BigInteger)
    gpu_name: Mapped[str | None] = mapped_column(String(256))
    gpu_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    gpu_driver: Mapped[str | None] = mapped_column(String(64))
    cuda_version: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BenchmarkResult(Base):
    """One measured value, with the machine and the protocol it was measured under
    (``llmops.registry.protocols``): only results of one protocol are compared."""

    __tablename__ = "llmops_benchmark_results"
    __table_args__ = (
        Index("ix_llmops_bench_artifact_hw", "artifact_id", "hardware_id"),
        Index("ix_llmops_bench_protocol_key", "protocol_key"),
        Index("ix_llmops_bench_target", "target"),
        Index("ux_llmops_bench_job_metric", "job_key", "metric", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("llmops_runs.id"))
    artifact_id: Mapped[int] = mapped_column(ForeignKey("llmops_artifacts.id"))
    hardware_id: Mapped[int | None] = mapped_column(ForeignKey("llmops_hardware.id"))
    backend: Mapped[str] = mapped_column(String(32))
    device: Mapped[str] = mapped_column(String(16))
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str | None] = mapped_column(String(16))
    eval_dataset_id: Mapped[int | None] = mapped_column(ForeignKey("llmops_artifacts.id"))
    protocol: Mapped[dict[str, Any]] = mapped_column(JSON)
    protocol_key: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # a fleet target's results (``llmops bench --on``): the target, the node that measured, and
    # the job they came from (a job's results are recorded once); None for this machine's own
    target: Mapped[str | None] = mapped_column(String(64))
    node: Mapped[str | None] = mapped_column(String(64))
    job_key: Mapped[str | None] = mapped_column(String(64))


class Promotion(Base):
    """The audit trail: every promotion attempt, passed or not."""

    __tablename__ = "llmops_promotions"
    __table_args__ = (Index("ix_llmops_promotions_model", "model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(256))
    version: Mapped[str] = mapped_column(String(64))
    alias: Mapped[str] = mapped_column(String(64))
    previous_version: Mapped[str | None] = mapped_column(String(64))
    gates: Mapped[list[Any]] = mapped_column(JSON, default=list)
    verdict: Mapped[str] = mapped_column(String(16))  # passed, failed, forced, dry-run
    forced: Mapped[bool] = mapped_column(default=False)
    reason: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(128))
    ci: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    target: Mapped[str | None] = mapped_column(String(64))  # gates read this fleet target's results
