"""Multi-step jobs behind the CLI: convert, then verify, register and record.

The steps themselves live in the converters, the benchmarks and the registry;
this module only orders them and decides what the user sees.
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from llmops.errors import UsageError
from llmops.registry.versions import run_of
from llmops.output import log

# Verification metrics as benchmark metrics (what promotion gates read).
VERIFY_METRICS = {"ppl_output": ("ppl", None), "kld": ("kld", None), "top1_agreement": ("top1", None)}


def eval_dataset_name(ev) -> str:  # noqa: ANN001 - llmops.evaltext.EvalText
    if ev.is_wikitext2:
        return "wikitext-2-raw-test"
    return re.sub(r"[^A-Za-z0-9._-]", "-", Path(str(ev.path)).stem)[:100] or "eval-text"


def register_evaluation(store, model_name: str, version: str, ev, verification: dict[str, float], backend: str,  # noqa: ANN001
                        device: str, threads: int | None) -> None:
    """The eval text becomes a dataset (content-addressed), an input of the version's run, an
    ``evaluated_on`` edge, and the verification figures become benchmark results on this machine."""
    from llmops.benchmarks.hardware import profile
    from llmops.registry import datasets, results
    from llmops.registry.tables import LineageEdge
    from llmops.registry.versions import artifact_for, resolve_model_version

    info = datasets.add(store, eval_dataset_name(ev), ev.path, "eval text used by llmops") if ev.path else None
    mv = resolve_model_version(store, f"models:/{model_name}/{version}")
    art = artifact_for(store, "model", model_name, version)
    if info is not None and run_of(mv):
        datasets.log_use(store, run_of(mv), info, "evaluation")
    with store.session() as s:
        dataset_art = None
        if info is not None:
            from llmops.registry.artifacts import by_sha

            dataset_art = by_sha(s, info.sha256)
            s.add(LineageEdge(parent_id=dataset_art.id, child_id=art.id, relation="evaluated_on",
                              parameters={"dataset": info.uri, "purpose": "verification"}))
        measurements = [results.Measurement(name, verification[key], unit)
                        for key, (name, unit) in VERIFY_METRICS.items() if verification.get(key) is not None]
        results.record(s, artifact_id=art.id, hardware=profile(threads, device), backend=backend, device=device,
                       measurements=measurements, eval_dataset_id=dataset_art.id if dataset_art else None)


def run_convert(state, *, source: str, target: str, output: str | None, register_name: str | None, verify: bool,  # noqa: ANN001
                calibration: str | None, device: str, eval_text: str | None, allow_nonfinite: bool,
                threads: int | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert, verify, and (with ``register_name``) register with lineage: ``converted_from`` the
    source, ``calibrated_with`` the calibration dataset (GPTQ), ``evaluated_on`` the eval text."""
    from llmops.converters.api import convert, parse_target
    from llmops.registry.refs import is_ref, validate_name

    spec = parse_target(target)  # a bad --to fails before anything is read or written
    if register_name:
        validate_name(register_name, "model name")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if spec.format != "gptq" and (calibration or {"group_size", "act_order", "sym", "damp", "calibration_samples",
                                                  "calibration_tokens"} & options.keys()):
        raise UsageError("--calibration, --group-size, --act-order, --sym/--asym, --damp and --calibration-* "
                         "apply to gptq targets only")
    if spec.format != "onnx" and "block_size" in options:
        raise UsageError("--block-size applies to onnx-int4 and onnx-int8 only")
    store = state.store() if (register_name or is_ref(source) or (calibration and is_ref(calibration))) else None
    if not is_ref(source) and not Path(source).exists():
        raise UsageError(f"{source}: no such file or folder")
    if calibration and not is_ref(calibration) and not Path(calibration).is_file():
        raise UsageError(f"--calibration {calibration}: no such file")
    ev = None
    if verify or (spec.format == "gptq" and not calibration):
        from llmops.evaltext import load_eval_text

        ev = load_eval_text(eval_text, progress=log)
        options.setdefault("eval_text_file", str(ev.path))

    with ExitStack() as stack:
        src_path: str | Path = source
        if is_ref(source):
            from llmops.registry.artifacts import materialize
            from llmops.registry.versions import resolve_artifact

            art = resolve_artifact(store, source)
            src_path = stack.enter_context(materialize(art.uri, store.settings.tracking_uri))
        calib_info = None
        if calibration and is_ref(calibration):
            from llmops.registry import datasets

            calib_info = datasets.show(store, calibration)
            options["calibration_file"] = str(stack.enter_context(datasets.local_copy(store, calibration)))
        elif calibration:
            options["calibration_file"] = str(Path(calibration).resolve())
        record = convert(src_path, spec, output, verify=verify, eval_text=ev.text if (ev and verify) else None,
                         allow_nonfinite=allow_nonfinite, threads=threads, device=device, options=options,
                         progress=log)
        result = record.to_dict()
        result["registered"] = None
        if register_name:
            result["registered"] = _register_converted(store, record, register_name, source, target, device, threads,
                                                       ev if verify else None, calib_info)
    keys = ("output", "format", "quant", "sha256", "size_bytes", "seconds", "peak_rss_bytes", "bits_per_weight",
            "verification", "registered", "parameters", "tool_versions")
    return {k: result.get(k) for k in keys}


def _register_converted(store, record, name: str, source: str, target: str, device: str, threads: int | None,  # noqa: ANN001
                        ev, calib_info) -> dict[str, str]:  # noqa: ANN001
    from llmops.benchmarks.logits import backend_for
    from llmops.registry import datasets
    from llmops.registry.refs import is_ref
    from llmops.registry.versions import ParentSpec, register

    parent = source if is_ref(source) else str(Path(source).resolve())
    parents = [ParentSpec(parent, "converted_from", {"target": target})]
    calib = record.parameters.get("calibration")
    if isinstance(calib, dict):
        # The calibration text becomes a dataset version (content-addressed: the same
        # bytes are the same version), and the edge says exactly which part was used.
        if calib_info is None:
            cal_path = Path(calib["path"])
            ds_name = (eval_dataset_name(ev) if ev is not None and cal_path == Path(ev.path)
                       else re.sub(r"[^A-Za-z0-9._-]", "-", cal_path.stem)[:100] or "calibration")
            calib_info = datasets.add(store, ds_name, cal_path, "calibration text used by llmops")
        edge = {k: v for k, v in calib.items() if k != "path"}
        parents.append(ParentSpec(calib_info.uri, "calibrated_with", {"dataset": calib_info.uri, **edge}))
    params = {k: v for k, v in record.parameters.items() if not isinstance(v, dict)}
    params.update(target=target, device=device)
    log(f"registering {record.output} as {name}")
    v = register(store, record.output, name, fmt=record.format, quant=record.quant,
                 bits_per_weight=record.bits_per_weight, sha256=record.sha256, parents=parents,
                 params=params, metrics=record.verification, tool_versions=record.tool_versions,
                 command=f"convert --to {target}", tags=_extra_tags(record))
    if calib_info is not None:
        from llmops.registry.versions import resolve_model_version

        mv = resolve_model_version(store, v.uri)
        if run_of(mv):
            datasets.log_use(store, run_of(mv), calib_info, "calibration")
    if record.verification and ev is not None:
        register_evaluation(store, name, v.version, ev, record.verification, backend_for(record.output), device,
                            threads)
    return {"name": v.name, "version": v.version, "uri": v.uri}


def _extra_tags(record) -> dict[str, str]:  # noqa: ANN001
    """Format-specific version tags (GPTQ's group size, ONNX's execution provider, ...)."""
    keys = ("bits", "group_size", "act_order", "sym", "precision", "execution_provider", "opset", "block_size")
    return {k: str(record.parameters[k]) for k in keys if record.parameters.get(k) is not None}


# -- bench ------------------------------------------------------------------------------------------
def _eval_text(state, eval_text: str | None, dataset: str | None):  # noqa: ANN001, ANN202
    from llmops.evaltext import load_eval_text

    if dataset:
        from llmops.registry import datasets

        store = state.store()
        info = datasets.show(store, dataset)
        with datasets.local_copy(store, dataset) as p:
            ev = load_eval_text(p)
        return ev, info
    return load_eval_text(eval_text, progress=log), None


def _record_bench(store, *, path: Path, ref: str | None, res: dict[str, Any], ev, dataset_info, opts,  # noqa: ANN001
                  seconds: float) -> dict[str, Any]:
    """Results into our tables (with the hardware) and, for a registered version, onto its MLflow run."""
    import time as _time

    from llmops.benchmarks.hardware import profile
    from llmops.converters.api import tool_versions
    from llmops.hashing import sha256_path, size_of
    from llmops.registry import artifacts, datasets, results
    from llmops.registry.store import actor
    from llmops.registry.tables import LineageEdge, Run, utcnow
    from llmops.registry.versions import resolve_artifact, resolve_model_version

    if dataset_info is None and ev is not None and ev.path and "accuracy" in opts.metrics:
        dataset_info = datasets.add(store, eval_dataset_name(ev), ev.path, "eval text used by llmops")
    hw = profile(opts.threads, opts.device)
    mv = resolve_model_version(store, ref) if ref and ref.startswith("models:/") else None
    with store.session() as s:
        if ref:
            art = s.get(type(resolve_artifact(store, ref)), resolve_artifact(store, ref).id)
        else:
            d = res["details"]
            art = artifacts.upsert(s, sha256=sha256_path(path), kind="model" if d["format"] in ("gguf", "onnx", "gptq")
                                   else "checkpoint", name=path.name, uri=path.as_uri(), size_bytes=size_of(path),
                                   format=d["format"], quant=d["quant"], meta={"stored": False}, created_by=actor())
        ds_art = artifacts.by_sha(s, dataset_info.sha256) if dataset_info else None
        run = Run(kind="bench", command="bench", parameters={**res["details"], "artifact": ref or str(path),
                                                               "metrics": sorted(opts.metrics)},
                  tool_versions=tool_versions(), status="finished", finished_at=utcnow(), seconds=seconds,
                  mlflow_run_id=run_of(mv) if mv else None)
        s.add(run)
        s.flush()
        units = {k: results.Measurement(k, v, _unit(k)) for k, v in res["metrics"].items() if v == v}
        results.record(s, artifact_id=art.id, hardware=hw, backend=res["details"]["backend"], device=opts.device,
                       measurements=list(units.values()), run=run, eval_dataset_id=ds_art.id if ds_art else None)
        if ds_art is not None and "accuracy" in opts.metrics:
            from sqlalchemy import select

            if s.scalars(select(LineageEdge).where(LineageEdge.parent_id == ds_art.id, LineageEdge.child_id == art.id,
                                                   LineageEdge.relation == "evaluated_on")).first() is None:
                s.add(LineageEdge(parent_id=ds_art.id, child_id=art.id, relation="evaluated_on",
                                  parameters={"dataset": dataset_info.uri, "purpose": "benchmark"}, run_id=run.id))
    if mv is not None and run_of(mv):
        from mlflow.entities import Metric

        ts = int(_time.time() * 1000)
        store.mlflow.log_batch(run_of(mv), metrics=[Metric(f"bench.{k}", float(v), ts, 0)
                                                    for k, v in res["metrics"].items() if v == v])
        if dataset_info is not None and "accuracy" in opts.metrics:
            datasets.log_use(store, run_of(mv), dataset_info, "evaluation")
    from llmops.registry.results import fingerprint

    return {"hardware": fingerprint(hw)}


def _unit(metric: str) -> str | None:
    from llmops.benchmarks.bench import UNITS

    return UNITS.get(metric)


def run_bench(state, artifacts: tuple[str, ...], *, device: str, threads: int | None, metrics: str,  # noqa: ANN001
              eval_text: str | None, dataset: str | None, ctx: int, chunks: int | None, baseline: str | None,
              record: bool, runs: int, decode_tokens: int, prompt_tokens: int,
              max_memory_mb: int | None = None) -> dict[str, Any]:
    import os
    import time

    from llmops.benchmarks.logits import MAX_MEMORY_ENV

    from llmops.benchmarks.bench import METRICS, BenchOptions, bench_artifact
    from llmops.fixtures import cache_dir
    from llmops.registry.refs import is_ref

    wanted = {m.strip() for m in metrics.split(",") if m.strip()}
    if not wanted or wanted - set(METRICS):
        raise UsageError(f"--metrics takes a comma-separated subset of {','.join(METRICS)}")
    if runs < 1 or decode_tokens < 2 or prompt_tokens < 1 or ctx < 8:
        raise UsageError("--runs, --decode-tokens, --prompt-tokens and --ctx must be positive")
    for a in (*artifacts, *( [baseline] if baseline else [])):
        if not is_ref(a) and not Path(a).exists():
            raise UsageError(f"{a}: no such file or folder")
    needs_store = record or any(is_ref(a) for a in artifacts) or (baseline and is_ref(baseline)) or dataset
    store = state.store() if needs_store else None
    ev, dataset_info = _eval_text(state, eval_text, dataset) if wanted & {"latency", "accuracy"} else (None, None)
    rows = []
    with ExitStack() as stack:
        if max_memory_mb:
            stack.enter_context(_env(MAX_MEMORY_ENV, str(max_memory_mb)))  # read by every runner child
        from llmops.registry.artifacts import materialize
        from llmops.registry.versions import resolve_artifact

        def local(a: str) -> Path:
            if is_ref(a):
                return stack.enter_context(materialize(resolve_artifact(store, a).uri, store.settings.tracking_uri))
            return Path(a).resolve()

        base_path = local(baseline) if baseline else None
        opts = BenchOptions(metrics=wanted, device=device, threads=threads or os.cpu_count(), text=ev.text if ev else None, ctx=ctx,
                            chunks=chunks, baseline=base_path, runs=runs, prompt_tokens=prompt_tokens,
                            decode_tokens=decode_tokens, cache_dir=cache_dir() / "logits")
        for a in artifacts:
            path = local(a)
            t0 = time.time()
            res = bench_artifact(path, opts, progress=log)
            row = {"artifact": a, **res["details"], **res["metrics"]}
            if record and store is not None:
                row.update(_record_bench(store, path=path, ref=a if is_ref(a) else None, res=res, ev=ev,
                                         dataset_info=dataset_info, opts=opts, seconds=time.time() - t0))
            rows.append(row)
    return {"eval_text": {"sha256": ev.sha256, "source": ev.source} if ev else None, "baseline": baseline, "rows": rows}


@contextmanager
def _env(key: str, value: str):  # noqa: ANN202
    import os

    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def run_compare(state, refs: tuple[str, ...], plot: str | None, any_hardware: bool) -> dict[str, Any]:  # noqa: ANN001
    from llmops.registry import results
    from llmops.registry.versions import resolve_artifact, resolve_model_version

    store = state.store()
    rows, fp = [], None
    for ref in refs:
        art = resolve_artifact(store, ref)
        with store.session() as s:
            rs = results.latest(s, art.id, None if any_hardware else fp)
        if fp is None and not any_hardware:
            fp = rs.hardware_fingerprint
        m = dict(rs.metrics)
        m.setdefault("file_mb", art.size_bytes / (1024 * 1024))
        rows.append({"ref": ref, "label": ref.split(":/", 1)[-1], "format": art.format, "quant": art.quant,
                     "hardware": rs.hardware_fingerprint, **m})
    base_ppl = rows[0].get("ppl") if rows else None
    for r in rows:
        if r.get("ppl") and base_ppl:
            r["dppl_pct"] = 100.0 * (r["ppl"] / base_ppl - 1.0)
    out: dict[str, Any] = {"hardware": fp, "rows": rows, "plot": None}
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
