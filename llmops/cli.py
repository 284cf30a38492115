"""The ``llmops`` command line: thin commands over the library.

Only click is imported at start-up; every command imports what it needs
(torch, transformers, mlflow) inside its body, so ``llmops --help`` is instant.
Errors become one line on stderr (and ``{"error": ...}`` on stdout with
--json) and a non-zero exit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click

from llmops import __version__
from llmops.errors import LLMOpsError, NotAvailable, UsageError
from llmops.output import emit, log, table

NOT_YET = "is not available in this version of llmops"


class State:
    def __init__(self) -> None:
        self.json = False
        self.store_dir: str | None = None

    def store(self):  # noqa: ANN201 - llmops.registry.store.Store, imported lazily
        from llmops.config import resolve
        from llmops.registry.store import Store

        return Store(resolve(self.store_dir))


def _state() -> State:
    ctx = click.get_current_context()
    obj = ctx.find_object(State)
    if obj is None:
        obj = ctx.ensure_object(State)
    return obj


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(State).json = True


def _set_store(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(State).store_dir = value


def common(f: Callable[..., Any]) -> Callable[..., Any]:
    """--json and --store after the command too (`llmops models show REF --json`)."""
    f = click.option("--json", "json_", is_flag=True, expose_value=False, is_eager=True, callback=_set_json,
                     help="Print one JSON document on stdout.")(f)
    f = click.option("--store", type=click.Path(file_okay=False), expose_value=False, callback=_set_store,
                     help="Store folder (default $LLMOPS_STORE or ./.llmops).")(f)
    return f


def out(data: Any, render: Callable[[Any], str] | None = None) -> None:
    emit(_state().json, data, render)


class DefaultGroup(click.Group):
    """A group whose first argument may be an argument of its default command
    (``llmops bench ARTIFACT...`` beside ``llmops bench compare REF...``)."""

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "ARTIFACT... [OPTIONS] | compare REF... [OPTIONS]")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--json", "json_", is_flag=True, expose_value=False, is_eager=True, callback=_set_json,
              help="Print one JSON document on stdout (logs stay on stderr).")
@click.option("--store", type=click.Path(file_okay=False), expose_value=False, callback=_set_store,
              help="Store folder (default $LLMOPS_STORE or ./.llmops).")
@click.version_option(__version__, prog_name="llmops")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Convert checkpoints to GGUF, GPTQ and ONNX, benchmark them, and version them in an MLflow registry
    with lineage in SQL."""
    ctx.ensure_object(State)


# -- convert ----------------------------------------------------------------------
@cli.command()
@click.argument("source")
@click.option("--to", "target", required=True, help="gguf-f32|f16|bf16|q8_0|q4_0|q4_k_m|q5_k_m|q6_k, gguf-q4, "
              "gptq-4bit|8bit, onnx|onnx-fp16|onnx-int8|onnx-int4")
@click.option("-o", "--output", type=click.Path(), help="Output file or folder.")
@click.option("--register", "register_name", help="Register the output as a new version of this model.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Compare against the source on eval text.")
@click.option("--calibration", help="Calibration data (GPTQ): datasets:/NAME/VERSION or a text file "
              "(default: a part of the eval text that evaluation never reads).")
@click.option("--calibration-samples", type=click.IntRange(1), help="GPTQ calibration samples (default 32).")
@click.option("--calibration-tokens", type=click.IntRange(8), help="Tokens per calibration sample (default 256).")
@click.option("--group-size", type=click.IntRange(-1), help="GPTQ group size (default 128; the largest valid one "
              "when the layer width is not a multiple).")
@click.option("--act-order", is_flag=True, default=None, help="GPTQ: quantize columns in order of activation size.")
@click.option("--sym/--asym", default=None, help="GPTQ: symmetric (default) or asymmetric quantization.")
@click.option("--damp", type=click.FloatRange(0, 1, min_open=True), help="GPTQ dampening fraction.")
@click.option("--block-size", type=click.IntRange(16), help="onnx-int4/onnx-int8 block size (default 32).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(1), help="CPU threads (default: all).")
@click.option("--eval-text", type=click.Path(dir_okay=False), help="Eval text for --verify (default $LLMOPS_EVAL_TEXT).")
@click.option("--allow-nonfinite", is_flag=True, help="Convert weights that contain NaN or Inf.")
@common
def convert(source: str, target: str, output: str | None, register_name: str | None, verify: bool,
            calibration: str | None, device: str, threads: int | None, eval_text: str | None, allow_nonfinite: bool,
            **options: Any) -> None:
    """Convert SOURCE (a checkpoint folder or file, or models:/NAME/VERSION) to TARGET."""
    from llmops.workflows import run_convert

    out(run_convert(_state(), source=source, target=target, output=output, register_name=register_name,
                    verify=verify, calibration=calibration, device=device, eval_text=eval_text, threads=threads,
                    allow_nonfinite=allow_nonfinite, options=options), _render_convert)


def _render_convert(d: dict[str, Any]) -> str:
    lines = [f"wrote {d['output']} ({d['format']} {d['quant']}, {d['size_bytes'] / 1e6:.1f} MB, {d['seconds']:.1f} s)"]
    v = d.get("verification")
    if v:
        lines.append(f"verify: KLD {v['kld']:.5f}, top-1 {v['top1_agreement']:.4f}, "
                     f"PPL {v['ppl_source']:.3f} -> {v['ppl_output']:.3f}")
    if d.get("registered"):
        lines.append(f"registered {d['registered']['uri']}")
    return "\n".join(lines)


# -- bench --------------------------------------------------------------------------
@cli.group(cls=DefaultGroup)
def bench() -> None:
    """Benchmark artifacts (memory, latency, accuracy), or compare recorded results."""


@bench.command("run", hidden=True)
@click.argument("artifacts", nargs=-1, required=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, help="CPU threads (default: all available).")
@click.option("--metrics", default="memory,latency,accuracy", show_default=True)
@click.option("--eval-text", type=click.Path(dir_okay=False), help="Eval text (default $LLMOPS_EVAL_TEXT, else wikitext-2).")
@click.option("--dataset", help="Eval text from the registry: datasets:/NAME/VERSION.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Perplexity context.")
@click.option("--chunks", type=int, default=16, show_default=True, help="Perplexity chunks (-1: all).")
@click.option("--baseline", help="Source model for KL-divergence and top-1 agreement (path or models:/...).")
@click.option("--record/--no-record", default=True, show_default=True, help="Store results in the registry.")
@click.option("--runs", type=int, default=3, show_default=True, help="Timed runs after a warm-up (medians reported).")
@click.option("--decode-tokens", type=int, default=128, show_default=True)
@click.option("--prompt-tokens", type=int, default=512, show_default=True)
@click.option("--max-memory", type=click.IntRange(1), help="Cap the memory each runner process may allocate "
              "for the model (MiB); past it the runner fails cleanly instead of taking the machine down.")
@common
def bench_run(artifacts: tuple[str, ...], device: str, threads: int | None, metrics: str, eval_text: str | None,
              dataset: str | None, ctx: int, chunks: int, baseline: str | None, record: bool, runs: int,
              decode_tokens: int, prompt_tokens: int, max_memory: int | None) -> None:
    """Benchmark ARTIFACT... (files, folders or models:/ references) on this machine."""
    from llmops.workflows import run_bench

    r = run_bench(_state(), artifacts, device=device, threads=threads, metrics=metrics, eval_text=eval_text,
                  dataset=dataset, ctx=ctx, chunks=None if chunks < 0 else chunks, baseline=baseline, record=record,
                  runs=runs, decode_tokens=decode_tokens, prompt_tokens=prompt_tokens, max_memory_mb=max_memory)
    out(r, lambda d: _bench_table(d["rows"]))


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or v != v else format(v, spec)


def _bench_table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        dppl = (100.0 * (r["ppl"] / r["ppl_baseline"] - 1.0)) if r.get("ppl") and r.get("ppl_baseline") else r.get("dppl_pct")
        body.append([r.get("artifact") or r.get("label"), r.get("format"), r.get("quant"), _fmt(r.get("file_mb"), ".1f"),
                     _fmt(r.get("bits_per_weight"), ".2f"), _fmt(r.get("ppl"), ".3f"), _fmt(dppl, "+.2f"),
                     _fmt(r.get("kld"), ".5f"), _fmt(r.get("top1"), ".4f"), _fmt(r.get("prefill_tps"), ".1f"),
                     _fmt(r.get("decode_tps"), ".1f"), _fmt(r.get("ttft_ms"), ".0f"), _fmt(r.get("peak_rss_mb"), ".0f")])
    return table(body, ["ARTIFACT", "FORMAT", "QUANT", "MiB", "BPW", "PPL", "dPPL%", "KLD", "TOP1", "PREFILL t/s",
                        "DECODE t/s", "TTFT ms", "RSS MiB"])


@bench.command("compare")
@click.argument("refs", nargs=-1, required=True)
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the size/accuracy/speed plot (PNG) here.")
@click.option("--any-hardware", is_flag=True, help="Compare results from different machines too.")
@common
def bench_compare(refs: tuple[str, ...], plot: str | None, any_hardware: bool) -> None:
    """One table across formats from recorded results (dPPL% against the first REF), and a Pareto plot."""
    from llmops.workflows import run_compare

    r = run_compare(_state(), refs, plot, any_hardware)
    out(r, lambda d: _bench_table(d["rows"]) + (f"\nplot: {d['plot']}" if d["plot"] else ""))


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
@common
def models_register(path: str, name: str, from_: tuple[str, ...], tags: tuple[str, ...]) -> None:
    """Register PATH (a file or folder) as a new version of model NAME."""
    from llmops.artifact_info import describe
    from llmops.registry.refs import validate_name
    from llmops.registry.versions import ParentSpec, register

    validate_name(name, "model name")
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or folder")
    info = describe(path)
    log(f"registering {path} as {name} ({info.format}{' ' + info.quant if info.quant else ''})")
    v = register(_state().store(), path, name, fmt=info.format, quant=info.quant,
                 bits_per_weight=info.bits_per_weight, tags=_parse_tags(tags),
                 parents=[ParentSpec(f) for f in from_], command="register")
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
@click.option("--stage", help="Also set this (deprecated) MLflow stage, for old tooling.")
@click.option("--dry-run", is_flag=True, help="Evaluate the gates; change nothing.")
@click.option("--force", is_flag=True, help="Move the alias even if a gate fails (needs --reason).")
@click.option("--reason", help="Why, for the audit trail.")
@common
def promote(name: str, version: str, alias: str, gates: tuple[str, ...], prompt: str | None, hardware: str | None,
            stage: str | None, dry_run: bool, force: bool, reason: str | None) -> None:
    """Move alias --to onto NAME VERSION when every gate passes (exit 1 and nothing moves otherwise)."""
    from llmops.errors import GateFailed
    from llmops.registry.gates import parse_gate
    from llmops.registry.promotion import promote as do_promote

    parsed = [parse_gate(g) for g in gates]
    if force and not reason:
        raise UsageError("--force needs --reason TEXT (it goes into the audit trail)")
    r = do_promote(_state().store(), name, version, alias=alias, gates=parsed, prompt=prompt, hardware=hardware,
                   stage=stage, dry_run=dry_run, force=force, reason=reason).to_dict()

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


# -- ui / db / fixtures -------------------------------------------------------------------
@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless you say otherwise).")
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--serve-artifacts", is_flag=True, help="Be the shared tracking server: clients upload and download "
              "artifacts through it (use with a PostgreSQL LLMOPS_DATABASE_URL).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Server worker processes.")
@common
def ui(host: str, port: int, serve_artifacts: bool, workers: int) -> None:
    """Serve the MLflow UI on this store (or, with --serve-artifacts, a shared tracking server)."""
    from llmops.server import serve

    state = _state()
    raise SystemExit(serve(state.store(), host=host, port=port, json_mode=state.json,
                           serve_artifacts=serve_artifacts, workers=workers))


@cli.group("db")
def db_group() -> None:
    """The llmops tables' migrations."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@common
def db_upgrade(revision: str) -> None:
    """Create or migrate the store's tables (MLflow's and llmops')."""
    from llmops.registry import db

    store = _state().store()
    store.open()
    rev = db.upgrade(store.engine, revision)
    out({**store.describe(), "revision": rev, "head": db.head_revision()}, lambda d: f"llmops tables at revision {d['revision']}")


@db_group.command("current")
@common
def db_current() -> None:
    """Print the llmops tables' revision."""
    from llmops.registry import db

    store = _state().store()
    store.open()
    rev = db.current_revision(store.engine)
    out({**store.describe(), "revision": rev, "head": db.head_revision()},
        lambda d: f"{d['revision']}{' (head)' if d['revision'] == d['head'] else ''}")


@cli.group()
def fixtures() -> None:
    """Build the models the tests and the demo use."""


@fixtures.command("smollm2")
@click.argument("dest", required=False, type=click.Path(file_okay=False))
@common
def fixtures_smollm2(dest: str | None) -> None:
    """SmolLM2-135M-Instruct as an fp32 Hugging Face checkpoint (cached)."""
    from llmops.fixtures import smollm2_checkpoint

    path = smollm2_checkpoint(dest, progress=log)
    out({"path": str(path)}, lambda d: d["path"])


@fixtures.command("tiny")
@click.argument("arch")
@click.argument("dest", type=click.Path(file_okay=False))
@common
def fixtures_tiny(arch: str, dest: str) -> None:
    """A tiny random-weight model (llama, qwen2, qwen3, gemma2, phi3, gpt2) for quick trials."""
    from llmops.tiny_models import ARCHITECTURES, tiny_model

    if arch not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    out({"path": str(tiny_model(arch, dest))}, lambda d: d["path"])


# -- entry point ----------------------------------------------------------------------------
def _fail(message: str, code: int, json_mode: bool) -> int:
    message = " ".join(message.split())
    if json_mode:
        emit(True, {"error": message})
    log(f"error: {message}")
    return code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    json_mode = "--json" in args
    try:
        cli.main(args=args, prog_name="llmops", standalone_mode=False)
        return 0
    except LLMOpsError as exc:
        return _fail(str(exc), exc.exit_code, json_mode and not exc.reported)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code, json_mode)
    except click.exceptions.Abort:
        return _fail("interrupted", 130, json_mode)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, json_mode)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one line, not a traceback
        if os.environ.get("LLMOPS_DEBUG"):
            raise
        return _fail(f"{type(exc).__name__}: {exc} (set LLMOPS_DEBUG=1 for a traceback)", 1, json_mode)


if __name__ == "__main__":
    sys.exit(main())
