"""Benchmark results and hardware profiles: what was measured, on which machine.

A hardware profile is stored once per fingerprint; every result points to it,
so results from different machines are never compared by accident.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from llmops.registry.tables import BenchmarkResult, Hardware, Run, utcnow

PROFILE_KEYS = ("cpu_model", "cores", "isa_flags", "ram_bytes", "gpu_name", "gpu_memory_bytes", "gpu_driver", "cuda_version")


def fingerprint(profile: dict[str, Any]) -> str:
    """Stable across runs on one machine: only the fields that identify the hardware."""
    ident = {k: profile.get(k) for k in PROFILE_KEYS}
    ident["isa_flags"] = sorted(ident.get("isa_flags") or [])
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def upsert_hardware(session: Session, profile: dict[str, Any]) -> Hardware:
    fp = profile.get("fingerprint") or fingerprint(profile)
    row = session.scalars(select(Hardware).where(Hardware.fingerprint == fp)).first()
    if row is None:
        row = Hardware(fingerprint=fp, **{k: profile.get(k) for k in PROFILE_KEYS if k != "isa_flags"},
                       isa_flags=sorted(profile.get("isa_flags") or []))
        session.add(row)
        session.flush()
    return row


@dataclass
class Measurement:
    metric: str
    value: float
    unit: str | None = None


@dataclass
class ResultSet:
    """The latest value of each metric for one artifact on one machine."""

    artifact_id: int
    hardware_fingerprint: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    units: dict[str, str | None] = field(default_factory=dict)


def record(session: Session, *, artifact_id: int, hardware: dict[str, Any], backend: str, device: str,
           measurements: list[Measurement], run: Run | None = None, eval_dataset_id: int | None = None) -> list[BenchmarkResult]:
    hw = upsert_hardware(session, hardware)
    rows = [
        BenchmarkResult(run_id=run.id if run else None, artifact_id=artifact_id, hardware_id=hw.id, backend=backend,
                        device=device, metric=m.metric, value=float(m.value), unit=m.unit, eval_dataset_id=eval_dataset_id,
                        created_at=utcnow())
        for m in measurements
    ]
    session.add_all(rows)
    session.flush()
    return rows


def latest(session: Session, artifact_id: int, hardware_fingerprint: str | None = None) -> ResultSet:
    """Latest value per metric; on the given machine, else on the machine of the newest result."""
    q = (select(BenchmarkResult, Hardware.fingerprint)
         .join(Hardware, BenchmarkResult.hardware_id == Hardware.id)
         .where(BenchmarkResult.artifact_id == artifact_id))
    if hardware_fingerprint:
        q = q.where(Hardware.fingerprint.startswith(hardware_fingerprint))
    rows = session.execute(q.order_by(BenchmarkResult.created_at.desc(), BenchmarkResult.id.desc())).all()
    if not rows:
        return ResultSet(artifact_id, hardware_fingerprint)
    fp = rows[0][1]
    out = ResultSet(artifact_id, fp)
    for r, rfp in rows:
        if rfp == fp and r.metric not in out.metrics:
            out.metrics[r.metric] = r.value
            out.units[r.metric] = r.unit
    return out
