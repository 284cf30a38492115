"""What a convert or bench run leaves in the registry: datasets, results, lineage, MLflow metrics.

The application layer decides *what* is recorded (which figures, under which protocol);
the registry (``llmops.registry``) owns the rows and how they are written. Nothing here
touches a table or a session.

Every result carries its protocol: the kind of job (``verify`` for ``convert --verify``,
``bench`` for ``llmops bench``), the metric family and what decides its value (eval
text, context, chunks, scored positions, baseline, backend, threads, device, tool
versions; for latency the prompt and decode lengths and the number of runs; for a task's
accuracy the task, its config and data, split, limit and shots). Results of different
protocols are never compared (``llmops.registry.protocols``). A task's figures are
recorded against the task's questions, registered as a dataset version of their own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# Verification metrics as benchmark metrics (what promotion gates read).
VERIFY_METRICS = {"ppl_output": ("ppl", None), "kld": ("kld", None), "top1_agreement": ("top1", None)}
# How llama-perplexity scores a window (and so do we): only its second half.
SCORED = "second_half"
# Tools a runtime needs beyond the base stack (llmops.core.toolversions.TOOLS keys).
RUNTIME_TOOLS = {"onnx": ("onnxruntime", "onnxruntime_genai"), "gptq": ("gptqmodel", "optimum")}


def eval_dataset_name(ev) -> str:  # noqa: ANN001 - llmops.core.evaltext.EvalText
    if ev.is_wikitext2:
        return "wikitext-2-raw-test"
    return re.sub(r"[^A-Za-z0-9._-]", "-", Path(str(ev.path)).stem)[:100] or "eval-text"


def runtime_tools(backend: str) -> dict[str, str]:
    """The versions of what measured a result: the base stack and the backend's own packages."""
    from llmops.core.toolversions import tool_versions

    return tool_versions(*RUNTIME_TOOLS.get(backend, ()))


# -- protocols -----------------------------------------------------------------------
def accuracy_protocol(kind: str, metric: str, *, eval_sha256: str | None, ctx: int, chunks: int, backend: str,
                      threads: int | None, device: str, baseline_sha256: str | None = None,
                      tools: dict[str, str] | None = None) -> dict[str, Any]:
    """Perplexity by llama-perplexity's method on ``chunks`` windows of ``ctx`` tokens; the
    baseline's bytes count only for the metrics measured against it (KLD, top-1, ...)."""
    from llmops.registry.protocols import against_baseline

    p: dict[str, Any] = {"kind": kind, "family": "accuracy", "eval_sha256": eval_sha256, "ctx": ctx,
                         "chunks": chunks, "scored": SCORED, "backend": backend, "threads": threads,
                         "device": device, "tools": tools if tools is not None else runtime_tools(backend)}
    if against_baseline(metric):
        p["baseline_sha256"] = baseline_sha256
    return p


def task_protocol(kind: str, metric: str, task: dict[str, Any], *, backend: str, threads: int | None, device: str,
                  baseline_sha256: str | None = None, tools: dict[str, str] | None = None) -> dict[str, Any]:
    """A task's accuracy by lm-eval's definition: the task, its config and data (by sha256), the
    split, the first ``limit`` questions, the shots and the longest request fed; the baseline's
    bytes for the paired figures. ``task``: the task's entry in bench's ``details["tasks"]``."""
    from llmops.registry.protocols import against_baseline

    p: dict[str, Any] = {"kind": kind, "family": "accuracy", "measure": "task", "task": task["name"],
                         "harness": task["harness"], "task_version": task.get("version"),
                         "config_sha256": task["config_sha256"], "data_sha256": task["data_sha256"],
                         "split": task["split"], "limit": task.get("limit"), "shots": task["shots"],
                         "ctx": task["ctx"], "backend": backend, "threads": threads, "device": device,
                         "tools": tools if tools is not None else runtime_tools(backend)}
    if against_baseline(metric):
        p["baseline_sha256"] = baseline_sha256
    return p


def latency_protocol(kind: str, *, eval_sha256: str | None, ctx: int, prompt_tokens: int, decode_tokens: int,
                     runs: int, backend: str, threads: int | None, device: str,
                     tools: dict[str, str] | None = None) -> dict[str, Any]:
    return {"kind": kind, "family": "latency", "eval_sha256": eval_sha256, "ctx": ctx, "prompt_tokens": prompt_tokens,
            "decode_tokens": decode_tokens, "runs": runs, "backend": backend, "threads": threads, "device": device,
            "tools": tools if tools is not None else runtime_tools(backend)}


def memory_protocol(kind: str, *, ctx: int, backend: str, threads: int | None, device: str,
                    workload: dict[str, int] | None = None, tools: dict[str, str] | None = None) -> dict[str, Any]:
    """Load time and peak memory: of a load alone, or over the latency runs (``workload``)."""
    return {"kind": kind, "family": "memory", "ctx": ctx, "workload": workload or "load", "backend": backend,
            "threads": threads, "device": device, "tools": tools if tools is not None else runtime_tools(backend)}


def bytes_protocol(kind: str) -> dict[str, Any]:
    """File size and bits per weight: properties of the bytes, whatever ran them."""
    return {"kind": kind, "family": "memory", "measure": "bytes"}


def bench_protocol(metric: str, details: dict[str, Any], opts, *, eval_sha256: str | None,  # noqa: ANN001
                   baseline_sha256: str | None, tools: dict[str, str]) -> dict[str, Any]:
    """The protocol of one metric of an ``llmops bench`` result (``details``: bench_artifact's)."""
    from llmops.registry.protocols import family_of, is_task_metric

    backend, threads, device = details["backend"], opts.threads, opts.device
    family = family_of(metric)
    if metric in ("file_mb", "bits_per_weight"):
        return bytes_protocol("bench")
    if is_task_metric(metric):
        return task_protocol("bench", metric, task_entry(details, metric), backend=backend, threads=threads,
                             device=device, baseline_sha256=baseline_sha256, tools=tools)
    if family == "accuracy":
        return accuracy_protocol("bench", metric, eval_sha256=eval_sha256, ctx=details.get("ctx", opts.ctx),
                                 chunks=details.get("chunks", opts.chunks), backend=backend, threads=threads,
                                 device=device, baseline_sha256=baseline_sha256, tools=tools)
    if family == "latency":
        return latency_protocol("bench", eval_sha256=eval_sha256, ctx=opts.ctx,
                                prompt_tokens=details.get("prompt_tokens", opts.prompt_tokens),
                                decode_tokens=details.get("decode_tokens", opts.decode_tokens),
                                runs=details.get("runs", opts.runs), backend=backend, threads=threads, device=device,
                                tools=tools)
    workload = None
    if "latency" in opts.metrics:  # the memory was sampled over the timed runs
        workload = {"prompt_tokens": details.get("prompt_tokens", opts.prompt_tokens),
                    "decode_tokens": details.get("decode_tokens", opts.decode_tokens),
                    "runs": details.get("runs", opts.runs)}
    return memory_protocol("bench", ctx=opts.ctx, backend=backend, threads=threads, device=device, workload=workload,
                           tools=tools)


def task_entry(details: dict[str, Any], metric: str) -> dict[str, Any]:
    """The ``details["tasks"]`` entry a ``TASK.METRIC`` figure belongs to, with its name."""
    prefix = metric.split(".", 1)[0]
    for name, entry in (details.get("tasks") or {}).items():
        if entry.get("prefix") == prefix:
            return {"name": name, **entry}
    raise KeyError(f"no task behind the figure {metric}")


# -- convert --verify ------------------------------------------------------------------
def verification_evaluation(store, ev, verification: dict[str, float], parameters: dict[str, Any], *,  # noqa: ANN001
                            backend: str, device: str, threads: int | None, source_sha256: str | None):
    """The verification figures of ``convert --verify`` as an evaluation that travels with the
    registration (``register(evaluations=[...])``): the eval text becomes a dataset version
    (content-addressed, added first: it is shared by every registration that uses it), the
    figures benchmark results on this machine under the ``verify`` protocol."""
    from llmops.benchmarks.hardware import profile
    from llmops.registry import datasets
    from llmops.registry.evaluations import Evaluation
    from llmops.registry.results import Measurement

    info = datasets.add(store, eval_dataset_name(ev), ev.path, "eval text used by llmops") if ev.path else None
    run = parameters.get("verification") or {}
    # verify_record runs the evaluation on ``threads or os.cpu_count()`` threads
    used_threads = threads or os.cpu_count()
    tools = runtime_tools(backend)
    measurements = [
        Measurement(name, verification[key], unit,
                    accuracy_protocol("verify", name, eval_sha256=ev.sha256, ctx=run.get("n_ctx", 512),
                                      chunks=run.get("chunks"), backend=backend, threads=used_threads, device=device,
                                      baseline_sha256=source_sha256, tools=tools))
        for key, (name, unit) in VERIFY_METRICS.items() if verification.get(key) is not None]
    return Evaluation(measurements=measurements, hardware=profile(threads, device), backend=backend, device=device,
                      dataset=info, purpose="verification")


# -- llmops bench ------------------------------------------------------------------------
def record_bench(store, *, path: Path | None, ref: str | None, res: dict[str, Any], ev, dataset_info, opts,  # noqa: ANN001
                 seconds: float, baseline_sha256: str | None = None, hardware: dict[str, Any] | None = None,
                 target: str | None = None, node: str | None = None, job_key: str | None = None) -> dict[str, Any]:
    """Results into our tables (with the hardware and protocol) and, for a registered version,
    onto its MLflow run. A fleet job's results come with the hardware its node measured, the
    target and node names and the job's key (recorded once)."""
    from llmops.benchmarks.hardware import profile
    from llmops.core.toolversions import tool_versions
    from llmops.registry import datasets, evaluations
    from llmops.registry.results import Measurement

    from llmops.registry.protocols import is_task_metric

    accuracy = "accuracy" in opts.metrics
    if dataset_info is None and ev is not None and ev.path and accuracy:
        dataset_info = datasets.add(store, eval_dataset_name(ev), ev.path, "eval text used by llmops")
    d = res["details"]
    tools = runtime_tools(d["backend"])
    eval_sha = ev.sha256 if ev is not None else None
    hw = hardware if hardware is not None else profile(opts.threads, opts.device)
    kind = "model" if d["format"] in ("gguf", "onnx", "gptq") else "checkpoint"
    parameters = {k: v for k, v in d.items() if k != "tasks"}
    parameters.update(artifact=ref or str(path), metrics=sorted(opts.metrics),
                      **({"target": target, "node": node} if target else {}))
    # one evaluation per dataset: the eval text's figures, then each task's on its own questions
    groups: dict[str | None, dict[str, float]] = {}
    for k, v in res["metrics"].items():
        if v == v:
            groups.setdefault(task_entry(d, k)["name"] if is_task_metric(k) else None, {})[k] = v
    fp = None
    for task, figures in groups.items():
        measurements = [Measurement(k, v, _unit(k), bench_protocol(k, d, opts, eval_sha256=eval_sha,
                                                                    baseline_sha256=baseline_sha256, tools=tools))
                        for k, v in figures.items()]
        data, link, params = dataset_info, accuracy, parameters
        if task is not None:
            entry = d["tasks"][task]
            data = datasets.add(store, task_dataset_name(task, entry["split"]), entry["data_file"],
                                f"{task} ({entry['split']}) questions, scored by {entry['harness']}")
            link, params = True, {**parameters, "task": task, "task_details": entry}
        evaluation = evaluations.Evaluation(measurements=measurements, hardware=hw, backend=d["backend"],
                                            device=opts.device, dataset=data, purpose="benchmark", link=link,
                                            target=target, node=node, job_key=job_key)
        fp = evaluations.record_bench(store, ref=ref, path=path, kind=kind, fmt=d["format"], quant=d["quant"],
                                      evaluation=evaluation, parameters=params, tool_versions=tool_versions(),
                                      seconds=seconds, mlflow_metrics=figures, log_dataset=link) or fp
    return {"hardware": fp}


def task_dataset_name(task: str, split: str) -> str:
    """The dataset a task's questions are registered as: ``hellaswag-validation``."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{task}-{split}")[:100]


def _unit(metric: str) -> str | None:
    from llmops.benchmarks.bench import unit_of

    return unit_of(metric)
