"""Registry commands: models, prompts, datasets, lineage, verify, promote, promotions."""

from __future__ import annotations

import os
from typing import Any

import click

from llmops.app.cli.base import _state, cli, common, out
from llmops.app.output import emit, log, table
from llmops.core.errors import UsageError


# -- models -------------------------------------------------------------------------
@cli.group()
def models() -> None:
    """Registered models and their versions."""


def _parse_tags(tags: tuple[str, ...]) -> dict[str, str]:
    result = {}
    for t in tags:
        if "=" not in t:
            raise UsageError(f"--tag {t!r}: expected KEY=VALUE")
        k, v = t.split("=", 1)
        result[k.strip()] = v
    return result


@models.command("register")
@click.argument("path", type=click.Path(exists=False))
@click.option("--name", required=True, help="Registered model name.")
@click.option("--from", "from_", multiple=True, help="What it was made from: a path or models:/NAME/VERSION.")
@click.option("--tag", "tags", multiple=True, help="KEY=VALUE tag on the version (repeatable).")
@click.option("--link", is_flag=True,
              help="Hard-link the bytes into a local store instead of copying them (same filesystem; a "
                   "copy otherwise): one read, no second copy on disk. The store then shares the file: "
                   "rewrite it under a new name, never in place, or `llmops verify` reports the version "
                   "changed.")
@common
def models_register(path: str, name: str, from_: tuple[str, ...], tags: tuple[str, ...], link: bool) -> None:
    """Register PATH (a file or folder) as a new version of model NAME."""
    from llmops.core.artifact_info import describe
    from llmops.registry.refs import validate_name
    from llmops.registry.registration import register
    from llmops.registry.versions import ParentSpec

    validate_name(name, "model name")
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or folder")
    info = describe(path)
    log(f"registering {path} as {name} ({info.format}{' ' + info.quant if info.quant else ''})")
    v = register(_state().store(), path, name, fmt=info.format, quant=info.quant,
                 bits_per_weight=info.bits_per_weight, tags=_parse_tags(tags),
                 parents=[ParentSpec(f) for f in from_], command="register", link=link)
    out(v.to_dict(), lambda d: f"registered {d['uri']} (sha256 {d['sha256'][:16]}…, {d['size_bytes']} bytes)")


@models.command("list")
@common
def models_list() -> None:
    """List registered models."""
    from llmops.registry.versions import list_models

    rows = list_models(_state().store())
    out(rows, lambda rs: table(
        [[r["name"], r["versions"], r["latest_version"], r["format"], r["quant"],
          ",".join(f"{k}={v}" for k, v in r["aliases"].items())] for r in rs],
        ["NAME", "VERSIONS", "LATEST", "FORMAT", "QUANT", "ALIASES"]) if rs else "no registered models")


@models.command("show")
@click.argument("ref")
@common
def models_show(ref: str) -> None:
    """Show one version: models:/NAME/VERSION or models:/NAME@ALIAS."""
    from llmops.registry.versions import show

    v = show(_state().store(), ref)

    def render(d: dict[str, Any]) -> str:
        lines = [f"{d['uri']}  (run {d['run_id']})"]
        for k in ("format", "quant", "sha256", "size_bytes", "source", "stored_uri", "created_at"):
            lines.append(f"  {k}: {d.get(k)}")
        lines.append(f"  aliases: {', '.join(d['aliases']) or '-'}")
        lines.append("  tags: " + ", ".join(f"{k}={v}" for k, v in sorted(d["tags"].items())))
        if d["metrics"]:
            lines.append("  metrics: " + ", ".join(f"{k}={v:.6g}" for k, v in sorted(d["metrics"].items())))
        return "\n".join(lines)

    out(v.to_dict(), render)


@models.command("backfill")
@click.option("--dry-run", is_flag=True, help="Say which versions lack a LoggedModel; create nothing.")
@common
def models_backfill(dry_run: bool) -> None:
    """Give every version registered before LoggedModels one (with its recorded results); idempotent."""
    from llmops.registry.logged_models import backfill

    rows = [r.to_dict() for r in backfill(_state().store(), dry_run=dry_run)]

    def render(rs: list[dict[str, Any]]) -> str:
        if not rs:
            return "no registered versions"
        def state(r: dict[str, Any]) -> str:
            if r["error"]:
                return r["error"]
            return ("would create" if dry_run else "created") if r["created"] else "has one"

        body = table([[r["uri"], r["model_id"] or "-", state(r), r["metrics"]] for r in rs],
                     ["VERSION", "LOGGED MODEL", "STATE", "METRICS"])
        made = sum(r["created"] for r in rs)
        return body + f"\n{made} {'to create' if dry_run else 'created'}, {len(rs) - made} already linked"

    out(rows, render)
    if any(r["error"] for r in rows):
        from llmops.core.errors import LLMOpsError

        raise LLMOpsError("some versions got no LoggedModel (see the table)")


# -- prompts / datasets ---------------------------------------------------------------
@cli.group()
def prompts() -> None:
    """Versioned prompt templates (MLflow's prompt registry)."""


@prompts.command("add")
@click.argument("name")
@click.option("--template", help="The template text ({{variable}} placeholders).")
@click.option("--file", "file_", type=click.Path(dir_okay=False), help="Read the template from a file.")
@click.option("-m", "--message", help="Commit message of this version.")
@common
def prompts_add(name: str, template: str | None, file_: str | None, message: str | None) -> None:
    """Add a version of prompt NAME (nothing new when the template is unchanged)."""
    from pathlib import Path

    from llmops.registry import prompts as p

    if (template is None) == (file_ is None):
        raise UsageError("give exactly one of --template TEXT or --file F")
    if file_ is not None:
        if not Path(file_).is_file():
            raise UsageError(f"{file_}: no such file")
        template = Path(file_).read_text(encoding="utf-8")
    info = p.add(_state().store(), name, template or "", message)
    out(info.to_dict(), lambda d: f"{'added' if d['created'] else 'unchanged'} {d['uri']} (sha256 {d['sha256'][:16]}…)")


@prompts.command("list")
@common
def prompts_list() -> None:
    """List prompts."""
    from llmops.registry import prompts as p

    rows = p.list_prompts(_state().store())
    out(rows, lambda rs: table([[r["name"], r["latest_version"], r["message"] or ""] for r in rs],
                               ["NAME", "LATEST", "MESSAGE"]) if rs else "no prompts")


@prompts.command("show")
@click.argument("ref")
@common
def prompts_show(ref: str) -> None:
    """Show prompts:/NAME/VERSION or prompts:/NAME@ALIAS."""
    from llmops.registry import prompts as p

    info = p.show(_state().store(), ref)
    out(info.to_dict(), lambda d: f"{d['uri']}  {d['message'] or ''}\n{d['template']}")


@prompts.command("diff")
@click.argument("name")
@click.argument("v1")
@click.argument("v2")
@common
def prompts_diff(name: str, v1: str, v2: str) -> None:
    """Unified diff between two versions of a prompt."""
    from llmops.registry import prompts as p
    from llmops.registry.refs import parse_ref

    parse_ref(f"prompts:/{name}/{v1}")
    parse_ref(f"prompts:/{name}/{v2}")
    text = p.diff(_state().store(), name, v1, v2)
    out({"name": name, "from": v1, "to": v2, "diff": text}, lambda d: d["diff"] or "(identical)")


@cli.group()
def datasets() -> None:
    """Versioned, content-addressed datasets (eval text, calibration data)."""


@datasets.command("add")
@click.argument("name")
@click.argument("path", type=click.Path())
@click.option("-m", "--message", help="What changed in this version.")
@common
def datasets_add(name: str, path: str, message: str | None) -> None:
    """Add a version of dataset NAME from PATH (nothing new when the content is unchanged)."""
    from llmops.registry import datasets as ds
    from llmops.registry.refs import validate_name

    validate_name(name, "dataset name")
    info = ds.add(_state().store(), name, path, message)
    out(info.to_dict(), lambda d: f"{'added' if d['created'] else 'unchanged'} {d['uri']} "
                                  f"({d['format']}, {d['records']} records, {d['size_bytes']} bytes)")


@datasets.command("list")
@common
def datasets_list() -> None:
    """List datasets."""
    from llmops.registry import datasets as ds

    rows = ds.list_datasets(_state().store())
    out(rows, lambda rs: table([[r["name"], r["latest_version"], r["format"], r["records"], r["size_bytes"],
                                 r["sha256"][:16]] for r in rs],
                               ["NAME", "LATEST", "FORMAT", "RECORDS", "BYTES", "SHA256"]) if rs else "no datasets")


@datasets.command("show")
@click.argument("ref")
@common
def datasets_show(ref: str) -> None:
    """Show datasets:/NAME/VERSION."""
    from llmops.registry import datasets as ds

    info = ds.show(_state().store(), ref)
    out(info.to_dict(), lambda d: "\n".join(f"{k}: {v}" for k, v in d.items() if k != "created"))


# -- lineage / verify -------------------------------------------------------------------
@cli.command()
@click.argument("ref")
@click.option("--up", "direction", flag_value="up", default=True, help="What REF came from (default).")
@click.option("--down", "direction", flag_value="down", help="What was made from REF.")
@click.option("--format", "fmt", type=click.Choice(["tree", "json", "mermaid", "dot"]), default="tree", show_default=True)
@common
def lineage(ref: str, direction: str, fmt: str) -> None:
    """Walk the lineage graph from REF."""
    from llmops.registry import lineage as lin
    from llmops.registry.versions import resolve_artifact

    store = _state().store()
    art = resolve_artifact(store, ref)
    with store.session() as s:
        g = lin.graph(s, art.id, direction)
    if _state().json or fmt == "json":
        emit(True, {"ref": ref, **g.to_dict()})
        return
    text = {"tree": lin.render_tree, "mermaid": lin.render_mermaid, "dot": lin.render_dot}[fmt](g)
    click.echo(text)


@cli.command()
@click.argument("ref")
@common
def verify(ref: str) -> None:
    """Re-hash the stored bytes of REF and compare them with the record (exit 1 on mismatch)."""
    from llmops.registry.versions import VerifyFailed
    from llmops.registry.versions import verify as do_verify

    try:
        result = do_verify(_state().store(), ref)
    except VerifyFailed as exc:
        if _state().json:
            emit(True, {**exc.result, "error": str(exc)})
            exc.reported = True
        raise
    out(result, lambda d: f"ok: {d['ref']} sha256 {d['actual_sha256']}")


# -- promotion ------------------------------------------------------------------------
@cli.command()
@click.argument("name")
@click.argument("version")
@click.option("--to", "alias", default="production", show_default=True, help="The alias to move.")
@click.option("--gate", "gates", multiple=True, help='"METRIC OP VALUE", e.g. "ppl_ratio <= 1.05" (repeatable).')
@click.option("--prompt", help="The prompt version served with the model (prompts:/NAME/VERSION).")
@click.option("--hardware", help="Use results from this hardware fingerprint (prefix); default: the newest.")
@click.option("--target", help="Gate on the results measured on this fleet target (llmops bench --on); "
              "default: those measured on this machine.")
@click.option("--stage", help="Also set this (deprecated) MLflow stage, for old tooling.")
@click.option("--dry-run", is_flag=True, help="Evaluate the gates; change nothing.")
@click.option("--force", is_flag=True, help="Move the alias even if a gate fails (needs --reason).")
@click.option("--reason", help="Why, for the audit trail.")
@common
def promote(name: str, version: str, alias: str, gates: tuple[str, ...], prompt: str | None, hardware: str | None,
            target: str | None, stage: str | None, dry_run: bool, force: bool, reason: str | None) -> None:
    """Move alias --to onto NAME VERSION when every gate passes (exit 1 and nothing moves otherwise)."""
    from llmops.core.errors import GateFailed
    from llmops.registry.gates import parse_gate
    from llmops.registry.promotion import promote as do_promote

    parsed = [parse_gate(g) for g in gates]
    if force and not reason:
        raise UsageError("--force needs --reason TEXT (it goes into the audit trail)")
    r = do_promote(_state().store(), name, version, alias=alias, gates=parsed, prompt=prompt, hardware=hardware,
                   stage=stage, dry_run=dry_run, force=force, reason=reason, target=target).to_dict()

    def render(d: dict[str, Any]) -> str:
        rows = [[g["metric"], "-" if g["measured"] is None else f"{g['measured']:.6g}", f"{g['op']} {g['threshold']:g}",
                 "pass" if g["passed"] else "FAIL", g["note"] or ""] for g in d["gates"]]
        head = table(rows, ["METRIC", "MEASURED", "THRESHOLD", "RESULT", "NOTE"]) if rows else "(no gates)"
        if d["dry_run"]:
            tail = f"dry run: would {'move' if d['verdict'] == 'passed' else 'not move'} @{d['alias']}"
        elif d["moved"]:
            tail = (f"{d['verdict']}: models:/{d['model']}@{d['alias']} -> version {d['version']}"
                    f" (was {d['previous_version'] or 'unset'})")
        else:
            tail = f"failed: @{d['alias']} stays on {d['previous_version'] or 'nothing'}"
        return head + "\n" + tail

    out(r, render)
    if r["verdict"] == "failed":
        raise GateFailed(f"promotion of models:/{name}/{version} to @{alias} failed its gates"
                         + (" (dry run)" if dry_run else ""))


@cli.group()
def promotions() -> None:
    """The promotion audit trail."""


@promotions.command("list")
@click.argument("name")
@common
def promotions_list(name: str) -> None:
    """Every promotion attempt for model NAME, oldest first."""
    from llmops.registry.promotion import audit

    rows = audit(_state().store(), name)
    out(rows, lambda rs: table(
        [[r["id"], str(r["created_at"])[:19], r["version"], r["alias"], r["previous_version"] or "-", r["verdict"],
          r["actor"], "; ".join(f"{g['gate']}={'-' if g['measured'] is None else format(g['measured'], '.4g')}"
                                for g in r["gates"]), r["ci"].get("job_url", "")] for r in rs],
        ["ID", "TIME", "VERSION", "ALIAS", "PREVIOUS", "VERDICT", "ACTOR", "GATES", "CI"]) if rs else f"no promotions of {name}")
