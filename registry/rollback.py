"""Rollback: the alias goes back to the version that held it before, by the audit trail.

The audit trail (``llmops_promotions``) records every move of an alias with the holder it
replaced. Read as a history, moves that passed (or were forced) push a holder, and each
rollback pops one: rolling back twice after promotions of v1, v2 and v3 lands on v1, not
back on v3. A rollback is itself an audit row (verdict ``rollback``, the reason, the
actor and CI facts), taken under the same named lock as promotion, so a rollback and a
promotion of one model never interleave. A serving process that follows the alias picks the
move up on its next poll.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select

from llmops.core.errors import LLMOpsError, UsageError
from llmops.registry.locks import named_lock
from llmops.registry.refs import validate_name
from llmops.registry.store import Store, actor
from llmops.registry.tables import Promotion

ROLLBACK = "rollback"
# Verdicts of audit rows after which the alias had moved (the rest, "failed" and the like, left it).
MOVED = frozenset({"passed", "forced"})


@dataclass
class RollbackResult:
    model: str
    alias: str
    from_version: str
    to_version: str
    reason: str
    moved: bool
    dry_run: bool
    audit_id: int | None = None
    actor: str | None = None
    ci: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ci() -> dict[str, str]:
    try:
        from llmops.registry.promotion import ci_metadata
    except ImportError:  # the promotion module names CI facts; a rollback without them is still a rollback
        return {}
    return ci_metadata()


def holders(rows: list[Promotion]) -> list[str]:
    """The alias's holders, oldest first, as the audit rows (in id order) leave them: a move pushes
    its version (after the holder it names, if the history does not start with it), a rollback
    pops the holder it replaced."""
    stack: list[str] = []
    for r in rows:
        if r.verdict == ROLLBACK:
            if stack and stack[-1] == r.previous_version:
                stack.pop()
            if not stack or stack[-1] != r.version:
                stack.append(r.version)
        elif r.verdict in MOVED:
            if not stack and r.previous_version:
                stack.append(r.previous_version)
            if not stack or stack[-1] != r.version:
                stack.append(r.version)
    return stack


def target(store: Store, name: str, alias: str, current: str) -> str:
    """The version ``alias`` goes back to from ``current``."""
    with store.session() as s:
        rows = list(s.scalars(select(Promotion).where(Promotion.model == name, Promotion.alias == alias)
                              .order_by(Promotion.id)).all())
        stack = holders(rows)
        if stack and stack[-1] == current:
            if len(stack) < 2:
                raise LLMOpsError(f"models:/{name}@{alias} has had no holder before version {current} in the audit "
                                  f"trail: nothing to roll back to (llmops promotions list {name})")
            return stack[-2]
        # The alias was moved outside llmops (MLflow's UI or API): fall back on the last audited
        # move onto the current holder.
        for r in reversed(rows):
            if r.version == current and (r.verdict in MOVED or r.verdict == ROLLBACK) and r.previous_version:
                return r.previous_version
    raise LLMOpsError(f"the audit trail of models:/{name}@{alias} does not say what held it before version {current} "
                      f"(was the alias moved outside llmops?): move it with `llmops promote {name} VERSION --to {alias}`")


def rollback(store: Store, name: str, *, alias: str = "production", reason: str, dry_run: bool = False) -> RollbackResult:
    validate_name(name, "model name")
    validate_name(alias, "alias")
    if not (reason and reason.strip()):
        raise UsageError("rollback needs --reason TEXT (it goes into the audit trail)")
    reason = reason.strip()
    client = store.open().mlflow
    with named_lock(store, f"promote:{name}"):
        try:
            current = str(client.get_model_version_by_alias(name, alias).version)
        except Exception:  # noqa: BLE001 - MLflow raises for a missing model or alias alike
            raise LLMOpsError(f"models:/{name}@{alias} does not exist: nothing to roll back") from None
        to = target(store, name, alias, current)
        try:
            client.get_model_version(name, to)
        except Exception:  # noqa: BLE001
            raise LLMOpsError(f"models:/{name}/{to}, the previous holder of @{alias}, no longer exists") from None
        result = RollbackResult(name, alias, current, to, reason, moved=not dry_run, dry_run=dry_run,
                                actor=actor(), ci=_ci())
        if dry_run:
            return result
        client.set_registered_model_alias(name, alias, to)
        try:
            with store.session() as s:
                row = Promotion(model=name, version=to, alias=alias, previous_version=current, gates=[],
                                verdict=ROLLBACK, forced=False, reason=reason, actor=result.actor, ci=result.ci)
                s.add(row)
                s.flush()
                result.audit_id = row.id
        except BaseException:
            # No unaudited move: put the alias back where it was.
            try:
                client.set_registered_model_alias(name, alias, current)
            except Exception:  # noqa: BLE001, S110 - the audit failure is the error to report
                pass
            raise
    return result
