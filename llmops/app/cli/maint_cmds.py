"""``llmops doctor`` and ``llmops gc``: the store's invariants, and the debris a killed process,
a dropped connection or a full disk leaves, found and removed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from llmops.app.cli.base import _state, cli, common, out
from llmops.core.errors import LLMOpsError


class Unhealthy(LLMOpsError):
    """Doctor found problems (listed on stdout already): exit 1."""

    reported = True


def _outputs_option(f):  # noqa: ANN001, ANN202
    return click.option("--outputs", multiple=True, type=click.Path(file_okay=False),
                        help="A folder outputs are written to, to look for staged copies of killed "
                             "conversions (repeatable; default: the current folder).")(f)


@cli.command()
@click.option("--deep", is_flag=True, help="Also re-hash every version's stored bytes against its sha256.")
@_outputs_option
@common
def doctor(deep: bool, outputs: tuple[str, ...]) -> None:
    """Check the store's invariants: one line per violation, exit 0 when clean and 1 otherwise."""
    from llmops.app import maintenance
    from llmops.registry.doctor import check

    report = check(_state().store(), deep=deep)
    findings = report.findings + maintenance.check([Path(o) for o in outputs] or None)
    doc = {"ok": not findings, "deep": deep, "checked": report.checked,
           "findings": [_public(f.to_dict()) for f in findings]}

    def render(d: dict[str, Any]) -> str:
        if d["ok"]:
            c = d["checked"]
            return (f"clean: {c['versions']} versions, {c['model_versions']} MLflow versions, {c['runs']} runs, "
                    f"{c['logged_models']} LoggedModels, {c['prompt_versions']} prompt versions checked"
                    + (", bytes re-hashed" if d["deep"] else ""))
        return "\n".join(f"{f['kind']}: {f['subject']}: {f['detail']}"
                         + (f" (gc: {f['repair']})" if f["repair"] else " (gc cannot repair this)")
                         for f in d["findings"])

    out(doc, render)
    if findings:
        raise Unhealthy(f"doctor found {len(findings)} problem(s)")


@cli.command()
@click.option("--dry-run", is_flag=True, help="Say what would be repaired or removed; change nothing.")
@_outputs_option
@common
def gc(dry_run: bool, outputs: tuple[str, ...]) -> None:
    """Repair what doctor reports as debris; never remove a byte any version, dataset or prompt records.
    Safe to interrupt and to run beside writers. Exit 1 if anything is left that needs a person."""
    from llmops.app import maintenance
    from llmops.registry.repair import gc as repair

    actions, left = repair(_state().store(), dry_run=dry_run)
    actions += maintenance.clean([Path(o) for o in outputs] or None, dry_run=dry_run)
    remaining = [] if dry_run else left.findings + maintenance.check([Path(o) for o in outputs] or None)
    doc = {"dry_run": dry_run, "actions": [a.to_dict() for a in actions],
           "left": [_public(f.to_dict()) for f in remaining]}

    def render(d: dict[str, Any]) -> str:
        lines = []
        for a in d["actions"]:
            state = "would" if d["dry_run"] else ("done" if a["done"] else "FAILED" if a["error"] else "skipped")
            lines.append(f"{state}: {a['kind']}: {a['subject']}: {a['did']}" + (f" ({a['error']})" if a["error"] else ""))
        lines += [f"left: {f['kind']}: {f['subject']}: {f['detail']}" for f in d["left"]]
        return "\n".join(lines) or "nothing to repair"

    out(doc, render)
    if remaining:
        raise Unhealthy(f"gc left {len(remaining)} problem(s) it cannot repair")


def _public(f: dict[str, Any]) -> dict[str, Any]:
    """A finding as --json shows it (the repair's own working data left out)."""
    return {k: f[k] for k in ("kind", "subject", "detail", "repair")}
