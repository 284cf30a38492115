"""``llmops gc``: the debris ``llmops doctor`` finds, removed or finished, never a byte that a
version, dataset or prompt records.

Each registry name is repaired under the locks its writers take (registration, LoggedModel,
promotion, dataset), after checking it again under them: gc runs safely beside live writers,
and whatever an operation in flight holds is not touched. What a registration left *before*
its rows were committed is rolled back (the MLflow version purged so its number is given again,
its LoggedModel and run deleted, its bytes removed); what it left *after* (a PENDING
LoggedModel, a RUNNING run) is rolled forward, since the version is whole. An alias off its
audit trail goes back where the trail says. Files go last: staging folders no process holds
any more, then bytes no record owns, each checked again just before it is removed. Every step
is idempotent, so gc itself may be interrupted at any point and run again.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete

from llmops.core import owners
from llmops.registry import mlflow_rows
from llmops.registry.doctor import Finding, Report, check, scopes_of
from llmops.registry.store import Store


@dataclass
class Action:
    kind: str
    subject: str
    did: str
    done: bool
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def _locks(store: Store, scopes: list[str]) -> Iterator[None]:
    from llmops.registry.locks import named_lock

    with ExitStack() as stack:
        for scope in scopes:  # always in this order: no writer takes two of them the other way round
            stack.enter_context(named_lock(store, scope))
        yield


def gc(store: Store, *, dry_run: bool = False) -> tuple[list[Action], Report]:
    """Repair the debris; returns what was done (``dry_run``: what would be) and what is left for
    a person (``dry_run``: everything doctor found)."""
    first = check(store, files=False)
    actions: list[Action] = []
    if dry_run:
        actions += _repair_all(store, [f for f in first.findings if f.repair], True)
        if store.settings.tracking_is_local_db:
            from llmops.registry import doctor, doctor_files

            actions += [_act(f, True, lambda: None) for f in doctor_files.check(doctor.Facts(store))]
        return actions, check(store)
    found = first.findings
    for _ in range(3):  # a repair can leave debris of its own (a purged version's empty model, its run)
        names = sorted({f.scope for f in found if f.scope and f.repair})
        for name in names:
            scopes = scopes_of(name)
            with _locks(store, scopes):
                mine = check(store, names={name}, files=False, held=frozenset(scopes)).findings
                actions += _repair_all(store, [f for f in mine if f.kind != "missing-logged-model"], False)
            # outside the LoggedModel lock, which making one takes itself
            actions += _repair_all(store, [f for f in mine if f.kind == "missing-logged-model"], False)
        actions += _repair_all(store, [f for f in check(store, files=False).findings if f.scope is None],
                               False)
        found = check(store, files=False).findings
        if not any(f.repair for f in found):
            break
    if store.settings.tracking_is_local_db:
        from llmops.registry import doctor, doctor_files

        facts = doctor.Facts(store)
        keep = doctor_files.protected(facts)
        for f in doctor_files.check(facts):
            actions.append(_act(f, False, lambda f=f: _remove_files(facts, keep, f)))
    return actions, check(store)


def _repair_all(store: Store, findings: list[Finding], dry_run: bool) -> list[Action]:
    out = []
    for f in findings:
        fix = _FIXES.get(f.kind)
        if fix is None or f.repair is None:
            continue
        out.append(_act(f, dry_run, lambda f=f, fix=fix: fix(store, f)))
    return out


def _act(f: Finding, dry_run: bool, step: Callable[[], object]) -> Action:
    if dry_run:
        return Action(f.kind, f.subject, f.repair or "", False)
    try:
        step()
        return Action(f.kind, f.subject, f.repair or "", True)
    except Exception as exc:  # noqa: BLE001 - one repair's failure does not stop the others
        return Action(f.kind, f.subject, f.repair or "", False, f"{type(exc).__name__}: {exc}")


# -- the repairs -------------------------------------------------------------------------------
def _purge_version(store: Store, f: Finding) -> None:
    d = f.data
    client = store.mlflow
    mlflow_rows.purge_version(store, client, d["name"], d["version"], d.get("run_id"))
    if d.get("model_id"):
        _quiet(lambda: client.delete_logged_model(d["model_id"]))
    if d.get("run_id"):
        _drop_run(store, d["run_id"])


def _drop_run(store: Store, run_id: str) -> None:
    """A run no llmops row owns: FAILED if it was left RUNNING, then deleted (its bytes go with
    the artifact folder's orphans)."""
    client = store.mlflow
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - gone already
        return
    if run.info.status == "RUNNING":
        client.set_terminated(run_id, "FAILED")
    if run.info.lifecycle_stage != "deleted":
        client.delete_run(run_id)


def _stale_run(store: Store, f: Finding) -> None:
    if f.data["owned"]:
        store.mlflow.set_terminated(f.data["run_id"], "FINISHED")
    else:
        _drop_run(store, f.data["run_id"])


def _empty_model(store: Store, f: Finding) -> None:
    client = store.mlflow
    if client.search_model_versions(f"name='{f.data['name']}'"):
        return  # a version arrived meanwhile: not empty any more
    client.delete_registered_model(f.data["name"])


def _half_made_prompt(store: Store, f: Finding) -> None:
    pv = store.mlflow.get_prompt_version(f.data["name"], f.data["version"])
    if pv is not None and mlflow_rows.owner_state(pv.tags) is True:
        return
    mlflow_rows.purge_version(store, store.mlflow, f.data["name"], f.data["version"])


def _orphan_logged_model(store: Store, f: Finding) -> None:
    store.mlflow.delete_logged_model(f.data["model_id"])


def _pending_logged_model(store: Store, f: Finding) -> None:
    from llmops.registry import logged_models
    from llmops.registry.versions import run_of

    client = store.mlflow
    d = f.data
    mv = client.get_model_version(d["name"], d["version"])
    run_id = run_of(mv)
    if run_id and logged_models._run_active(client, run_id):
        logged_models._log_recorded_results(store, client, d["model_id"], d["name"], d["version"], run_id)
    logged_models.finalize(client, d["model_id"])


def _missing_logged_model(store: Store, f: Finding) -> None:
    from llmops.registry import logged_models

    logged_models._ensure(store, f.data["name"], f.data["version"], check=True)


def _alias(store: Store, f: Finding) -> None:
    d = f.data
    if d["want"] is None:
        store.mlflow.delete_registered_model_alias(d["name"], d["alias"])
    else:
        store.mlflow.set_registered_model_alias(d["name"], d["alias"], d["want"])


def _dangling_row(store: Store, f: Finding) -> None:
    from llmops.registry.tables import BenchmarkResult, LineageEdge

    table = {"llmops_lineage": LineageEdge, "llmops_benchmark_results": BenchmarkResult}[f.data["table"]]
    with store.session() as s:
        s.execute(delete(table).where(table.id == f.data["id"]))


def _duplicate_results(store: Store, f: Finding) -> None:
    from llmops.registry.tables import BenchmarkResult

    with store.session() as s:
        s.execute(delete(BenchmarkResult).where(BenchmarkResult.job_key == f.data["job_key"],
                                                BenchmarkResult.run_id != f.data["keep"]))


def _remove_files(facts, keep: list[Path], f: Finding) -> None:  # noqa: ANN001 - doctor.Facts
    """Staging of a dead process (claimed from it first), or orphaned bytes (the run or
    LoggedModel asked again, each file checked against what is recorded)."""
    from llmops.registry import doctor_files

    unit = Path(f.data["path"])
    if f.data["what"] == "incoming":
        with owners.claim(unit) as fd:
            if fd is not None:
                shutil.rmtree(unit, ignore_errors=True)
        return
    for path in doctor_files.orphans(facts, unit, f.data["what"], keep):
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
    _prune_empty(unit)


def _prune_empty(top: Path) -> None:
    if not top.is_dir() or top.is_symlink():
        return
    for sub in sorted((p for p in top.rglob("*") if p.is_dir() and not p.is_symlink()),
                      key=lambda p: len(p.parts), reverse=True):
        _quiet(sub.rmdir)
    _quiet(top.rmdir)


def _quiet(step: Callable[[], object]) -> None:
    try:
        step()
    except Exception:  # noqa: BLE001, S110 - a best-effort tidy-up
        pass


_FIXES: dict[str, Callable[[Store, Finding], None]] = {
    "half-made-version": _purge_version,
    "burned-version": lambda store, f: mlflow_rows.purge_version(store, store.mlflow, f.data["name"], f.data["version"]),
    "empty-model": _empty_model,
    "half-made-prompt": _half_made_prompt,
    "stale-run": _stale_run,
    "run-without-rows": lambda store, f: _drop_run(store, f.data["run_id"]),
    "orphan-logged-model": _orphan_logged_model,
    "pending-logged-model": _pending_logged_model,
    "missing-logged-model": _missing_logged_model,
    "alias-off-audit": _alias,
    "dangling-row": _dangling_row,
    "duplicate-results": _duplicate_results,
}
