"""``llmops node start | stop | list`` and ``llmops sweep``: the benchmark fleet."""

from __future__ import annotations

from typing import Any

import click

from llmops.app.cli.base import _state, cli, common, out
from llmops.app.output import table


@cli.group()
def node() -> None:
    """This host as a benchmark target of a Ray cluster, and the fleet's targets."""


@node.command("start")
@click.option("--target", required=True, help="The target this host is (e.g. edge-avx2, prod-amx, gpu-l4).")
@click.option("--head", is_flag=True, help="Start a new cluster whose head is this host.")
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="The head's port (0: a free one; Ray's usual 6379 is often Redis's).")
@click.option("--address", help="Join the cluster whose head is at HOST:PORT (default $LLMOPS_RAY_ADDRESS, or the "
              "head started on this host).")
@click.option("--node-ip", help="This node's address (default: Ray's choice; several nodes on one host need "
              "distinct loopback addresses such as 127.0.0.11, 127.0.0.12).")
@click.option("--num-cpus", type=click.IntRange(1), help="CPUs Ray may use here (default: all).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="Ray's auth token (default "
              "$LLMOPS_RAY_TOKEN_FILE, else one made with mode 0600 for a new head).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: label the node with its GPU and VRAM.")
@common
def node_start(target: str, head: bool, port: int, address: str | None, node_ip: str | None, num_cpus: int | None,
               token_file: str | None, device: str) -> None:
    """Start (--head) or join (--address) a Ray cluster as benchmark target NAME: labels read off this
    host, one benchmark slot, token authentication, no dashboard."""
    from llmops.app.fleet.nodes import start

    r = start(target, head=head, address=address, port=port, node_ip=node_ip, num_cpus=num_cpus,
              token_file=token_file, device=device)
    doc = {k: r[k] for k in ("address", "target", "head", "pid", "labels", "resources", "token_file", "log")}

    def render(d: dict[str, Any]) -> str:
        what = "started the cluster's head" if d["head"] else f"joined {d['address']}"
        lines = [f"{what} as target {d['target']} (pid {d['pid']})"]
        if d["head"]:
            lines.append(f"address: {d['address']}   (other hosts: llmops node start --target NAME --address "
                         f"{d['address']}; drivers: llmops bench REF --on {d['address']} --target NAME)")
            lines.append(f"token:   {d['token_file']}   (copy it to every host, mode 0600)")
        lines.append("labels:  " + ", ".join(f"{k}={v}" for k, v in d["labels"].items()))
        return "\n".join(lines)

    out(doc, render)


@node.command("stop")
@click.option("--target", help="Only the node(s) of this target (default: every node `node start` started here).")
@common
def node_stop(target: str | None) -> None:
    """Stop what `llmops node start` started on this host (by process id; other Ray processes are left alone)."""
    from llmops.app.fleet.nodes import stop

    stopped = stop(target)
    out({"stopped": stopped}, lambda d: "\n".join(
        f"stopped {'head' if s['head'] else 'node'} of target {s['target']} (pid {s['pid']})" for s in d["stopped"])
        or "no node started here is running")


@node.command("list")
@click.option("--address", help="The cluster (default $LLMOPS_RAY_ADDRESS, or the head started here).")
@click.option("--token-file", type=click.Path(dir_okay=False))
@common
def node_list(address: str | None, token_file: str | None) -> None:
    """The fleet: every target node with its host, labels, and whether it is running a job now."""
    from llmops.app.fleet.cluster import connect, disconnect, fleet

    addr = connect(address, token_file)
    try:
        nodes = [n.to_dict() for n in fleet()]
    finally:
        disconnect()

    def render(d: dict[str, Any]) -> str:
        if not d["nodes"]:
            return f"{d['address']}: no llmops targets"
        rows = [[n["target"], n["host"], n["address"], "busy" if n["busy"] else "free",
                 n["labels"].get("llmops-isa", "-"), n["labels"].get("llmops-cores", "-"),
                 n["labels"].get("llmops-cpu", "-"), n["labels"].get("llmops-gpu", "-"),
                 n["labels"].get("llmops-v-llmops", "-")] for n in d["nodes"]]
        return table(rows, ["TARGET", "HOST", "NODE", "STATE", "ISA", "CORES", "CPU", "GPU", "LLMOPS"])

    out({"address": addr, "nodes": nodes}, render)


@cli.command()
@click.argument("source")
@click.option("--to", "targets_to", required=True, help="Formats, comma-separated (gguf-q4,gguf-q8_0,onnx-int4,...).")
@click.option("--register", "name", required=True, help="Every format becomes a version of this model.")
@click.option("--on", "on", metavar="ADDRESS", help="The Ray cluster (default $LLMOPS_RAY_ADDRESS or the local head).")
@click.option("--targets", help="Benchmark on these targets (comma-separated).")
@click.option("--all-targets", is_flag=True, help="Benchmark on every target.")
@click.option("--baseline", help="Source for KL-divergence and top-1 (models:/...; default: SOURCE once registered).")
@click.option("--metrics", default="memory,latency,accuracy", show_default=True)
@click.option("--ctx", type=int, default=512, show_default=True)
@click.option("--chunks", type=int, default=16, show_default=True)
@click.option("--runs", type=int, default=3, show_default=True)
@click.option("--decode-tokens", type=int, default=128, show_default=True)
@click.option("--prompt-tokens", type=int, default=512, show_default=True)
@click.option("--eval-text", type=click.Path(dir_okay=False))
@click.option("--select", "select", multiple=True, help='A constraint every pick must meet, "METRIC OP VALUE" '
              '(e.g. "kld <= 0.06"; repeatable).')
@click.option("--by", "by", help="Pick, per target, the artifact best by this figure (decode_tps, ppl, file_mb...).")
@click.option("--promote", "promote_alias", help="Move ALIAS-<target> to each target's pick (gated like llmops promote).")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Where conversions write (every node must see it; "
              "default: a folder in the store).")
@click.option("--token-file", type=click.Path(dir_okay=False))
@common
def sweep(source: str, targets_to: str, name: str, on: str | None, targets: str | None, all_targets: bool,
          baseline: str | None, metrics: str, ctx: int, chunks: int, runs: int, decode_tokens: int, prompt_tokens: int,
          eval_text: str | None, select: tuple[str, ...], by: str | None, promote_alias: str | None,
          work_dir: str | None, token_file: str | None) -> None:
    """Convert SOURCE into every --to format as Ray tasks (each registered as a version of NAME with its
    lineage as it finishes), benchmark every one on every target, then (--select/--by) choose per target."""
    from llmops.app.fleet.sweep import SweepOptions, run_sweep

    state = _state()
    opts = SweepOptions(source=source, formats=[t.strip() for t in targets_to.split(",") if t.strip()], name=name,
                        address=on, targets=[t.strip() for t in (targets or "").split(",") if t.strip()] or None,
                        all_targets=all_targets, baseline=baseline, metrics=metrics, ctx=ctx,
                        chunks=None if chunks < 0 else chunks, runs=runs, decode_tokens=decode_tokens,
                        prompt_tokens=prompt_tokens, eval_text=eval_text, select=list(select), by=by,
                        promote=promote_alias, work_dir=work_dir, token_file=token_file)
    r = run_sweep(state, opts, progress=state.reporter())
    out(r, _sweep_text)
    if r.get("failed_steps"):
        from llmops.core.errors import LLMOpsError

        err = LLMOpsError(f"sweep finished with failures: {'; '.join(r['failed_steps'])}")
        err.reported = True  # the --json document above names them too
        raise err


def _sweep_text(d: dict[str, Any]) -> str:
    from llmops.app.cli.convert_cmds import _bench_table

    lines = []
    for c in d["conversions"]:
        lines.append(f"{c['format']}: " + (f"registered {c['ref']} ({c['seconds']} s on {c['host']})"
                                           if c["status"] == "ok" else f"FAILED: {c['error']}"))
    for t, rows in d["tables"].items():
        lines += ["", f"target {t}" + (f"   plot: {d['plots'][t]}" if d["plots"].get(t) else ""),
                  _bench_table(rows, against_first=True)]
        ch = d["choices"].get(t)
        if ch:
            if ch["pick"]:
                lines.append(f"choice for {t}: {ch['pick']} ({ch['by']} {ch['value']:.4g})"
                             + (f", runner-up {ch['runner_up']} ({ch['runner_up_value']:.4g})" if ch["runner_up"] else ""))
            else:
                lines.append(f"choice for {t}: nothing meets every constraint")
            for ref, why in ch["excluded"].items():
                lines.append(f"  left out {ref}: {why}")
        p = d["promotions"].get(t)
        if p:
            lines.append(f"  @{p['alias']}: {p['verdict']}" + (f", now version {p['version']}" if p["moved"] else ""))
    if d["failed_steps"]:
        lines += ["", "failed:"] + [f"  {f}" for f in d["failed_steps"]]
    return "\n".join(lines)
