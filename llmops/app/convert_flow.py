"""``llmops convert``: convert, verify, then register with lineage and record the verification."""

from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from llmops.app.output import log
from llmops.app.recording import eval_dataset_name, verification_evaluation
from llmops.core.errors import UsageError
from llmops.core.progress import Reporter, as_reporter, reporting


def run_convert(state, *, source: str, target: str, output: str | None, register_name: str | None, verify: bool,  # noqa: ANN001
                calibration: str | None, device: str, eval_text: str | None, allow_nonfinite: bool,
                threads: int | None = None, options: dict[str, Any] | None = None,
                progress: Reporter | None = None) -> dict[str, Any]:
    """Convert, verify, and (with ``register_name``) register with lineage: ``converted_from`` the
    source, ``calibrated_with`` the calibration dataset (GPTQ), ``evaluated_on`` the eval text.
    ``progress``: the CLI's reporter (default: every message on stderr). The result holds the
    output's per-tensor table (``tensors``, where the format lists them) beside the record."""
    from llmops.app.converting import convert
    from llmops.converters.api import parse_target
    from llmops.registry.refs import is_ref, validate_name

    say = as_reporter(progress if progress is not None else log)
    spec = parse_target(target)  # a bad --to fails before anything is read or written
    if register_name:
        validate_name(register_name, "model name")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if spec.format != "gptq" and (calibration or {"group_size", "act_order", "sym", "damp", "calibration_samples",
                                                  "calibration_tokens", "keep_outliers", "mse", "foem", "gptaq"} & options.keys()):
        raise UsageError("--calibration, --group-size, --act-order, --sym/--asym, --damp, --mse, --foem, --gptaq, "
                         "--keep-outliers and "
                         "--calibration-* apply to gptq targets only")
    if spec.format != "gguf" and "imatrix" in options:
        raise UsageError("--imatrix applies to gguf targets only")
    if spec.format != "onnx" and "block_size" in options:
        raise UsageError("--block-size applies to onnx-int4 and onnx-int8 only")
    imatrix = options.get("imatrix")
    imatrix_ref = isinstance(imatrix, str) and is_ref(imatrix)
    if imatrix is not None and not imatrix_ref and not Path(imatrix).is_file():
        raise UsageError(f"--imatrix {imatrix}: no such file (a file, or datasets:/NAME/VERSION)")
    store = (state.store() if (register_name or is_ref(source) or (calibration and is_ref(calibration)) or imatrix_ref)
             else None)
    if not is_ref(source) and not Path(source).exists():
        raise UsageError(f"{source}: no such file or folder")
    if calibration and not is_ref(calibration) and not Path(calibration).is_file():
        raise UsageError(f"--calibration {calibration}: no such file")
    ev = None
    if verify or (spec.format == "gptq" and not calibration):
        from llmops.core.evaltext import load_eval_text

        ev = load_eval_text(eval_text, progress=say)
        options.setdefault("eval_text_file", str(ev.path))

    with ExitStack() as stack:
        stack.enter_context(reporting(say))  # children started without a reporter relay to it too
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
        imatrix_info = None
        if imatrix_ref:
            # a registered dataset: an imatrix file, or the text to compute one from (a local
            # copy under the dataset's own file name, so the format is told as for a file)
            from llmops.registry import datasets

            imatrix_info = datasets.show(store, imatrix)
            options["imatrix"] = str(stack.enter_context(datasets.local_copy(store, imatrix)))
        record = convert(src_path, spec, output, verify=verify, eval_text=ev.text if (ev and verify) else None,
                         allow_nonfinite=allow_nonfinite, threads=threads, device=device, options=options,
                         progress=say)
        result = record.to_dict()
        result["registered"] = None
        if register_name:
            result["registered"] = _register_converted(store, record, register_name, source, target, device, threads,
                                                       ev if verify else None, calib_info, say, imatrix_info)
    keys = ("output", "format", "quant", "sha256", "size_bytes", "seconds", "peak_rss_bytes", "bits_per_weight",
            "verification", "registered", "parameters", "tool_versions", "tensors")
    return {k: result.get(k) for k in keys}


def _register_converted(store, record, name: str, source: str, target: str, device: str, threads: int | None,  # noqa: ANN001
                        ev, calib_info, say: Reporter, imatrix_info=None) -> dict[str, str]:  # noqa: ANN001
    """One registration, all or nothing: the version with its lineage, the calibration and eval
    datasets as inputs of its run, and the verification figures as results (``verify`` protocol)."""
    from llmops.benchmarks.runners import backend_for
    from llmops.core.hashing import sha256_path
    from llmops.registry import datasets
    from llmops.registry.refs import is_ref
    from llmops.registry.registration import register
    from llmops.registry.versions import ParentSpec, resolve_artifact

    # The source is the baseline of the verification: its bytes are part of the protocol.
    source_sha = resolve_artifact(store, source).sha256 if is_ref(source) else sha256_path(Path(source).resolve())
    parent = source if is_ref(source) else str(Path(source).resolve())
    parents = [ParentSpec(parent, "converted_from", {"target": target}, sha256=None if is_ref(source) else source_sha)]
    inputs = []

    def calibration_parent(calib: dict, info, what: str, **extra: object) -> None:  # noqa: ANN001
        # The calibration text becomes a dataset version (content-addressed: the same
        # bytes are the same version), and the edge says exactly which part was used.
        if info is None:
            cal_path = Path(calib["path"])
            ds_name = (eval_dataset_name(ev) if ev is not None and cal_path == Path(ev.path)
                       else re.sub(r"[^A-Za-z0-9._-]", "-", cal_path.stem)[:100] or "calibration")
            info = datasets.add(store, ds_name, cal_path, what)
        edge = {k: v for k, v in calib.items() if k not in ("path", "sha256")}
        parents.append(ParentSpec(info.uri, "calibrated_with", {"dataset": info.uri, **edge, **extra}))
        inputs.append((info, "calibration"))

    calib = record.parameters.get("calibration")
    if isinstance(calib, dict):
        calibration_parent(calib, calib_info, "calibration text used by llmops")
    elif calib_info is not None:
        inputs.append((calib_info, "calibration"))
    imatrix = record.parameters.get("imatrix")
    if isinstance(imatrix, dict) and imatrix.get("path"):
        # The importance matrix is stored as a dataset version in llama.cpp's imatrix format (so
        # `llama-quantize --imatrix` can use it too), and the text it was computed from, when
        # computed here, is a second calibrated_with edge with its exact character range.
        given = imatrix_info is not None and not isinstance(imatrix.get("calibration"), dict)
        im_info = imatrix_info if given else datasets.add(
            store, f"imatrix-{imatrix['sha256'][:12]}", Path(imatrix["path"]),
            "importance matrix (llama.cpp imatrix format) used by llmops")
        parents.append(ParentSpec(im_info.uri, "calibrated_with",
                                  {"imatrix": im_info.uri, "entries": imatrix.get("entries"),
                                   "chunks": imatrix.get("chunks")}))
        inputs.append((im_info, "calibration"))
        if isinstance(imatrix.get("calibration"), dict):
            calibration_parent(imatrix["calibration"], imatrix_info, "calibration text of an importance matrix",
                               imatrix=im_info.uri)
    evaluations = []
    if record.verification and ev is not None:
        evaluation = verification_evaluation(store, ev, record.verification, record.parameters,
                                              backend=backend_for(record.output), device=device, threads=threads,
                                              source_sha256=source_sha)
        evaluations.append(evaluation)
        if evaluation.dataset is not None:
            inputs.append((evaluation.dataset, "evaluation"))
    params = {k: v for k, v in record.parameters.items() if not isinstance(v, dict)}
    params.update(target=target, device=device)
    say(f"registering {record.output} as {name}")
    v = register(store, record.output, name, fmt=record.format, quant=record.quant,
                 bits_per_weight=record.bits_per_weight, sha256=record.sha256, parents=parents,
                 params=params, metrics=record.verification, tool_versions=record.tool_versions,
                 command=f"convert --to {target}", tags=_extra_tags(record), evaluations=evaluations,
                 dataset_inputs=inputs)
    return {"name": v.name, "version": v.version, "uri": v.uri}


def _extra_tags(record) -> dict[str, str]:  # noqa: ANN001
    """Format-specific version tags (GPTQ's group size, ONNX's execution provider, ...)."""
    keys = ("bits", "group_size", "act_order", "sym", "precision", "execution_provider", "opset", "block_size",
            "recipe", "keep_outliers", "mse", "foem", "gptaq", "linear_bits_per_weight")
    return {k: str(record.parameters[k]) for k in keys if record.parameters.get(k) is not None}
