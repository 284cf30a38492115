"""What a convert or bench run leaves in the registry: datasets, results, lineage, MLflow metrics.

The application layer decides *what* is recorded; the registry (``llmops.registry``) owns
the rows and how they are written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmops.registry.versions import run_of

# Verification metrics as benchmark metrics (what promotion gates read).
VERIFY_METRICS = {"ppl_output": ("ppl", None), "kld": ("kld", None), "top1_agreement": ("top1", None)}


def eval_dataset_name(ev) -> str:  # noqa: ANN001 - llmops.core.evaltext.EvalText
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


def record_bench(store, *, path: Path, ref: str | None, res: dict[str, Any], ev, dataset_info, opts,  # noqa: ANN001
                  seconds: float) -> dict[str, Any]:
    """Results into our tables (with the hardware) and, for a registered version, onto its MLflow run."""
    import time as _time

    from llmops.benchmarks.hardware import profile
    from llmops.core.toolversions import tool_versions
    from llmops.core.hashing import sha256_path, size_of
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
