"""Benchmark results and hardware profiles: what was measured, on which machine, how.

A hardware profile is stored once per fingerprint; every result points to it,
so results from different machines are never compared by accident. Every result
also carries its protocol (``protocols.py``): results of different protocols
(``convert --verify`` on 4 chunks, ``llmops bench`` on 16) are never compared either.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from llmops.registry import protocols
from llmops.registry.db import add_unique
from llmops.registry.tables import BenchmarkResult, Hardware, Run, utcnow

PROFILE_KEYS = ("cpu_model", "cores", "isa_flags", "ram_bytes", "gpu_name", "gpu_memory_bytes", "gpu_driver", "cuda_version")


def fingerprint(profile: dict[str, Any]) -> str:
    """Stable across runs on one machine: only the fields that identify the hardware."""
    ident = {k: profile.get(k) for k in PROFILE_KEYS}
    ident["isa_flags"] = sorted(ident.get("isa_flags") or [])
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def upsert_hardware(session: Session, profile: dict[str, Any]) -> Hardware:
    """The row of this machine, created on first sight. On PostgreSQL two writers may see a new
    machine at once: the loser of the insert reads the winner's row (a savepoint keeps its own
    transaction, which may hold a whole registration, alive). SQLite writers are serialised."""
    fp = profile.get("fingerprint") or fingerprint(profile)
    q = select(Hardware).where(Hardware.fingerprint == fp)
    row = session.scalars(q).first()
    if row is not None:
        return row
    row = Hardware(fingerprint=fp, **{k: profile.get(k) for k in PROFILE_KEYS if k != "isa_flags"},
                   isa_flags=sorted(profile.get("isa_flags") or []))
    return add_unique(session, row, lambda: session.scalars(q).first())  # type: ignore[return-value]


@dataclass
class Measurement:
    metric: str
    value: float
    unit: str | None = None
    protocol: dict[str, Any] | None = None  # None: recorded without one (protocols.UNKNOWN)


@dataclass
class Result:
    """One recorded value, as plain data."""

    metric: str
    value: float
    unit: str | None
    protocol: dict[str, Any]
    protocol_key: str
    hardware_fingerprint: str
    backend: str
    device: str
    created_at: datetime | None = None
    eval_dataset_id: int | None = None  # the dataset's artifact, for results measured on one

    @property
    def kind(self) -> str:
        return str(self.protocol.get("kind", "unknown"))

    def summary(self, runtime: bool = True) -> str:
        return protocols.summary(self.protocol, self.metric, runtime=runtime)


@dataclass
class ResultSet:
    """The newest value of each metric for one artifact on one machine, and the protocol of each."""

    artifact_id: int
    hardware_fingerprint: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    units: dict[str, str | None] = field(default_factory=dict)
    results: dict[str, Result] = field(default_factory=dict)

    def put(self, r: Result) -> None:
        self.metrics[r.metric] = r.value
        self.units[r.metric] = r.unit
        self.results[r.metric] = r


def record(session: Session, *, artifact_id: int, hardware: dict[str, Any], backend: str, device: str,
           measurements: list[Measurement], run: Run | None = None, eval_dataset_id: int | None = None,
           target: str | None = None, node: str | None = None, job_key: str | None = None) -> list[BenchmarkResult]:
    """The rows of one evaluation. A fleet job's results carry its ``job_key``: a job already
    recorded (its driver retried, a result delivered twice) records nothing again, and the
    unique index on (job_key, metric) refuses a concurrent second writer."""
    if job_key is not None and recorded(session, job_key):
        return []
    hw = upsert_hardware(session, hardware)
    now = utcnow()
    rows = []
    for m in measurements:
        protocol = dict(m.protocol) if m.protocol else dict(protocols.UNKNOWN)
        rows.append(BenchmarkResult(
            run_id=run.id if run else None, artifact_id=artifact_id, hardware_id=hw.id, backend=backend,
            device=device, metric=m.metric, value=float(m.value), unit=m.unit, eval_dataset_id=eval_dataset_id,
            protocol=protocol, protocol_key=protocols.protocol_key(protocol), created_at=now, target=target,
            node=node, job_key=job_key))
    session.add_all(rows)
    session.flush()
    return rows


def recorded(session: Session, job_key: str) -> bool:
    """Whether the results of this fleet job are in."""
    return session.scalars(select(BenchmarkResult.id).where(BenchmarkResult.job_key == job_key).limit(1)).first() is not None


def _on_target(target: str | None):  # noqa: ANN202 - a SQL condition
    """Results of a fleet target, or (None) those measured on the machine that ran llmops: the two
    are kept apart, so a gate or a table reads one place's figures."""
    return BenchmarkResult.target.is_(None) if target is None else BenchmarkResult.target == target


def history(session: Session, artifact_id: int, hardware_fingerprint: str | None = None,
            target: str | None = None) -> list[Result]:
    """Every result of an artifact (on machines whose fingerprint starts with the given one; on
    ``target``, or measured locally), newest first."""
    q = (select(BenchmarkResult, Hardware.fingerprint)
         .join(Hardware, BenchmarkResult.hardware_id == Hardware.id)
         .where(BenchmarkResult.artifact_id == artifact_id, _on_target(target)))
    if hardware_fingerprint:
        q = q.where(Hardware.fingerprint.startswith(hardware_fingerprint))
    rows = session.execute(q.order_by(BenchmarkResult.created_at.desc(), BenchmarkResult.id.desc())).all()
    return [Result(r.metric, r.value, r.unit, r.protocol or dict(protocols.UNKNOWN),
                   r.protocol_key or protocols.protocol_key(None), fp, r.backend, r.device, r.created_at,
                   r.eval_dataset_id)
            for r, fp in rows]


def latest(session: Session, artifact_id: int, hardware_fingerprint: str | None = None,
           target: str | None = None) -> ResultSet:
    """Newest value per metric; on the given machine, else on the machine of the newest result
    (of ``target``, or measured locally).

    The newest result of a metric defines the protocol that metric is read under."""
    rows = history(session, artifact_id, hardware_fingerprint, target)
    if not rows:
        return ResultSet(artifact_id, hardware_fingerprint)
    fp = rows[0].hardware_fingerprint
    out = ResultSet(artifact_id, fp)
    for r in rows:
        if r.hardware_fingerprint == fp and r.metric not in out.metrics:
            out.put(r)
    return out


def comparable(session: Session, artifact_id: int, metric: str, protocol_key: str,
               hardware_fingerprint: str, target: str | None = None) -> Result | None:
    """The newest result of ``metric`` for an artifact with exactly this protocol on exactly this
    machine (of ``target``, or measured locally)."""
    q = (select(BenchmarkResult, Hardware.fingerprint)
         .join(Hardware, BenchmarkResult.hardware_id == Hardware.id)
         .where(BenchmarkResult.artifact_id == artifact_id, BenchmarkResult.metric == metric, _on_target(target),
                BenchmarkResult.protocol_key == protocol_key, Hardware.fingerprint == hardware_fingerprint)
         .order_by(BenchmarkResult.created_at.desc(), BenchmarkResult.id.desc()))
    row = session.execute(q).first()
    if row is None:
        return None
    r, fp = row
    return Result(r.metric, r.value, r.unit, r.protocol, r.protocol_key, fp, r.backend, r.device, r.created_at)


# -- comparing across formats -------------------------------------------------------
PREFERRED_KIND = "bench"


@dataclass
class Column:
    """One metric across the compared artifacts: every cell measured under one protocol
    (up to the runtime each format needs)."""

    metric: str
    condition: str
    protocol: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "protocol": protocols.short(self.condition),
                "summary": protocols.summary(self.protocol, self.metric, runtime=False)}


@dataclass
class Comparison:
    hardware_fingerprint: str | None
    rows: list[ResultSet]
    columns: dict[str, Column]
    left_out: list[dict[str, str]]  # per row index: metric -> why it was left out


def _preferred(results: list[Result], metric: str) -> Result | None:
    """The newest result of a metric, of the ``bench`` kind when there is one."""
    candidates = [r for r in results if r.metric == metric]
    return next((r for r in candidates if r.kind == PREFERRED_KIND), candidates[0] if candidates else None)


def compare(store, artifact_ids: list[int], any_hardware: bool = False,  # noqa: ANN001 - Store
            target: str | None = None) -> Comparison:
    """The table ``llmops bench compare`` prints, as results: one hardware fingerprint (the first
    artifact's newest result's, unless ``any_hardware``), and per metric one protocol: that of the
    first artifact's preferred result (newest of the ``bench`` kind, else newest), bench first;
    results of ``target``, or (None) those measured on the machine running llmops."""
    fp: str | None = None
    histories: list[list[Result]] = []
    with store.session() as s:
        for art_id in artifact_ids:
            rows = history(s, art_id, None if any_hardware else fp, target)
            if rows:
                own = rows[0].hardware_fingerprint
                if fp is None and not any_hardware:
                    fp = own
                rows = [r for r in rows if r.hardware_fingerprint == own]
            histories.append(rows)
    metrics: list[str] = []
    for rows in histories:
        for r in rows:
            if r.metric not in metrics:
                metrics.append(r.metric)
    columns: dict[str, Column] = {}
    for metric in metrics:
        picks = [_preferred(rows, metric) for rows in histories]
        present = [p for p in picks if p is not None]
        ref = next((p for p in present if p.kind == PREFERRED_KIND), present[0])
        columns[metric] = Column(metric, protocols.condition_key(ref.protocol), ref.protocol)
    out_rows: list[ResultSet] = []
    left_out: list[dict[str, str]] = []
    for art_id, rows in zip(artifact_ids, histories):
        rs = ResultSet(art_id, rows[0].hardware_fingerprint if rows else (None if any_hardware else fp))
        missing: dict[str, str] = {}
        for metric, col in columns.items():
            match = next((r for r in rows if r.metric == metric and protocols.condition_key(r.protocol) == col.condition),
                         None)
            if match is not None:
                rs.put(match)
            elif any(r.metric == metric for r in rows):
                missing[metric] = (f"no {metric} under the column's protocol "
                                   f"({protocols.summary(col.protocol, metric, runtime=False)})")
        out_rows.append(rs)
        left_out.append(missing)
    return Comparison(fp, out_rows, columns, left_out)
