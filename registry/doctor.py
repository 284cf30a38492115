"""``llmops doctor``: the store's invariants, checked, one finding per violation.

What a registration, a promotion or a dataset version promises (all or nothing, a move never
without its audit row) holds while the process lives. One killed with SIGKILL, a database
connection dropped mid-transaction, a tracking server restarted or a full disk can still leave
pieces behind; this module finds them. Each :class:`Finding` names what is wrong and, when it is
debris, what ``llmops gc`` (``repair.py``) does about it; a finding without a repair (bytes
missing, a record that disagrees with its bytes) needs a person.

The invariants: every version's bytes present with their recorded size (``deep``: sha256);
every llmops row with its MLflow counterpart, and every MLflow version, run, LoggedModel and
prompt version llmops made with its llmops rows; no run RUNNING whose process is gone; lineage
edges and results pointing at rows that exist; each alias where the last move of its audit
trail put it; no bytes in the artifact folder that nothing owns; no staging folder of a dead
process. Work in flight is not debris: a name whose lock a writer holds (``locks``), or an object
whose making process still runs (``mlflow_rows.owner_state``), is left out.

The facts are read once: our tables through SQLAlchemy, MLflow's objects through its client
(so a shared tracking server works as a local store does). Files are looked at only where the
artifact folder is local (a local store, or the server's own store).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from llmops.registry import mlflow_rows
from llmops.registry.store import Store
from llmops.registry.tables import Promotion, Run, Version

# A run whose owner this host cannot ask (another host's, or made before owners were recorded)
# counts as stale only once it has been RUNNING this long.
STALE_UNKNOWN_S = 24 * 3600
REGISTRATION_RUN_TAG = "llmops.run_id"
MOVES = ("passed", "forced", "rollback")

KINDS = {
    "missing-bytes": "a version's stored bytes are gone",
    "size-mismatch": "a version's stored bytes are not the recorded size",
    "hash-mismatch": "a version's stored bytes do not hash to the recorded sha256 (--deep)",
    "record-mismatch": "llmops and MLflow record different bytes for one version",
    "missing-mlflow": "an llmops version whose MLflow version, run or prompt version is gone",
    "dangling-row": "a lineage edge, result or version pointing at a row that does not exist",
    "duplicate-results": "one fleet job's results recorded by two runs",
    "half-made-version": "an MLflow model version llmops made that has no llmops rows",
    "burned-version": "a deleted, never-finished MLflow version holding the next version number",
    "empty-model": "a registered model llmops created that has no version",
    "half-made-prompt": "a prompt version llmops made that has no llmops rows",
    "stale-run": "an MLflow run RUNNING whose process is gone",
    "run-without-rows": "an MLflow run llmops made that no llmops row owns",
    "orphan-logged-model": "a LoggedModel llmops made that its version does not name",
    "pending-logged-model": "a finished version's LoggedModel left PENDING",
    "missing-logged-model": "a version naming a LoggedModel that is gone",
    "alias-off-audit": "an alias that is not where the last move of its audit trail put it",
    "orphan-bytes": "files in the artifact folder that no run, LoggedModel, version or dataset owns",
    "staged-leftover": "a staging folder of a process that is gone",
}


@dataclass
class Finding:
    kind: str
    subject: str
    detail: str
    repair: str | None  # what ``llmops gc`` does; None: nothing it may do
    scope: str | None = None  # the registry name whose locks the repair takes
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.kind}: {self.subject}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    findings: list[Finding]
    checked: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "findings": [f.to_dict() for f in self.findings]}


def _paged(fn, *args: Any, **kw: Any) -> list[Any]:  # noqa: ANN001 - an MLflow search method
    out, token = [], None
    while True:
        page = fn(*args, page_token=token, **kw)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


class Facts:
    """What the checks read: our rows (plain values) and MLflow's objects, read once."""

    def __init__(self, store: Store) -> None:
        from mlflow.entities import ViewType

        self.store = store
        client = self.client = store.open().mlflow
        with store.session() as s:
            self.versions = [dict(id=v.id, kind=v.kind, name=v.name, version=v.version, artifact_id=v.artifact_id,
                                  run=v.mlflow_run_id) for v in s.scalars(select(Version).order_by(Version.id))]
            from llmops.registry.tables import Artifact

            self.artifacts = {a.id: dict(id=a.id, kind=a.kind, uri=a.uri, sha256=a.sha256, size=a.size_bytes,
                                         meta=dict(a.meta or {})) for a in s.scalars(select(Artifact))}
            self.run_rows = {r for r in s.scalars(select(Run.mlflow_run_id).where(Run.mlflow_run_id.is_not(None)))}
            self.promotions = [dict(id=p.id, model=p.model, alias=p.alias, version=p.version, verdict=p.verdict)
                               for p in s.scalars(select(Promotion).order_by(Promotion.id))]
        self.owned_runs = {v["run"] for v in self.versions if v["run"]} | self.run_rows
        self.rows = {(v["kind"], v["name"], v["version"]) for v in self.versions}
        self.mlflow_versions = {(mv.name, str(mv.version)): mv
                                for mv in _paged(client.search_model_versions, max_results=10000)}
        self.models = {rm.name: rm for rm in _paged(client.search_registered_models, max_results=1000)}
        self.runs = {r.info.run_id: r for r in _paged(client.search_runs, [store.experiment_id],
                                                      run_view_type=ViewType.ALL, max_results=10000)}
        self.logged = _paged(client.search_logged_models, [store.experiment_id], max_results=1000)
        self.prompts: dict[tuple[str, str], Any] = {}
        for p in _paged(client.search_prompts, max_results=1000):
            for pv in _paged(client.search_prompt_versions, p.name, max_results=1000):
                self.prompts[(p.name, str(pv.version))] = pv

    def run_owner(self, run_id: str | None) -> bool | None:
        run = self.runs.get(run_id or "")
        return mlflow_rows.owner_state(run.data.tags) if run is not None else False


def _in_flight(store: Store, scopes: list[str], held: frozenset[str]) -> bool:
    """Whether a writer holds one of these locks now (locks this process holds do not count)."""
    from llmops.registry.locks import try_named_lock

    for scope in scopes:
        if scope in held:
            continue
        with try_named_lock(store, scope) as free:
            if not free:
                return True
    return False


def check(store: Store, *, deep: bool = False, names: set[str] | None = None, files: bool = True,
          held: frozenset[str] = frozenset()) -> Report:
    """Every invariant, or (``names``) those of these registry names only; ``files``: the
    artifact folder too; ``held``: locks the caller holds (``llmops gc``)."""
    from llmops.registry import doctor_checks as checks

    facts = Facts(store)
    findings: list[Finding] = []
    findings += checks.versions(facts, deep)
    findings += checks.mlflow_side(facts)
    findings += checks.runs(facts)
    findings += checks.logged_models(facts)
    findings += checks.aliases(facts)
    if names is None:
        findings += checks.integrity(facts)
    if files and names is None and store.settings.tracking_is_local_db:
        from llmops.registry import doctor_files

        findings += doctor_files.check(facts)
    if names is not None:
        findings = [f for f in findings if f.scope in names]
    findings = [f for f in findings
                if f.scope is None or not _in_flight(store, scopes_of(f.scope), held)]
    checked = {"versions": len(facts.versions), "artifacts": len(facts.artifacts), "runs": len(facts.runs),
               "model_versions": len(facts.mlflow_versions), "logged_models": len(facts.logged),
               "prompt_versions": len(facts.prompts)}
    return Report(findings, checked)


def scopes_of(name: str) -> list[str]:
    """The locks of every writer of registry name ``name``."""
    return [f"register:{name}", f"logged-model:{name}", f"promote:{name}", f"dataset:{name}"]


def age_s(ms: int | None) -> float:
    return time.time() - (ms or 0) / 1000


def highest(facts: Facts, name: str) -> int:
    return max((int(v) for (n, v) in facts.mlflow_versions if n == name), default=0)


def path_of(store: Store, uri: str | None) -> Path | None:
    """Where a stored URI's bytes are on this machine: a ``file:`` URI, or (on a tracking
    server's own store) an ``mlflow-artifacts:`` one under the store's artifact folder."""
    from llmops.registry.artifacts import local_path

    if not uri:
        return None
    local = local_path(uri)
    if local is not None:
        return local
    if uri.startswith("mlflow-artifacts:") and store.settings.tracking_is_local_db:
        rest = uri.split(":", 1)[1].lstrip("/")
        return store.settings.artifact_root / rest
    return None


def count_rows(store: Store) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Version)) or 0
