"""``llmops bench`` and ``llmops bench compare``: measure artifacts, record the results, compare them."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

from llmops.app.output import log
from llmops.app.recording import record_bench
from llmops.core.errors import UsageError
from llmops.core.progress import Reporter, as_reporter, reporting
from llmops.core.settings import env_var
from llmops.registry.versions import run_of


def _eval_text(state, eval_text: str | None, dataset: str | None, say: Reporter):  # noqa: ANN001, ANN202
    from llmops.core.evaltext import load_eval_text

    if dataset:
        from llmops.registry import datasets

        store = state.store()
        info = datasets.show(store, dataset)
        with datasets.local_copy(store, dataset) as p:
            ev = load_eval_text(p)
        return ev, info
    return load_eval_text(eval_text, progress=say), None


def _wanted(metrics: str, *, runs: int, decode_tokens: int, prompt_tokens: int, ctx: int) -> set[str]:
    from llmops.benchmarks.bench import METRICS

    wanted = {m.strip() for m in metrics.split(",") if m.strip()}
    if not wanted or wanted - set(METRICS):
        raise UsageError(f"--metrics takes a comma-separated subset of {','.join(METRICS)}")
    if runs < 1 or decode_tokens < 2 or prompt_tokens < 1 or ctx < 8:
        raise UsageError("--runs, --decode-tokens, --prompt-tokens and --ctx must be positive")
    return wanted


def task_options(tasks: str | None, task_paths: tuple[str, ...], limit: int | None,
                 num_fewshot: int | None) -> Any:  # noqa: ANN401 - llmops.benchmarks.tasks.TaskOptions
    """``--tasks``, ``--task-path``, ``--limit`` and ``--num-fewshot`` as the tasks' options."""
    from llmops.benchmarks.tasks import DEFAULT_TASKS, TaskOptions

    names = tuple(dict.fromkeys(t.strip() for t in (tasks or "").split(",") if t.strip())) or DEFAULT_TASKS
    return TaskOptions(tasks=names, task_paths=tuple(str(p) for p in task_paths), limit=limit, num_fewshot=num_fewshot)


def run_bench_on(state, artifacts: tuple[str, ...], *, on: str | None, targets: list[str] | None,  # noqa: ANN001
                 all_targets: bool, token_file: str | None, device: str, threads: int | None, metrics: str,
                 eval_text: str | None, dataset: str | None, ctx: int, chunks: int | None, baseline: str | None,
                 record: bool, runs: int, decode_tokens: int, prompt_tokens: int,
                 progress: Reporter | None = None) -> dict[str, Any]:
    """``llmops bench --on``: the same benchmark on fleet targets (``llmops.app.fleet``), the eval
    text read here and handed to every job."""
    from llmops.app.fleet.driver import bench_on

    say = as_reporter(progress if progress is not None else log)
    wanted = _wanted(metrics, runs=runs, decode_tokens=decode_tokens, prompt_tokens=prompt_tokens, ctx=ctx)
    if "tasks" in wanted:
        raise UsageError("--metrics tasks runs on this machine only, not on fleet targets (drop --on/--target, "
                         "or the tasks metric)")
    ev, dataset_info = _eval_text(state, eval_text, dataset, say) if wanted & {"latency", "accuracy"} else (None, None)
    return bench_on(state, artifacts, address=on, targets=targets, all_targets=all_targets, device=device,
                    threads=threads, metrics=wanted, ev=ev, dataset_info=dataset_info, ctx=ctx, chunks=chunks,
                    baseline=baseline, record=record, runs=runs, decode_tokens=decode_tokens,
                    prompt_tokens=prompt_tokens, say=say, token_file=token_file)


def run_bench(state, artifacts: tuple[str, ...], *, device: str, threads: int | None, metrics: str,  # noqa: ANN001
              eval_text: str | None, dataset: str | None, ctx: int, chunks: int | None, baseline: str | None,
              record: bool, runs: int, decode_tokens: int, prompt_tokens: int,
              max_memory_mb: int | None = None, progress: Reporter | None = None, tasks: Any = None) -> dict[str, Any]:
    """Benchmark each artifact; ``progress`` is the CLI's reporter (default: every message on
    stderr), which the runner children's phases (windows scored, timed runs) reach too.
    ``tasks``: the options of the ``tasks`` metric (:func:`task_options`; default tasks without)."""
    import os
    import time

    from llmops.benchmarks.jobs import MAX_MEMORY_ENV

    from llmops.benchmarks.bench import BenchOptions, bench_artifact
    from llmops.core.hashing import sha256_path
    from llmops.core.settings import cache_dir
    from llmops.registry.refs import is_ref

    say = as_reporter(progress if progress is not None else log)
    wanted = _wanted(metrics, runs=runs, decode_tokens=decode_tokens, prompt_tokens=prompt_tokens, ctx=ctx)
    for a in (*artifacts, *( [baseline] if baseline else [])):
        if not is_ref(a) and not Path(a).exists():
            raise UsageError(f"{a}: no such file or folder")
    needs_store = record or any(is_ref(a) for a in artifacts) or (baseline and is_ref(baseline)) or dataset
    store = state.store() if needs_store else None
    ev, dataset_info = _eval_text(state, eval_text, dataset, say) if wanted & {"latency", "accuracy"} else (None, None)
    rows = []
    with ExitStack() as stack:
        stack.enter_context(reporting(say))  # the runner children bench_artifact starts relay to it
        if max_memory_mb:
            stack.enter_context(env_var(MAX_MEMORY_ENV, str(max_memory_mb)))  # read by every runner child
        from llmops.registry.artifacts import materialize
        from llmops.registry.versions import resolve_artifact

        def local(a: str) -> Path:
            if is_ref(a):
                return stack.enter_context(materialize(resolve_artifact(store, a).uri, store.settings.tracking_uri))
            return Path(a).resolve()

        base_path = local(baseline) if baseline else None
        base_sha = None  # the baseline's bytes are part of the protocol of KLD, top-1 and the paired task figures
        if record and store is not None and base_path is not None and wanted & {"accuracy", "tasks"}:
            base_sha = resolve_artifact(store, baseline).sha256 if is_ref(baseline) else sha256_path(base_path)
        opts = BenchOptions(metrics=wanted, device=device, threads=threads or os.cpu_count(), text=ev.text if ev else None, ctx=ctx,
                            chunks=chunks, baseline=base_path, runs=runs, prompt_tokens=prompt_tokens,
                            decode_tokens=decode_tokens, cache_dir=cache_dir() / "logits", tasks=tasks)
        for a in artifacts:
            path = local(a)
            t0 = time.time()
            res = bench_artifact(path, opts, progress=say)
            row = {"artifact": a, **res["details"], **res["metrics"]}
            if record and store is not None:
                row.update(record_bench(store, path=path, ref=a if is_ref(a) else None, res=res, ev=ev,
                                         dataset_info=dataset_info, opts=opts, seconds=time.time() - t0,
                                         baseline_sha256=base_sha))
            rows.append(row)
    return {"eval_text": {"sha256": ev.sha256, "source": ev.source} if ev else None, "baseline": baseline, "rows": rows}


def _aliases(store, ref: str) -> list[str]:  # noqa: ANN001 - Store
    """The aliases the version a ``models:/`` reference names holds (the plot marks them)."""
    if not ref.startswith("models:/"):
        return []
    from llmops.registry.versions import resolve_model_version

    mv = resolve_model_version(store, ref)
    # a version found as "latest" comes from a search, which MLflow returns without its aliases
    return sorted(store.mlflow.get_model_version(mv.name, mv.version).aliases or [])


def run_compare(state, refs: tuple[str, ...], plot: str | None, any_hardware: bool,  # noqa: ANN001
                target: str | None = None) -> dict[str, Any]:
    """One table from recorded results: one machine (unless ``any_hardware``) and, per column, one
    protocol (``bench`` results before ``verify``); a cell measured otherwise is left empty. The
    results of fleet ``target``, or those measured where llmops runs."""
    from llmops.registry import results
    from llmops.registry.versions import resolve_artifact, resolve_model_version

    store = state.store()
    arts = [resolve_artifact(store, ref) for ref in refs]
    cmp = results.compare(store, [a.id for a in arts], any_hardware, target)
    rows = []
    for ref, art, rs, left_out in zip(refs, arts, cmp.rows, cmp.left_out):
        m = dict(rs.metrics)
        m.setdefault("file_mb", art.size_bytes / (1024 * 1024))
        row = {"ref": ref, "label": ref.split(":/", 1)[-1], "format": art.format, "quant": art.quant,
               "hardware": rs.hardware_fingerprint, **m, "aliases": _aliases(store, ref)}
        if left_out:
            row["left_out"] = left_out
        rows.append(row)
    base_ppl = rows[0].get("ppl") if rows else None
    for r in rows:
        if r.get("ppl") and base_ppl:
            r["dppl_pct"] = 100.0 * (r["ppl"] / base_ppl - 1.0)
    out: dict[str, Any] = {"hardware": cmp.hardware_fingerprint, "target": target, "rows": rows, "plot": None,
                           "protocols": {m: c.to_dict() for m, c in cmp.columns.items()}}
    if plot:
        from llmops.benchmarks.bench import tradeoff_plot

        plotted = [r for r in rows if r.get("ppl") is not None]
        if not plotted:
            raise UsageError("nothing to plot: no perplexity recorded for these references (run `llmops bench REF`)")
        tradeoff_plot(plotted, plot)
        out["plot"] = str(Path(plot).resolve())
        for r in rows:
            if r["ref"].startswith("models:/"):
                mv = resolve_model_version(store, r["ref"])
                if run_of(mv):
                    store.mlflow.log_artifact(run_of(mv), str(plot), "plots")
    return out
