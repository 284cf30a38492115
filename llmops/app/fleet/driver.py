"""``llmops bench REF... --on ADDRESS --target NAME[,...] | --all-targets``: one Ray task per
artifact and target, scheduled onto a node of the target with a free benchmark slot; the
results come back small and the driver alone records them.

What Ray does, Ray does: placement (by the target's resource and the slot), the retry of a
job whose node died (``max_retries=1``: on another node of the target if there is one), the
cancellation of every job on Ctrl-C. What is written here: which jobs, the check that a
target exists before anything waits on it (a task no node can take stays pending for ever),
the progress lines per target, and recording each result once, keyed by its job.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from llmops.app.fleet.labels import MARK, SLOT, hardware_mismatch, target_resource
from llmops.core.errors import UsageError
from llmops.core.progress import Reporter

POLL_S = 0.5
STATUS_EVERY_S = 15.0
LIVENESS_S = 2.0  # how often the driver looks for targets that lost their last node


def without_credentials(uri: str | None) -> str | None:
    """A tracking URI a worker may be given: no user info, no query (tokens live there)."""
    if not uri or "://" not in uri:
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class Job:
    ref: str
    target: str
    spec: dict[str, Any]
    label: str
    key_base: str
    ref_obj: Any = None  # the Ray ObjectRef
    started: float = field(default_factory=time.monotonic)
    result: dict[str, Any] | None = None
    error: str | None = None


def job_key(key_base: str, node: str) -> str:
    """A job's results are recorded once: the key is the job (this invocation, the artifact's
    bytes, the target, the protocol's options) and the node that measured it."""
    return hashlib.sha256(f"{key_base}|{node}".encode()).hexdigest()


def artifact_spec(store, ref: str) -> dict[str, Any]:  # noqa: ANN001 - Store
    """What a worker needs to fetch and check a registered artifact's bytes."""
    from llmops.registry.refs import is_ref
    from llmops.registry.versions import resolve_artifact

    if not is_ref(ref):
        raise UsageError(f"{ref}: a fleet benchmarks registered versions (models:/NAME/VERSION), whose bytes "
                         "every target can fetch from the store: register it first (llmops models register)")
    art = resolve_artifact(store, ref)
    return {"uri": art.uri, "sha256": art.sha256, "label": ref,
            "tracking_uri": without_credentials(store.settings.tracking_uri)}


def input_spec(store, source: str) -> dict[str, Any]:  # noqa: ANN001 - Store
    """A source or baseline the workers fetch like any artifact: a registered version, or a path
    every node sees (a shared filesystem), checked against the sha256 read here."""
    from pathlib import Path

    from llmops.core.hashing import sha256_path
    from llmops.registry.refs import is_ref

    if is_ref(source):
        return artifact_spec(store, source)
    path = Path(source).resolve()
    if not path.exists():
        raise UsageError(f"{source}: no such file or folder")
    return {"uri": path.as_uri(), "sha256": sha256_path(path), "label": str(path), "tracking_uri": None}


def submit(jobs: list[Job], text_ref: Any) -> None:
    import ray

    from llmops.app.fleet.jobs import bench_job

    remote = ray.remote(bench_job)
    for j in jobs:
        j.ref_obj = remote.options(
            num_cpus=0, resources={SLOT: 1, target_resource(j.target): MARK}, max_retries=1,
            retry_exceptions=False, name=f"llmops-bench:{j.target}:{j.label}").remote(j.spec, text_ref)
        j.started = time.monotonic()


def wait_all(jobs: list[Job], say: Reporter, by_target: bool = True) -> None:
    """Wait for every job, saying per target what finished and, now and then, what still runs;
    Ctrl-C (or SIGTERM) cancels every job still on the cluster, their runner children too.

    A job whose target has no node left (its only node died: Ray's retry would wait for one
    for ever) is cancelled and failed in one line. ``by_target`` off: jobs that any node may run."""
    import ray

    pending = {j.ref_obj: j for j in jobs}
    last_status = last_check = time.monotonic()
    try:
        with say.phase("fleet jobs", total=len(jobs), unit="job") as bar:
            while pending:
                if time.monotonic() - last_check > LIVENESS_S:
                    last_check = time.monotonic()
                    for ref, j in list(pending.items()):
                        if _orphaned(j, by_target):
                            pending.pop(ref)
                            _cancel(ref)
                            j.error = (f"no node of target {j.target} is left in the cluster (its node died mid-job)"
                                       if by_target else "no node is left in the cluster")
                            say.info(f"{j.target}: {j.ref} FAILED: {j.error}")
                            bar.advance()
                done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                for ref in done:
                    j = pending.pop(ref)
                    try:
                        j.result = ray.get(ref)
                        j.error = j.result.get("error")
                    except Exception as exc:  # noqa: BLE001 - NodeDiedError after its retry, a worker crash
                        j.error = _ray_error(exc)
                    secs = time.monotonic() - j.started
                    say.info(f"{j.target}: {j.ref} {'FAILED: ' + j.error if j.error else 'done'} ({secs:.1f} s)")
                    bar.advance()
                if pending and time.monotonic() - last_status > STATUS_EVERY_S:
                    last_status = time.monotonic()
                    running = sorted({f"{j.target} ({time.monotonic() - j.started:.0f} s)" for j in pending.values()})
                    say.info(f"running: {', '.join(running)}")
    except KeyboardInterrupt:
        for ref in pending:
            _cancel(ref)
        raise


def _cancel(ref: Any) -> None:
    import ray

    try:
        ray.cancel(ref, force=True)
    except Exception:  # noqa: BLE001, S110 - finished meanwhile
        pass


_ALIVE: dict[str, Any] = {}


def _orphaned(j: Job, by_target: bool) -> bool:
    """Whether no alive node could run ``j`` any more (read once per liveness round)."""
    from llmops.app.fleet.cluster import fleet

    now = time.monotonic()
    if now - _ALIVE.get("at", 0.0) > LIVENESS_S / 2:
        nodes = fleet()
        _ALIVE.update(at=now, targets={n.target for n in nodes}, any=bool(nodes))
    return j.target not in _ALIVE["targets"] if by_target else not _ALIVE["any"]


def _ray_error(exc: BaseException) -> str:
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    if "NodeDied" in name or "node it was running on is dead" in text:
        return "its node died, and no other node of the target finished it (Ray retried it once)"
    return f"{name}: {text[:300]}"


def bench_on(state, refs: tuple[str, ...], *, address: str | None, targets: list[str] | None,  # noqa: ANN001, PLR0913
             all_targets: bool, device: str, threads: int | None, metrics: set[str], ev, dataset_info,  # noqa: ANN001
             ctx: int, chunks: int | None, baseline: str | None, record: bool, runs: int, decode_tokens: int,
             prompt_tokens: int, say: Reporter, token_file: str | None = None) -> dict[str, Any]:
    """Benchmark registered ``refs`` on the chosen targets; record each result (unless
    ``record`` is off) with the target, the node and its measured hardware."""
    from llmops.app.fleet.cluster import choose_targets, connect, fleet

    store = state.store()
    arts = {r: artifact_spec(store, r) for r in refs}
    base = input_spec(store, baseline) if baseline else None
    connect(address, token_file)
    chosen = choose_targets(fleet(), targets, all_targets)
    options = {"metrics": sorted(metrics), "device": device, "threads": threads, "ctx": ctx, "chunks": chunks,
               "runs": runs, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens}
    rows = run_bench_jobs(store, arts, chosen, options, ev=ev, dataset_info=dataset_info, base=base, say=say,
                          record=record)
    return {"targets": chosen, "rows": rows, "failed": sum(r["status"] == "failed" for r in rows),
            "eval_text": {"sha256": ev.sha256, "source": ev.source} if ev else None, "baseline": baseline}


def run_bench_jobs(store, arts: dict[str, dict[str, Any]], chosen: list[str], options: dict[str, Any], *,  # noqa: ANN001
                   ev, dataset_info, base: dict[str, Any] | None, say: Reporter, record: bool = True,  # noqa: ANN001
                   ) -> list[dict[str, Any]]:
    """Every artifact on every chosen target, one job each; a row per job (``status`` ok or
    failed), each result recorded once with its target, node and the hardware it measured."""
    import ray

    from llmops.app.fleet.cluster import fleet
    from llmops.benchmarks.bench import BenchOptions
    from llmops.core.hashing import sha256_text

    invocation = uuid.uuid4().hex
    text_ref = ray.put(ev.text) if ev is not None else None
    protocol = sha256_text(repr(sorted(options.items())))
    jobs = [Job(ref=r, target=t, label=r.split(":/", 1)[-1], key_base=f"{invocation}|{spec['sha256']}|{t}|{protocol}",
                spec={**options, "artifact": spec, "baseline": base})
            for r, spec in arts.items() for t in chosen]
    say.info(f"{len(jobs)} benchmark job(s) on {', '.join(chosen)}")
    submit(jobs, text_ref)
    wait_all(jobs, say)
    metrics = set(options["metrics"])
    base_sha = base["sha256"] if base and "accuracy" in metrics else None
    nodes = {n.node_id: n for n in fleet()}
    rows = []
    for j in jobs:
        row: dict[str, Any] = {"artifact": j.ref, "target": j.target}
        if j.error or not j.result:
            row.update(status="failed", error=j.error or "no result")
            rows.append(row)
            continue
        res = j.result
        node = nodes.get(res.get("node_id") or "")
        node_name = node.name if node else f"{res.get('host')}:{(res.get('node_id') or '')[:8]}"
        mismatch = hardware_mismatch(node.labels, res["hardware"]) if node else []
        row.update({**res["details"], **res["metrics"]})
        row.update(status="ok", node=node_name, host=res.get("host"), seconds=round(res["seconds"], 2))
        if mismatch:
            row["hardware_mismatch"] = mismatch
            say.warn(f"{j.target}: node {node_name} measured {'; '.join(mismatch)}")
        if record:
            from llmops.app.recording import record_bench

            opts = BenchOptions(metrics=metrics, device=options["device"], threads=res["threads"], ctx=options["ctx"],
                                chunks=options["chunks"], runs=options["runs"], prompt_tokens=options["prompt_tokens"],
                                decode_tokens=options["decode_tokens"])
            rec = record_bench(store, path=None, ref=j.ref, res={"metrics": res["metrics"], "details": res["details"]},
                               ev=ev, dataset_info=dataset_info, opts=opts, seconds=res["seconds"],
                               baseline_sha256=base_sha, hardware=res["hardware"], target=j.target, node=node_name,
                               job_key=job_key(j.key_base, node_name))
            row["hardware"] = rec.get("hardware")
        rows.append(row)
    return rows
