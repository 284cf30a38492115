"""Gated promotion: move an MLflow alias only when the recorded metrics pass.

MLflow's stages are deprecated (since 2.9); the alias is what moves, and a
stage is set only on request for old tooling. Each attempt, passed or failed,
is an audit row; the read-decide-move sequence runs under a named lock so two
promotions of one model at once are serialised and both audited, and a move is
never without its audit row.

A gate reads results of one protocol and one machine only: per metric, the
version's newest result on the machine defines the protocol, and a ``*_ratio``
compares with the alias holder's result of that same protocol on that machine.
Each gate says which protocol it read.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select

from llmops.core.errors import LLMOpsError, UsageError
from llmops.registry import protocols, results, traces
from llmops.registry.gates import Gate, GateResult, Provenance, evaluate
from llmops.registry.locks import named_lock
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
    target: str | None = None  # the fleet target whose results the gates read (None: this machine's)

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


@dataclass
class Measured:
    """What the gates read: values, and for each the protocol it was measured under."""

    metrics: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Provenance] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # why a metric could not be measured
    hardware: str | None = None


SIZE = Provenance(None, "file_mb, size of the stored bytes")
PRODUCTION = Provenance(None, "prod_*, requests this version served through llmops serve (traces, last 24 h)")


def measure(store: Store, name: str, version: str, previous: str | None, hardware: str | None = None,
            target: str | None = None) -> Measured:
    """Per metric, the newest result for the version on one machine (``hardware``, else that of
    its newest result; of fleet ``target``, or measured locally) defines the protocol; a ``*_ratio``
    divides by the alias holder's newest result of that same protocol on that same machine and
    target, and is missing (with a note) without one."""
    art = _artifact(store, name, version)
    with store.session() as s:
        rs = results.latest(s, art.id, hardware, target)
        out = Measured(hardware=rs.hardware_fingerprint)
        for metric, r in rs.results.items():
            out.metrics[metric] = r.value
            out.provenance[metric] = Provenance(protocols.short(r.protocol_key), r.summary())
        out.metrics["file_mb"] = art.size_bytes / MIB
        out.provenance["file_mb"] = SIZE
        if previous is None or previous == version:
            return out
        holder = _artifact(store, name, previous)
        for metric, r in rs.results.items():
            if metric == "file_mb":
                continue
            prov = out.provenance[metric]
            theirs = results.comparable(s, holder.id, metric, r.protocol_key, r.hardware_fingerprint, target)
            if theirs is None:
                out.notes[f"{metric}_ratio"] = (
                    f"no comparable result: the holder models:/{name}/{previous} has no {metric} under protocol "
                    f"{prov.protocol} ({prov.summary}) on hardware {r.hardware_fingerprint[:12]}"
                    + (f" of target {target}" if target else ""))
            elif theirs.value != 0:
                out.metrics[f"{metric}_ratio"] = r.value / theirs.value
                out.provenance[f"{metric}_ratio"] = prov
    if holder.size_bytes:
        out.metrics["file_mb_ratio"] = art.size_bytes / holder.size_bytes
        out.provenance["file_mb_ratio"] = SIZE
    return out


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
            dry_run: bool = False, force: bool = False, reason: str | None = None,
            target: str | None = None) -> PromotionResult:
    """Move ``alias`` onto the version when every gate passes. ``target``: the gates read that fleet
    target's results (``llmops bench --on``), not those measured on this machine."""
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
        measured = measure(store, name, version, previous, hardware, target)
        if any(g.metric.startswith("prod_") for g in gates):
            # what production saw: the requests this version served through llmops serve
            for metric, value in traces.gate_metrics(store, name, version).items():
                measured.metrics[metric] = value
                measured.provenance[metric] = PRODUCTION
        metrics, fp = measured.metrics, measured.hardware
        gate_results: list[GateResult] = evaluate(gates, metrics, measured.provenance, measured.notes)
        passed = all(g.passed for g in gate_results)
        verdict = "passed" if passed else ("forced" if force else "failed")
        moved = (passed or force) and not dry_run
        result = PromotionResult(name, version, alias, previous, verdict, moved, dry_run,
                                 [g.to_dict() for g in gate_results], metrics, fp, ci=ci_metadata(), target=target)
        if dry_run:
            return result
        model_art = _artifact(store, name, version)
        # The audit row and the move are one step: the row is written in a transaction, the alias
        # moved, then the row committed; if the commit fails, the alias goes back to its holder.
        # (On SQLite, where MLflow's tables share the file and its lock, the insert is flushed
        # with the commit, after the move; on PostgreSQL it is flushed before the move.)
        with store.session() as s:
            row = Promotion(model=name, version=version, alias=alias, previous_version=previous,
                            gates=result.gates, verdict=verdict, forced=force and not passed,
                            reason=reason, actor=actor(), ci=result.ci, target=target)
            s.add(row)
            if prompt_art is not None and moved:
                with s.no_autoflush:
                    exists = s.scalars(select(LineageEdge).where(
                        LineageEdge.parent_id == prompt_art.id, LineageEdge.child_id == model_art.id,
                        LineageEdge.relation == "uses_prompt")).first()
                if exists is None:
                    s.add(LineageEdge(parent_id=prompt_art.id, child_id=model_art.id, relation="uses_prompt",
                                      parameters={"prompt": prompt, "alias": alias}))
            if store.engine.dialect.name != "sqlite":
                s.flush()
            undo = _move(store, mv, alias, previous, stage) if moved else None
            try:
                s.flush()
                result.audit_id = row.id
                s.commit()
            except BaseException:
                if undo is not None:
                    undo()
                raise
        if prompt_art is not None and moved:
            from llmops.registry.pictures import redraw

            _link_prompt(store, mv, prompt_art)
            redraw(store, model_art.id)  # the uses_prompt edge is in the picture now
    return result


def _link_prompt(store: Store, mv, prompt_art: Artifact) -> None:  # noqa: ANN001 - mlflow ModelVersion
    """The prompt version on the version's LoggedModel too (its page's Prompts); a convenience for
    the UI, so a failure is a warning."""
    from llmops.registry import logged_models

    model_id = logged_models.model_id_of(mv)
    if not model_id or not prompt_art.version:
        return
    try:
        logged_models.link_prompt(store.mlflow, model_id, prompt_art.name, prompt_art.version)
    except Exception as exc:  # noqa: BLE001
        import sys

        sys.stderr.write(f"warning: could not link {prompt_art.uri} to the LoggedModel {model_id}: {exc}\n")


def _move(store: Store, mv, alias: str, previous: str | None, stage: str | None):  # noqa: ANN001, ANN202
    """Point ``alias`` (and the optional stage) at ``mv``; returns how to put them back."""
    client = store.mlflow
    old_stage = getattr(mv, "current_stage", None) or "None"
    client.set_registered_model_alias(mv.name, alias, str(mv.version))
    try:
        if stage:
            client.transition_model_version_stage(mv.name, str(mv.version), stage)
    except BaseException:
        _restore(client, mv, alias, previous, None)
        raise
    return lambda: _restore(client, mv, alias, previous, old_stage if stage else None)


def _restore(client, mv, alias: str, previous: str | None, old_stage: str | None) -> None:  # noqa: ANN001
    """Best effort: the alias back on its previous holder (or gone), the stage as it was."""
    import sys

    steps = [(lambda: client.set_registered_model_alias(mv.name, alias, previous)) if previous is not None
             else (lambda: client.delete_registered_model_alias(mv.name, alias))]
    if old_stage is not None:
        steps.append(lambda: client.transition_model_version_stage(mv.name, str(mv.version), old_stage))
    for step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - the original error is what matters
            sys.stderr.write(f"warning: could not put @{alias} of {mv.name} back: {exc}\n")


def audit(store: Store, name: str) -> list[dict[str, Any]]:
    validate_name(name, "model name")
    with store.session() as s:
        rows = s.scalars(select(Promotion).where(Promotion.model == name).order_by(Promotion.id)).all()
        return [
            {"id": r.id, "model": r.model, "version": r.version, "alias": r.alias, "previous_version": r.previous_version,
             "verdict": r.verdict, "forced": r.forced, "reason": r.reason, "gates": r.gates, "actor": r.actor,
             "ci": r.ci, "created_at": r.created_at, "target": r.target}
            for r in rows
        ]
