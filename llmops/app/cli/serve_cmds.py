"""``llmops serve``, ``llmops monitor`` and ``llmops rollback``."""

from __future__ import annotations

from typing import Any

import click

from llmops.app.cli.base import _state, cli, common, out
from llmops.app.output import table
from llmops.core.errors import UsageError


@cli.command()
@click.argument("ref")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless you say otherwise).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(1), help="CPU threads (default: the runtime's own).")
@click.option("--api-key", envvar="LLMOPS_API_KEY", help="Require 'Authorization: Bearer KEY'. Prefer $LLMOPS_API_KEY: "
              "a value on the command line is visible to other users (ps).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Without an API key, requests must name this server by a loopback name or an IP address "
                   "(a DNS-rebinding guard); allow this DNS name too (repeatable).")
@click.option("--ctx", "n_ctx", default=2048, show_default=True, type=click.IntRange(16),
              help="Context of each sequence in tokens: prompt and completion (at most the model's training context).")
@click.option("--parallel", type=click.IntRange(1, 64), metavar="N",
              help="Requests decoded together in one batch (GGUF: continuous batching; ONNX: onnxruntime-genai's "
                   "engine). 1 serves one request at a time. Default: 8 for GGUF (fewer where their KV cache would "
                   "not fit in a quarter of the free memory), 4 for ONNX.")
@click.option("--max-tokens", default=1024, show_default=True, type=click.IntRange(1),
              help="Largest max_tokens a request may ask for (also the default).")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for a free sequence; beyond that 503 with Retry-After.")
@click.option("--max-request-bytes", default="1m", show_default=True, help="Largest request body (1m, 512k, ...).")
@click.option("--poll", "poll_s", default=2.0, show_default=True, type=click.FloatRange(0.05),
              help="Seconds between looks at the alias (models:/NAME@ALIAS).")
@click.option("--trace/--no-trace", default=True, show_default=True,
              help="Write an MLflow trace per request (asynchronously) into the store.")
@click.option("--grace", "grace_s", default=10.0, show_default=True, type=click.FloatRange(0, 3600),
              help="Seconds a stop (SIGTERM, Ctrl-C) gives running requests and then the traces still queued; "
                   "what is left is cut, and counted. A second signal stops at once.")
@common
def serve(ref: str, host: str, port: int, device: str, threads: int | None, api_key: str | None,
          allowed_hosts: tuple[str, ...], n_ctx: int, parallel: int | None,
          max_tokens: int, max_queue: int, max_request_bytes: str, poll_s: float, trace: bool, grace_s: float) -> None:
    """Serve REF behind an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models,
    /health, /metrics; /tokenize, /detokenize and /tokenizer_info for evaluation harnesses).

    REF is models:/NAME@ALIAS (follows the alias: a moved alias is verified, loaded, probed and
    switched to without dropping a request), models:/NAME/VERSION (pinned) or a GGUF file or
    ONNX folder. A registered version's bytes are checked against its sha256 before loading."""
    from llmops.app.serving.run import parse_size
    from llmops.app.serving.run import serve as run_server

    state = _state()
    code = run_server(state.store, ref, host=host, port=port, device=device, threads=threads, api_key=api_key,
                      allowed_hosts=allowed_hosts,
                      n_ctx=n_ctx, parallel=parallel, max_tokens=max_tokens, max_queue=max_queue,
                      max_body_bytes=parse_size(max_request_bytes), poll_s=poll_s, trace=trace, grace_s=grace_s,
                      json_mode=state.json)
    if code:
        raise SystemExit(code)


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _clock(iso: str) -> str:
    return iso[11:23] if len(iso) >= 23 else iso


@cli.command()
@click.argument("name")
@click.option("--alias", default="production", show_default=True, help="Requests served through this alias.")
@click.option("--all", "all_", is_flag=True, help="Every request of NAME, whatever alias (or pinned version) served it.")
@click.option("--since", default="1h", show_default=True, help="A span back from now (30m, 1h, 2d) or an ISO time.")
@common
def monitor(name: str, alias: str, all_: bool, since: str) -> None:
    """Per-version requests, error rate, latency and time to first token (p50/p95), the wait for a
    sequence slot (p95), tokens/s, from the MLflow traces `llmops serve` wrote; the phases (which
    version served when) and the swaps."""
    from llmops.registry.traces import report

    r = report(_state().store(), name, alias=None if all_ else alias, since=since)

    def render(d: dict[str, Any]) -> str:
        where = f"models:/{d['model']}" + ("" if d["alias"] is None else f"@{d['alias']}")
        if not d["requests"] and not d["swaps"]:
            return f"{where}: no requests since {d['since']}"
        lines = [f"{where}: {d['requests']} requests since {d['since']}", ""]
        rows = [[v["version"], v["requests"], v["errors"], f"{100 * v['error_rate']:.2f}", _fmt(v["p50_latency_ms"]),
                 _fmt(v["p95_latency_ms"]), _fmt(v["p50_ttft_ms"]), _fmt(v["p95_ttft_ms"]), _fmt(v.get("p95_queue_ms")),
                 _fmt(v["tokens_per_s"]), v["cancelled"], v["rejected"]] for v in d["versions"]]
        if rows:
            lines.append(table(rows, ["VERSION", "REQUESTS", "ERRORS", "ERROR %", "P50 MS", "P95 MS", "P50 TTFT",
                                      "P95 TTFT", "P95 QUEUE", "TOK/S", "CANCELLED", "REJECTED"]))
        if d["phases"]:
            lines += ["", "phases: " + " → ".join(
                f"v{p['version']} ({_clock(p['start'])}–{_clock(p['end'])}, {p['requests']})" for p in d["phases"])]
        if d["swaps"]:
            lines.append("swaps:  " + "; ".join(
                f"{_clock(s['time'])} {s['from_version'] or '-'}→{s['to_version']} "
                + ("ok" if s["status"] == "ok" else f"FAILED ({s['error']})") for s in d["swaps"]))
        return "\n".join(lines)

    out(r.to_dict(), render)


@cli.command()
@click.argument("name")
@click.option("--alias", default="production", show_default=True, help="The alias to move back.")
@click.option("--reason", help="Why, for the audit trail (required).")
@click.option("--dry-run", is_flag=True, help="Say where the alias would go; change nothing.")
@common
def rollback(name: str, alias: str, reason: str | None, dry_run: bool) -> None:
    """Move ALIAS of NAME back to its previous holder, by the audit trail; audited itself. A server
    following the alias switches back on its next poll."""
    from llmops.registry.rollback import rollback as do_rollback

    if not reason or not reason.strip():
        raise UsageError("rollback needs --reason TEXT (it goes into the audit trail)")
    r = do_rollback(_state().store(), name, alias=alias, reason=reason, dry_run=dry_run)
    out(r.to_dict(), lambda d: (f"{'would move' if d['dry_run'] else 'moved'} models:/{d['model']}@{d['alias']} "
                                f"from version {d['from_version']} back to {d['to_version']}"
                                + ("" if d["dry_run"] else f" (audit #{d['audit_id']})")))
