"""The checks of ``llmops doctor`` on the registry's records: our rows against MLflow's objects,
both ways, and our rows against each other (``doctor.py`` gathers the facts and runs these)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import aliased

from llmops.core.errors import LLMOpsError
from llmops.core.hashing import sha256_path, sha256_text, size_of
from llmops.registry import mlflow_rows
from llmops.registry.doctor import (MOVES, REGISTRATION_RUN_TAG, STALE_UNKNOWN_S, Facts, Finding, age_s, highest,
                                    path_of)
from llmops.registry.tables import Artifact, BenchmarkResult, Hardware, LineageEdge, Run

SCHEMES = {"model": "models", "dataset": "datasets", "prompt": "prompts"}
NO_REPAIR = None


def _ref(kind: str, name: str, version: str) -> str:
    return f"{SCHEMES.get(kind, kind)}:/{name}/{version}"


# -- llmops rows: their MLflow counterparts and their bytes ---------------------------------
def versions(facts: Facts, deep: bool) -> list[Finding]:
    out: list[Finding] = []
    bytes_checked: set[int] = set()
    for v in facts.versions:
        subject = _ref(v["kind"], v["name"], v["version"])
        art = facts.artifacts.get(v["artifact_id"])
        if art is None:
            out.append(Finding("dangling-row", subject, f"its artifact row {v['artifact_id']} does not exist",
                               NO_REPAIR, v["name"]))
            continue
        if v["kind"] == "model":
            mv = facts.mlflow_versions.get((v["name"], v["version"]))
            if mv is None:
                out.append(Finding("missing-mlflow", subject, "MLflow has no such model version", NO_REPAIR, v["name"]))
            elif (mv.tags or {}).get("sha256") not in (None, art["sha256"]):
                out.append(Finding("record-mismatch", subject, f"MLflow's sha256 {mv.tags['sha256'][:12]}… is not "
                                   f"llmops' {art['sha256'][:12]}…", NO_REPAIR, v["name"]))
        elif v["kind"] == "prompt":
            pv = facts.prompts.get((v["name"], v["version"]))
            if pv is None:
                out.append(Finding("missing-mlflow", subject, "MLflow's prompt registry has no such version",
                                   NO_REPAIR, v["name"]))
            elif sha256_text(pv.template if isinstance(pv.template, str) else str(pv.template)) != art["sha256"]:
                out.append(Finding("record-mismatch", subject, "the prompt's text does not hash to the recorded "
                                   "sha256", NO_REPAIR, v["name"]))
        if v["run"] and v["kind"] in ("model", "dataset"):
            run = facts.runs.get(v["run"])
            if run is None or run.info.lifecycle_stage == "deleted":
                out.append(Finding("missing-mlflow", subject, f"its MLflow run {v['run']} is "
                                   f"{'deleted' if run is not None else 'gone'}", NO_REPAIR, v["name"]))
        if art["meta"].get("stored") and art["id"] not in bytes_checked:
            bytes_checked.add(art["id"])
            out += _bytes(facts, art, subject, v["name"], deep)
    return out


def _bytes(facts: Facts, art: dict[str, Any], subject: str, scope: str, deep: bool) -> list[Finding]:
    from llmops.registry.artifacts import rehash

    path = path_of(facts.store, art["uri"])
    tracking = facts.store.settings.tracking_uri
    try:
        if path is not None:
            if not path.exists():
                return [Finding("missing-bytes", subject, f"{path} does not exist", NO_REPAIR, scope)]
            size, sha = size_of(path), (sha256_path(path) if deep else None)
        else:
            size = remote_size(art["uri"], tracking)
            if size is None:
                return [Finding("missing-bytes", subject, f"{art['uri']} does not exist", NO_REPAIR, scope)]
            sha = rehash(art["uri"], tracking)[0] if deep else None
    except (OSError, LLMOpsError) as exc:
        return [Finding("missing-bytes", subject, f"cannot read {path or art['uri']}: {exc}", NO_REPAIR, scope)]
    if size != art["size"]:
        return [Finding("size-mismatch", subject, f"{size} bytes stored, {art['size']} recorded", NO_REPAIR, scope)]
    if sha is not None and sha != art["sha256"]:
        return [Finding("hash-mismatch", subject, f"sha256 {sha[:16]}… stored, {art['sha256'][:16]}… recorded",
                        NO_REPAIR, scope)]
    return []


def remote_size(uri: str, tracking_uri: str | None) -> int | None:
    """The size of a file or folder behind a tracking server, from its listing (None: missing)."""
    import posixpath

    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    parent, name = posixpath.split(uri.rstrip("/"))
    entries = {posixpath.basename(f.path): f for f in
               get_artifact_repository(parent, tracking_uri=tracking_uri).list_artifacts()}
    entry = entries.get(name)
    if entry is None:
        return None
    if not entry.is_dir:
        return entry.file_size

    def total(repo, path: str) -> int:  # noqa: ANN001
        return sum(total(repo, f.path) if f.is_dir else (f.file_size or 0) for f in repo.list_artifacts(path))

    return total(get_artifact_repository(uri, tracking_uri=tracking_uri), "")


# -- MLflow's objects made by llmops: each with its rows ------------------------------------------
def mlflow_side(facts: Facts) -> list[Finding]:
    out: list[Finding] = []
    for (name, version), mv in facts.mlflow_versions.items():
        run_id = (mv.tags or {}).get(REGISTRATION_RUN_TAG)
        if not run_id or ("model", name, version) in facts.rows or facts.run_owner(run_id) is True:
            continue
        out.append(Finding("half-made-version", _ref("model", name, version),
                           f"made by registration run {run_id}, which never finished", "purge the version (its "
                           "number is given again), its LoggedModel and its run", name,
                           {"name": name, "version": version, "run_id": run_id,
                            "model_id": (mv.tags or {}).get("llmops.logged_model_id")}))
    for d in mlflow_rows.deleted_versions(facts.store):
        name, version, run_id = d["name"], d["version"], d["tags"].get(REGISTRATION_RUN_TAG)
        if run_id and ("model", name, version) not in facts.rows and int(version) > highest(facts, name):
            out.append(Finding("burned-version", _ref("model", name, version), "deleted, never finished, and "
                               "holding the number the next version would get", "purge it", name,
                               {"name": name, "version": version}))
    model_names = {v["name"] for v in facts.versions if v["kind"] == "model"}
    for name, rm in facts.models.items():
        if ((rm.tags or {}).get(mlflow_rows.MADE_TAG) == mlflow_rows.MADE_BY and not highest(facts, name)
                and name not in model_names):
            out.append(Finding("empty-model", f"models:/{name}", "created by a registration that never finished; "
                               "it has no version", "delete it", name, {"name": name}))
    for (name, version), pv in facts.prompts.items():
        tags = pv.tags or {}
        if (mlflow_rows.OWNER_TAG not in tags or ("prompt", name, version) in facts.rows
                or mlflow_rows.owner_state(tags) is True):
            continue
        out.append(Finding("half-made-prompt", _ref("prompt", name, version), "made by `prompts add` whose process "
                           "is gone before it wrote llmops' rows", "purge the version", None,
                           {"name": name, "version": version}))
    return out


def runs(facts: Facts) -> list[Finding]:
    out: list[Finding] = []
    for run_id, run in facts.runs.items():
        tags = run.data.tags or {}
        command = tags.get("llmops.command")
        if not command or run.info.lifecycle_stage == "deleted":
            continue
        state = mlflow_rows.owner_state(tags)
        if state is True:
            continue
        name = tags.get("llmops.model") or tags.get("llmops.dataset")
        owned = run_id in facts.owned_runs
        data = {"run_id": run_id, "owned": owned, "name": name}
        if run.info.status == "RUNNING":
            if state is None and age_s(run.info.start_time) < STALE_UNKNOWN_S:
                continue
            out.append(Finding("stale-run", f"run {run_id}", f"`{command}` of {name} RUNNING, and its process is gone",
                               "mark it FINISHED (its version is whole)" if owned else
                               "delete it, and the bytes nothing else holds", name, data))
        elif not owned:
            out.append(Finding("run-without-rows", f"run {run_id}", f"`{command}` of {name} ({run.info.status}) "
                               "that no llmops row owns", "delete it, and the bytes nothing else holds", name, data))
    return out


def logged_models(facts: Facts) -> list[Finding]:
    from llmops.registry.logged_models import TAG_MODEL, TAG_VERSION, VERSION_TAG

    out: list[Finding] = []
    named = {mv.tags[VERSION_TAG]: key for key, mv in facts.mlflow_versions.items() if (mv.tags or {}).get(VERSION_TAG)}
    live = {lm.model_id for lm in facts.logged}
    for lm in facts.logged:
        tags = lm.tags or {}
        name = tags.get(TAG_MODEL)
        if not name or mlflow_rows.owner_state(tags) is True:
            continue
        key = named.get(lm.model_id)
        if key is None:
            out.append(Finding("orphan-logged-model", f"LoggedModel {lm.model_id}",
                               f"{lm.name} for models:/{name}/{tags.get(TAG_VERSION)}, which does not name it",
                               "delete it", name, {"model_id": lm.model_id}))
        elif str(getattr(lm.status, "value", lm.status)) == "PENDING" and ("model", *key) in facts.rows:
            out.append(Finding("pending-logged-model", f"LoggedModel {lm.model_id}", f"{lm.name} of a whole version "
                               "left PENDING", "log its version's recorded figures and finalize it", key[0],
                               {"model_id": lm.model_id, "name": key[0], "version": key[1]}))
    for (name, version), mid in ((key, mid) for mid, key in named.items()):
        if mid not in live and ("model", name, version) in facts.rows:
            out.append(Finding("missing-logged-model", _ref("model", name, version), f"names LoggedModel {mid}, "
                               "which is gone", "make it again (as `models backfill` does)", name,
                               {"name": name, "version": version}))
    return out


def aliases(facts: Facts) -> list[Finding]:
    out: list[Finding] = []
    last: dict[tuple[str, str], str] = {}
    for p in facts.promotions:
        if p["verdict"] in MOVES:
            last[(p["model"], p["alias"])] = p["version"]
    for name in sorted({v["name"] for v in facts.versions if v["kind"] == "model"}):
        rm = facts.models.get(name)
        actual = {a: str(v) for a, v in dict(getattr(rm, "aliases", None) or {}).items()}
        for alias in sorted({a for (m, a) in last if m == name} | set(actual)):
            want = last.get((name, alias))
            if want is not None and (name, want) not in facts.mlflow_versions:
                want = None  # that version is gone: the alias cannot point at it
            have = actual.get(alias)
            if want != have:
                said = f"version {want}" if want else "no version (no audited move)"
                out.append(Finding("alias-off-audit", f"models:/{name}@{alias}",
                                   f"on {'version ' + have if have else 'nothing'}, the audit trail says {said}",
                                   f"{'move it to version ' + want if want else 'remove it'}", name,
                                   {"name": name, "alias": alias, "want": want, "have": have}))
    return out


# -- our rows against each other ----------------------------------------------------------------
def integrity(facts: Facts) -> list[Finding]:
    out: list[Finding] = []
    parent, child = aliased(Artifact), aliased(Artifact)
    with facts.store.session() as s:
        q = (select(LineageEdge.id, LineageEdge.parent_id, LineageEdge.child_id, parent.id, child.id)
             .outerjoin(parent, parent.id == LineageEdge.parent_id).outerjoin(child, child.id == LineageEdge.child_id)
             .where((parent.id.is_(None)) | (child.id.is_(None))))
        for edge_id, p_id, c_id, p_ok, c_ok in s.execute(q):
            out.append(Finding("dangling-row", f"lineage edge {edge_id}", f"{p_id} -> {c_id}: artifact "
                               f"{p_id if p_ok is None else c_id} does not exist", "delete the edge", None,
                               {"table": "llmops_lineage", "id": edge_id}))
        q = (select(BenchmarkResult.id, BenchmarkResult.artifact_id, Artifact.id, BenchmarkResult.hardware_id,
                    Hardware.id, BenchmarkResult.run_id, Run.id)
             .outerjoin(Artifact, Artifact.id == BenchmarkResult.artifact_id)
             .outerjoin(Hardware, Hardware.id == BenchmarkResult.hardware_id)
             .outerjoin(Run, Run.id == BenchmarkResult.run_id)
             .where(Artifact.id.is_(None) | (BenchmarkResult.hardware_id.is_not(None) & Hardware.id.is_(None))
                    | (BenchmarkResult.run_id.is_not(None) & Run.id.is_(None))))
        for rid, art_id, art_ok, hw_id, hw_ok, run_id, run_ok in s.execute(q):
            what = (f"artifact {art_id}" if art_ok is None else f"hardware {hw_id}" if hw_id is not None and hw_ok is None
                    else f"run {run_id}")
            out.append(Finding("dangling-row", f"result {rid}", f"points at {what}, which does not exist",
                               "delete the result", None, {"table": "llmops_benchmark_results", "id": rid}))
        q = (select(BenchmarkResult.job_key).where(BenchmarkResult.job_key.is_not(None))
             .group_by(BenchmarkResult.job_key).having(func.count(func.distinct(BenchmarkResult.run_id)) > 1))
        for (job_key,) in s.execute(q):
            runs_of = sorted({r for (r,) in s.execute(select(BenchmarkResult.run_id)
                                                      .where(BenchmarkResult.job_key == job_key))})
            out.append(Finding("duplicate-results", f"fleet job {job_key[:16]}", f"recorded by runs {runs_of}",
                               f"keep run {runs_of[0]}'s results", None, {"job_key": job_key, "keep": runs_of[0]}))
    return out
