"""Multi-step jobs behind the CLI: convert, then verify, register and record.

The steps themselves live in the converters, the benchmarks and the registry;
this module only orders them and decides what the user sees.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from llmops.errors import UsageError
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
    if info is not None and mv.run_id:
        datasets.log_use(store, mv.run_id, info, "evaluation")
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
                threads: int | None = None) -> dict[str, Any]:
    from llmops.converters.api import convert, parse_target
    from llmops.registry.refs import is_ref, validate_name

    spec = parse_target(target)  # a bad --to fails before anything is read or written
    if register_name:
        validate_name(register_name, "model name")
    if calibration and spec.format != "gptq":
        raise UsageError("--calibration applies to gptq targets only")
    store = state.store() if (register_name or is_ref(source)) else None
    if not is_ref(source) and not Path(source).exists():
        raise UsageError(f"{source}: no such file or folder")
    ev = None
    if verify:
        from llmops.evaltext import load_eval_text

        ev = load_eval_text(eval_text, progress=log)

    with ExitStack() as stack:
        src_path: str | Path = source
        if is_ref(source):
            from llmops.registry.artifacts import materialize
            from llmops.registry.versions import resolve_artifact

            art = resolve_artifact(store, source)
            src_path = stack.enter_context(materialize(art.uri, store.settings.tracking_uri))
        record = convert(src_path, spec, output, verify=verify, eval_text=ev.text if ev else None,
                         allow_nonfinite=allow_nonfinite, threads=threads, progress=log)
    result = record.to_dict()
    result["registered"] = None
    if register_name:
        from llmops.registry.versions import ParentSpec, register

        parent = source if is_ref(source) else str(Path(source).resolve())
        params = {k: v for k, v in record.parameters.items() if not isinstance(v, dict)}
        params.update(target=target, device=device)
        log(f"registering {record.output} as {register_name}")
        v = register(store, record.output, register_name, fmt=record.format, quant=record.quant,
                     bits_per_weight=record.bits_per_weight, sha256=record.sha256,
                     parents=[ParentSpec(parent, "converted_from", {"target": target})],
                     params=params, metrics=record.verification, tool_versions=record.tool_versions,
                     command=f"convert --to {target}")
        if record.verification and ev is not None:
            register_evaluation(store, register_name, v.version, ev, record.verification, "llama.cpp", "cpu", threads)
        result["registered"] = {"name": v.name, "version": v.version, "uri": v.uri}
    keys = ("output", "format", "quant", "sha256", "size_bytes", "seconds", "peak_rss_bytes", "bits_per_weight",
            "verification", "registered", "parameters", "tool_versions")
    return {k: result.get(k) for k in keys}
