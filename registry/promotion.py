"""Gated promotion: move an MLflow alias only when the recorded metrics pass.

MLflow's stages are deprecated (since 2.9); the alias is what moves, and a
stage is set only on request for old tooling. Each attempt, passed or failed,
is an audit row; the read-decide-move sequence runs under a named lock so two
promotions of one model at once are serialised and both audited.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select

from llmops.core.errors import LLMOpsError, UsageError
from llmops.registry import results
from llmops.registry.gates import Gate, GateResult, evaluate
from llmops.registry.locks import named_lock
from llmops.registry.versions import run_of
from llmops.registry.refs import Ref, validate_name
from llmops.registry.store import Store, actor
from llmops.registry.tables import Artifact, LineageEdge, Promotion, Version
from llmops.registry.versions import resolve_artifact, resolve_model_version

MIB = 1024 * 1024


@dataclass
class PromotionResult:
    model: str
    version: str
    alias: str
    previous_version: str | None
    verdict: str  # passed, failed, forced
    moved: bool
    dry_run: bool
    gates: list[dict[str, Any]]
    metrics: dict[str, float]
    hardware: str | None
    audit_id: int | None = None
    ci: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ci_metadata() -> dict[str, str]:
    """The usual CI variables (GitHub Actions, GitLab, Jenkins, Buildkite, generic)."""
    env = os.environ
    meta: dict[str, str] = {}
    if env.get("GITHUB_ACTIONS"):
        meta["system"] = "github-actions"
        meta["commit"] = env.get("GITHUB_SHA", "")
        if env.get("GITHUB_SERVER_URL") and env.get("GITHUB_REPOSITORY") and env.get("GITHUB_RUN_ID"):
            meta["job_url"] = f"{env['GITHUB_SERVER_URL']}/{env['GITHUB_REPOSITORY']}/actions/runs/{env['GITHUB_RUN_ID']}"
        meta["ref"] = env.get("GITHUB_REF", "")
    elif env.get("GITLAB_CI"):
        meta.update(system="gitlab", commit=env.get("CI_COMMIT_SHA", ""), job_url=env.get("CI_JOB_URL", ""),
                    ref=env.get("CI_COMMIT_REF_NAME", ""))
    elif env.get("JENKINS_URL"):
        meta.update(system="jenkins", commit=env.get("GIT_COMMIT", ""), job_url=env.get("BUILD_URL", ""))
    elif env.get("BUILDKITE"):
        meta.update(system="buildkite", commit=env.get("BUILDKITE_COMMIT", ""), job_url=env.get("BUILDKITE_BUILD_URL", ""))
    elif env.get("CI"):
        meta["system"] = "ci"
        for k in ("GIT_COMMIT", "COMMIT_SHA"):
            if env.get(k):
                meta["commit"] = env[k]
    return {k: v for k, v in meta.items() if v}


def version_metrics(store: Store, name: str, version: str, hardware: str | None = None) -> tuple[dict[str, float], str | None]:
    art = _artifact(store, name, version)
    with store.session() as s:
        rs = results.latest(s, art.id, hardware)
    metrics = dict(rs.metrics)
    metrics["file_mb"] = art.size_bytes / MIB
    return metrics, rs.hardware_fingerprint


def _artifact(store: Store, name: str, version: str) -> Artifact:
    with store.session() as s:
        row = s.scalars(select(Version).where(Version.kind == "model", Version.name == name,
                                              Version.version == str(version))).first()
        if row is None:
            raise LLMOpsError(f"models:/{name}/{version} has no llmops record")
        return row.artifact


def _holder(store: Store, name: str, alias: str) -> str | None:
    try:
        return str(store.mlflow.get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001 - no holder yet
        return None


def promote(store: Store, name: str, version: str, *, alias: str = "production", gates: list[Gate] | None = None,
            prompt: str | None = None, hardware: str | None = None, stage: str | None = None,
            dry_run: bool = False, force: bool = False, reason: str | None = None) -> PromotionResult:
    validate_name(name, "model name")
    validate_name(alias, "alias")
    if force and not (reason and reason.strip()):
        raise UsageError("--force needs --reason TEXT (it goes into the audit trail)")
    mv = resolve_model_version(store, Ref("model", name, str(version)))
    version = str(mv.version)
    prompt_art = resolve_artifact(store, prompt) if prompt else None
    gates = gates or []
    with named_lock(store, f"promote:{name}"):
        previous = _holder(store, name, alias)
        metrics, fp = version_metrics(store, name, version, hardware)
        if previous is not None and previous != version:
            prev_metrics, _ = version_metrics(store, name, previous, fp or hardware)
            for k, v in list(metrics.items()):
                pv = prev_metrics.get(k)
                if pv not in (None, 0):
                    metrics[f"{k}_ratio"] = v / pv
        gate_results: list[GateResult] = evaluate(gates, metrics)
        passed = all(g.passed for g in gate_results)
        verdict = "passed" if passed else ("forced" if force else "failed")
        moved = (passed or force) and not dry_run
        result = PromotionResult(name, version, alias, previous, verdict, moved, dry_run,
                                 [g.to_dict() for g in gate_results], metrics, fp, ci=ci_metadata())
        if dry_run:
            return result
        if moved:
            store.mlflow.set_registered_model_alias(name, alias, version)
            if stage:
                store.mlflow.transition_model_version_stage(name, version, stage)
        with store.session() as s:
            row = Promotion(model=name, version=version, alias=alias, previous_version=previous,
                            gates=result.gates, verdict=verdict, forced=force and not passed,
                            reason=reason, actor=actor(), ci=result.ci)
            s.add(row)
            if prompt_art is not None and moved:
                model_art = _artifact(store, name, version)
                exists = s.scalars(select(LineageEdge).where(
                    LineageEdge.parent_id == prompt_art.id, LineageEdge.child_id == model_art.id,
                    LineageEdge.relation == "uses_prompt")).first()
                if exists is None:
                    s.add(LineageEdge(parent_id=prompt_art.id, child_id=model_art.id, relation="uses_prompt",
                                      parameters={"prompt": prompt, "alias": alias}))
            s.flush()
            result.audit_id = row.id
        if prompt_art is not None and moved and run_of(mv):
            from llmops.registry.versions import _draw_lineage

            _draw_lineage(store, _artifact(store, name, version).id, run_of(mv))
    return result


def audit(store: Store, name: str) -> list[dict[str, Any]]:
    validate_name(name, "model name")
    with store.session() as s:
        rows = s.scalars(select(Promotion).where(Promotion.model == name).order_by(Promotion.id)).all()
        return [
            {"id": r.id, "model": r.model, "version": r.version, "alias": r.alias, "previous_version": r.previous_version,
             "verdict": r.verdict, "forced": r.forced, "reason": r.reason, "gates": r.gates, "actor": r.actor,
             "ci": r.ci, "created_at": r.created_at}
            for r in rows
        ]
