"""``llmops sweep SOURCE --to F1,F2,... --on ADDRESS --register NAME``: conversions fanned out
as Ray tasks, each registered (with its lineage) as it finishes, every result benchmarked on
every target, one table and one trade-off plot per target; then, per target, the pick that
meets every ``--select`` constraint and is best ``--by`` a figure, optionally promoted to
``ALIAS-<target>`` through the same gated, audited path as ``llmops promote``.

A conversion that fails does not stop the others; the summary names it. The conversions write
into a folder every node sees (the store's, by default, for nodes on the store's host or
sharing its filesystem); the driver registers from there and removes what it registered.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmops.app.fleet.driver import Job, artifact_spec, input_spec, run_bench_jobs
from llmops.app.fleet.labels import SLOT
from llmops.core.errors import UsageError
from llmops.core.progress import Reporter, as_reporter

# figures where more is better; every other figure (ppl, kld, sizes, times, memory) is better smaller
HIGHER_IS_BETTER = frozenset({"decode_tps", "prefill_tps", "top1"})
MIN_CONVERT_MEMORY = 512 << 20


@dataclass
class SweepOptions:
    source: str
    formats: list[str]
    name: str
    address: str | None = None
    targets: list[str] | None = None
    all_targets: bool = False
    baseline: str | None = None
    metrics: str = "memory,latency,accuracy"
    ctx: int = 512
    chunks: int | None = 16
    runs: int = 3
    decode_tokens: int = 128
    prompt_tokens: int = 512
    eval_text: str | None = None
    select: list[str] = field(default_factory=list)
    by: str | None = None
    promote: str | None = None
    work_dir: str | None = None
    token_file: str | None = None
    verify: bool = True


def _convert_memory(source: dict[str, Any], fmt: str, largest: float) -> int:
    """What a conversion asks Ray for: about three times the source for GPTQ and ONNX (a model in
    torch and its outputs), the source's size for GGUF (streamed), never more than the largest
    node has (a request no node can meet would wait for ever)."""
    from llmops.core.hashing import size_of
    from llmops.registry.artifacts import local_path

    local = local_path(source["uri"])
    size = size_of(local) if local is not None and local.exists() else 0
    need = max(MIN_CONVERT_MEMORY, size * (1 if fmt.startswith("gguf") else 3))
    return int(min(need, largest * 0.9)) if largest else int(need)


def _output_name(fmt: str) -> str:
    return f"{fmt}.gguf" if fmt.startswith("gguf") else fmt


def convert_all(store, o: SweepOptions, src: dict[str, Any], work: Path, text_ref: Any,  # noqa: ANN001
                say: Reporter) -> tuple[list[dict[str, Any]], list[str]]:
    """The conversions as Ray tasks; each registered as it finishes (in the order they finish).
    Returns (a row per format, the failures)."""
    import ray

    from llmops.app.convert_flow import _register_converted
    from llmops.app.fleet.driver import wait_all
    from llmops.app.fleet.jobs import convert_job
    from llmops.converters.base import ArtifactRecord

    largest = max((float(n.get("Resources", {}).get("memory", 0)) for n in ray.nodes() if n.get("Alive")), default=0)
    remote = ray.remote(convert_job)
    jobs = []
    for fmt in o.formats:
        spec = {"source": src, "target": fmt, "output": str(work / _output_name(fmt)), "verify": o.verify}
        j = Job(ref=fmt, target="conversion", spec=spec, label=fmt, key_base="")
        j.ref_obj = remote.options(num_cpus=1, memory=_convert_memory(src, fmt, largest), resources={SLOT: 1},
                                   max_retries=1, retry_exceptions=False, name=f"llmops-convert:{fmt}").remote(spec, text_ref)
        jobs.append(j)
    say.info(f"converting {o.source} to {', '.join(o.formats)} on the fleet")
    wait_all(jobs, say, by_target=False)
    rows, failed = [], []
    for j in jobs:
        if j.error or not j.result:
            failed.append(f"convert {j.ref}: {j.error or 'no result'}")
            rows.append({"format": j.ref, "status": "failed", "error": j.error})
            continue
        fields = dict(j.result["record"])
        fields["output"] = Path(fields["output"])
        record = ArtifactRecord(**{k: v for k, v in fields.items() if k in ArtifactRecord.__dataclass_fields__})
        try:
            reg = _register_converted(store, record, o.name, o.source, j.ref, "cpu", None, None, None, say)
        except Exception as exc:  # noqa: BLE001 - one failed registration does not stop the others
            failed.append(f"register {j.ref}: {' '.join(str(exc).split())[:300]}")
            rows.append({"format": j.ref, "status": "failed", "error": str(exc)})
            continue
        finally:
            _remove(record.output)
        rows.append({"format": j.ref, "status": "ok", "ref": reg["uri"], "version": reg["version"],
                     "host": j.result.get("host"), "seconds": round(j.result["seconds"], 2),
                     "verification": record.verification, "size_bytes": record.size_bytes})
    return rows, failed


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def choose(rows: list[dict[str, Any]], constraints: list[Any], by: str) -> dict[str, Any]:
    """The row that meets every constraint and is best ``by`` (ties: the smaller file), with the
    runner-up and why each other row was left out."""
    from llmops.registry.gates import evaluate

    eligible, excluded = [], {}
    for r in rows:
        if r.get(by) is None:
            excluded[r["ref"]] = f"no {by} recorded on this target"
            continue
        results = evaluate(constraints, {k: v for k, v in r.items() if isinstance(v, (int, float))}, {}, {})
        failing = [f"{g.gate} ({'missing' if g.measured is None else f'{g.measured:.4g}'})"
                   for g in results if not g.passed]
        if failing:
            excluded[r["ref"]] = "fails " + ", ".join(failing)
        else:
            eligible.append(r)
    sign = -1.0 if by in HIGHER_IS_BETTER else 1.0
    ranked = sorted(eligible, key=lambda r: (sign * float(r[by]), float(r.get("file_mb") or 0)))
    return {"by": by, "pick": ranked[0]["ref"] if ranked else None,
            "value": ranked[0][by] if ranked else None,
            "runner_up": ranked[1]["ref"] if len(ranked) > 1 else None,
            "runner_up_value": ranked[1][by] if len(ranked) > 1 else None, "excluded": excluded}


def run_sweep(state, o: SweepOptions, progress: Reporter | None = None) -> dict[str, Any]:  # noqa: ANN001
    from llmops.app.bench_flow import _wanted, run_compare
    from llmops.app.fleet.cluster import choose_targets, connect, fleet
    from llmops.converters.api import parse_target
    from llmops.core.evaltext import load_eval_text
    from llmops.registry.gates import parse_gate
    from llmops.registry.refs import validate_name

    say = as_reporter(progress)
    if not o.formats:
        raise UsageError("--to: name at least one format")
    for f in o.formats:
        parse_target(f)  # an unknown format fails before anything runs
    validate_name(o.name, "model name")
    if (o.select or o.promote) and not o.by:
        raise UsageError("--select and --promote choose by a figure: add --by METRIC (e.g. --by decode_tps)")
    constraints = [parse_gate(c) for c in o.select]
    if o.promote:
        validate_name(o.promote, "alias")
    metrics = _wanted(o.metrics, runs=o.runs, decode_tokens=o.decode_tokens, prompt_tokens=o.prompt_tokens, ctx=o.ctx)
    store = state.store()
    store.open()
    src = input_spec(store, o.source)
    base = input_spec(store, o.baseline) if o.baseline else src
    ev = load_eval_text(o.eval_text, progress=say)
    connect(o.address, o.token_file)
    import ray  # after connect(): Ray reads its authentication settings when imported

    chosen = choose_targets(fleet(), o.targets, o.all_targets)
    work = Path(o.work_dir).resolve() if o.work_dir else store.settings.store_dir / "sweeps" / uuid.uuid4().hex[:12]
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    text_ref = ray.put(ev.text)
    try:
        conversions, failed = convert_all(store, o, src, work, text_ref, say)
    finally:
        if not o.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    refs = [c["ref"] for c in conversions if c["status"] == "ok"]
    options = {"metrics": sorted(metrics), "device": "cpu", "threads": None, "ctx": o.ctx, "chunks": o.chunks,
               "runs": o.runs, "prompt_tokens": o.prompt_tokens, "decode_tokens": o.decode_tokens}
    bench_rows = run_bench_jobs(store, {r: artifact_spec(store, r) for r in refs}, chosen, options, ev=ev,
                                dataset_info=None, base=base, say=say) if refs else []
    failed += [f"bench {r['artifact']} on {r['target']}: {r['error']}" for r in bench_rows if r["status"] == "failed"]
    tables: dict[str, Any] = {}
    plots: dict[str, str | None] = {}
    choices: dict[str, Any] = {}
    promotions: dict[str, Any] = {}
    for t in chosen:
        if not refs:
            break
        plot = None
        if "accuracy" in metrics:
            plot = str(store.settings.store_dir / "plots" / f"{o.name}-tradeoff-{t}.png")
            Path(plot).parent.mkdir(parents=True, exist_ok=True)
        try:
            cmp = run_compare(state, tuple(refs), plot, False, t)
        except UsageError:  # nothing to plot on this target: the table alone
            cmp = run_compare(state, tuple(refs), None, False, t)
        tables[t], plots[t] = cmp["rows"], cmp.get("plot")
        if o.by:
            choices[t] = choose(cmp["rows"], constraints, o.by)
            if o.promote and choices[t]["pick"]:
                promotions[t] = _promote_pick(store, o, choices[t]["pick"], t, constraints)
    return {"source": o.source, "name": o.name, "targets": chosen, "conversions": conversions, "bench": bench_rows,
            "tables": tables, "plots": plots, "choices": choices, "promotions": promotions, "failed_steps": failed,
            "seconds": round(time.time() - t0, 2)}


def _promote_pick(store, o: SweepOptions, ref: str, target: str, constraints: list[Any]) -> dict[str, Any]:  # noqa: ANN001
    from llmops.registry.promotion import promote
    from llmops.registry.versions import resolve_model_version

    mv = resolve_model_version(store, ref)
    r = promote(store, o.name, str(mv.version), alias=f"{o.promote}-{target}", gates=constraints, target=target)
    return {"alias": r.alias, "version": r.version, "verdict": r.verdict, "moved": r.moved,
            "previous_version": r.previous_version}

