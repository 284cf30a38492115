"""``llmops convert`` and ``llmops bench``."""

from __future__ import annotations

import math
from typing import Any

import click

from llmops.app.cli.base import DefaultGroup, _state, cli, common, out, verbose_option
from llmops.app.output import table
from llmops.core.errors import LLMOpsError, UsageError


# -- convert ----------------------------------------------------------------------
@cli.command()
@click.argument("source")
@click.option("--to", "target", required=True, help="gguf-f32|f16|bf16|q8_0|q4_0|q4_k_m|q5_k_m|q6_k, gguf-q4, "
              "gptq-4bit|8bit, onnx|onnx-fp16|onnx-int8|onnx-int4")
@click.option("-o", "--output", type=click.Path(), help="Output file or folder.")
@click.option("--register", "register_name", help="Register the output as a new version of this model.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Compare against the source on eval text.")
@click.option("--calibration", help="Calibration data (GPTQ): datasets:/NAME/VERSION or a text file "
              "(default: a part of the eval text that evaluation never reads).")
@click.option("--calibration-samples", type=click.IntRange(1), help="GPTQ calibration samples (default 32).")
@click.option("--calibration-tokens", type=click.IntRange(8), help="Tokens per calibration sample (default 256).")
@click.option("--group-size", type=click.IntRange(-1), help="GPTQ group size (default 128; the largest valid one "
              "when the layer width is not a multiple).")
@click.option("--act-order", is_flag=True, default=None, help="GPTQ: quantize columns in order of activation size.")
@click.option("--sym/--asym", default=None, help="GPTQ: symmetric or asymmetric (default) quantization; both store a zero point per group.")
@click.option("--damp", type=click.FloatRange(0, 1, min_open=True), help="GPTQ dampening fraction.")
@click.option("--mse", type=click.FloatRange(0, 10), help="GPTQ: search each group's scale for the smallest "
              "rounding error in this p-norm (default 2.4; 0: plain min-max scales).")
@click.option("--foem", type=click.FloatRange(0, 1), help="GPTQ: FOEM's first-order error compensation, its beta "
              "(0: plain GPTQ).")
@click.option("--gptaq", type=click.FloatRange(0, 1), help="GPTQ: GPTAQ's asymmetric calibration, its alpha (0: off).")
@click.option("--keep-outliers/--no-keep-outliers", default=None, help="GPTQ: leave in float16 the few modules "
              "whose rounding error on the calibration activations is an outlier (default: on).")
@click.option("--block-size", type=click.IntRange(16), help="onnx-int4/onnx-int8 block size (default 32).")
@click.option("--imatrix", help="GGUF mixes: importance matrix, a llama.cpp imatrix file (.gguf or legacy .dat) or "
              "calibration text to compute one from: a file, or a registered dataset (datasets:/NAME/VERSION).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(1), help="CPU threads (default: all).")
@click.option("--eval-text", type=click.Path(dir_okay=False), help="Eval text for --verify (default $LLMOPS_EVAL_TEXT).")
@click.option("--allow-nonfinite", is_flag=True, help="Convert weights that contain NaN or Inf.")
@verbose_option
@common
def convert(source: str, target: str, output: str | None, register_name: str | None, verify: bool,
            calibration: str | None, device: str, threads: int | None, eval_text: str | None, allow_nonfinite: bool,
            **options: Any) -> None:
    """Convert SOURCE (a checkpoint folder or file, or models:/NAME/VERSION) to TARGET."""
    from llmops.app.convert_flow import run_convert

    state = _state()
    out(run_convert(state, source=source, target=target, output=output, register_name=register_name,
                    verify=verify, calibration=calibration, device=device, eval_text=eval_text, threads=threads,
                    allow_nonfinite=allow_nonfinite, options=options, progress=state.reporter()), _render_convert)


def _render_convert(d: dict[str, Any]) -> str:
    lines = [f"wrote {d['output']} ({d['format']} {d['quant']}, {d['size_bytes'] / 1e6:.1f} MB, {d['seconds']:.1f} s)"]
    v = d.get("verification")
    if v:
        lines.append(f"verify: KLD {_fmt(v.get('kld'), '.5f')}, top-1 {_fmt(v.get('top1_agreement'), '.4f')}, "
                     f"PPL {_fmt(v.get('ppl_source'), '.3f')} -> {_fmt(v.get('ppl_output'), '.3f')}")
    if d.get("registered"):
        lines.append(f"registered {d['registered']['uri']}")
    return "\n".join(lines)


# -- bench --------------------------------------------------------------------------
@cli.group(cls=DefaultGroup)
def bench() -> None:
    """Benchmark artifacts (memory, latency, accuracy), or compare recorded results."""


@bench.command("run", hidden=True)
@click.argument("artifacts", nargs=-1, required=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, help="CPU threads (default: all available).")
@click.option("--metrics", default="memory,latency,accuracy", show_default=True,
              help="A comma-separated subset of memory,latency,accuracy,tasks (tasks: multiple-choice accuracy "
              "scored by lm-eval).")
@click.option("--eval-text", type=click.Path(dir_okay=False), help="Eval text (default $LLMOPS_EVAL_TEXT, else wikitext-2).")
@click.option("--dataset", help="Eval text from the registry: datasets:/NAME/VERSION.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Perplexity context.")
@click.option("--chunks", type=int, default=16, show_default=True, help="Perplexity chunks (-1: all).")
@click.option("--baseline", help="Source model for KL-divergence and top-1 agreement (path or models:/...).")
@click.option("--record/--no-record", default=True, show_default=True, help="Store results in the registry.")
@click.option("--runs", type=int, default=3, show_default=True, help="Timed runs after a warm-up (medians reported).")
@click.option("--decode-tokens", type=int, default=128, show_default=True)
@click.option("--prompt-tokens", type=int, default=512, show_default=True)
@click.option("--tasks", "task_names", metavar="TASK[,TASK...]", help="With --metrics tasks: lm-eval tasks "
              "(default hellaswag,piqa,arc_easy; built in: also arc_challenge, openbookqa, sciq, winogrande, copa, "
              "social_iqa, commonsense_qa).")
@click.option("--task-path", "task_paths", multiple=True, type=click.Path(file_okay=False),
              help="A folder of lm-eval task YAMLs whose tasks --tasks may name (repeatable).")
@click.option("--limit", type=click.IntRange(1), help="With --metrics tasks: the first N questions of each task "
              "(default: all).")
@click.option("--num-fewshot", type=click.IntRange(0), help="With --metrics tasks: examples before each question "
              "(default: the task's own, 0 for the built-in tasks).")
@click.option("--max-memory", type=click.IntRange(1), help="Cap the memory each runner process may allocate "
              "for the model (MiB); past it the runner fails cleanly instead of taking the machine down.")
@click.option("--on", "on", metavar="ADDRESS", help="Run on the targets of this Ray cluster (HOST:PORT; default "
              "$LLMOPS_RAY_ADDRESS, or the head `llmops node start` started here).")
@click.option("--target", "targets", metavar="NAME[,NAME...]", help="Fleet targets to benchmark on (with --on).")
@click.option("--all-targets", is_flag=True, help="Every target of the fleet (with --on).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="The cluster's Ray token (default "
              "$LLMOPS_RAY_TOKEN_FILE, or the one `llmops node start --head` made).")
@common
def bench_run(artifacts: tuple[str, ...], device: str, threads: int | None, metrics: str, eval_text: str | None,
              dataset: str | None, ctx: int, chunks: int, baseline: str | None, record: bool, runs: int,
              decode_tokens: int, prompt_tokens: int, task_names: str | None, task_paths: tuple[str, ...],
              limit: int | None, num_fewshot: int | None, max_memory: int | None, on: str | None,
              targets: str | None, all_targets: bool, token_file: str | None) -> None:
    """Benchmark ARTIFACT... (files, folders or models:/ references) on this machine, or with --on
    on the target machines of a Ray cluster (one table per target)."""
    from llmops.app.bench_flow import run_bench, run_bench_on, task_options

    state = _state()
    task_opts = None
    if task_names or task_paths or limit is not None or num_fewshot is not None:
        if "tasks" not in {m.strip() for m in metrics.split(",")}:
            raise UsageError("--tasks, --task-path, --limit and --num-fewshot apply to --metrics tasks")
        task_opts = task_options(task_names, task_paths, limit, num_fewshot)
    if on or targets or all_targets:
        if max_memory:
            raise UsageError("--max-memory applies to a local bench, not to fleet targets")
        names = [t.strip() for t in (targets or "").split(",") if t.strip()] or None
        r = run_bench_on(state, artifacts, on=on, targets=names, all_targets=all_targets, token_file=token_file,
                         device=device, threads=threads, metrics=metrics, eval_text=eval_text, dataset=dataset,
                         ctx=ctx, chunks=None if chunks < 0 else chunks, baseline=baseline, record=record,
                         runs=runs, decode_tokens=decode_tokens, prompt_tokens=prompt_tokens,
                         progress=state.reporter())
        out(r, lambda d: _fleet_tables(d["rows"]))
        if r["failed"]:
            err = LLMOpsError(f"{r['failed']} of {len(r['rows'])} fleet job(s) failed: "
                              + "; ".join(f"{x['target']}: {x['artifact']}: {x['error']}"
                                          for x in r["rows"] if x["status"] == "failed"))
            err.reported = True  # the --json document above has every row, failed ones too
            raise err
        return
    r = run_bench(state, artifacts, device=device, threads=threads, metrics=metrics, eval_text=eval_text,
                  dataset=dataset, ctx=ctx, chunks=None if chunks < 0 else chunks, baseline=baseline, record=record,
                  runs=runs, decode_tokens=decode_tokens, prompt_tokens=prompt_tokens, max_memory_mb=max_memory,
                  progress=state.reporter(), tasks=task_opts)
    out(r, lambda d: _bench_table(d["rows"]) + _task_table(d["rows"]))


MISSING = "n/a"


def _num(v: Any) -> float | None:
    """``v`` as a number when it is one and finite; None (missing) otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _fmt(v: Any, spec: str) -> str:
    """A metric for a table: a missing or non-finite value is "n/a", never a number."""
    n = _num(v)
    return MISSING if n is None else format(n, spec)


def _dppl(r: dict[str, Any], against_first: bool) -> float | None:
    """dPPL% of a row: against the row's own baseline, or (``bench compare``) the ``dppl_pct`` computed
    against the first REF; None when a perplexity is missing (a ratio with a missing side is not computed)."""
    if against_first:
        return _num(r.get("dppl_pct"))
    ppl, base = _num(r.get("ppl")), _num(r.get("ppl_baseline"))
    return 100.0 * (ppl / base - 1.0) if ppl is not None and base else None


def _fleet_tables(rows: list[dict[str, Any]]) -> str:
    """One table per target, then the jobs that failed."""
    parts = []
    for target in dict.fromkeys(r["target"] for r in rows):
        ok = [r for r in rows if r["target"] == target and r["status"] == "ok"]
        if ok:
            nodes = ", ".join(sorted({r["node"] for r in ok}))
            parts.append(f"target {target} (node {nodes})\n" + _bench_table(ok))
    failed = [f"FAILED {r['target']}: {r['artifact']}: {r['error']}" for r in rows if r["status"] == "failed"]
    return "\n\n".join(parts + (["\n".join(failed)] if failed else []))


def _bench_table(rows: list[dict[str, Any]], against_first: bool = False) -> str:
    body = []
    for r in rows:
        dppl = _dppl(r, against_first)
        label = r.get("artifact") or r.get("label") or MISSING
        if r.get("aliases"):  # bench compare: the version holds these aliases (the plot's stars)
            label += " " + " ".join(f"@{a}" for a in r["aliases"])
        body.append([label, r.get("format") or MISSING,
                     r.get("quant") or MISSING, _fmt(r.get("file_mb"), ".1f"),
                     _fmt(r.get("bits_per_weight"), ".2f"), _fmt(r.get("ppl"), ".3f"), _fmt(dppl, "+.2f"),
                     _fmt(r.get("kld"), ".5f"), _fmt(r.get("top1"), ".4f"), _fmt(r.get("prefill_tps"), ".1f"),
                     _fmt(r.get("decode_tps"), ".1f"), _fmt(r.get("ttft_ms"), ".0f"), _fmt(r.get("peak_rss_mb"), ".0f")])
    return table(body, ["ARTIFACT", "FORMAT", "QUANT", "MiB", "BPW", "PPL", "dPPL%", "KLD", "TOP1", "PREFILL t/s",
                        "DECODE t/s", "TTFT ms", "RSS MiB"])


def _task_table(rows: list[dict[str, Any]]) -> str:
    """A row per artifact and task: lm-eval's acc and acc_norm with their standard errors, and
    against the baseline the paired difference in points (with its standard error) and the
    flip rate; empty when no task was measured."""
    body = []
    for r in rows:
        prefixes = dict.fromkeys(k.split(".", 1)[0] for k in r if "." in k and k.endswith((".acc", ".acc_norm")))
        for p in prefixes:
            def f(name: str, spec: str, r: dict[str, Any] = r, p: str = p) -> str:
                return _fmt(r.get(f"{p}.{name}"), spec)

            main = "acc_norm" if f"{p}.acc_norm" in r else "acc"
            delta = f(f"{main}_delta", "+.2f")
            if delta != MISSING:
                delta += " ± " + f(f"{main}_delta_se", ".2f") + ("" if main == "acc_norm" else " (acc)")
            body.append([r.get("artifact") or r.get("label") or MISSING, p, f("n", ".0f"),
                         f("acc", ".4f") + " ± " + f("acc_stderr", ".4f"),
                         f("acc_norm", ".4f") + " ± " + f("acc_norm_stderr", ".4f"), delta,
                         _fmt(100 * r[f"{p}.flip_rate"], ".1f") if _num(r.get(f"{p}.flip_rate")) is not None else MISSING])
    if not body:
        return ""
    return "\n\n" + table(body, ["ARTIFACT", "TASK", "N", "ACC", "ACC_NORM", "PAIRED Δ pt", "FLIP%"])


@bench.command("compare")
@click.argument("refs", nargs=-1, required=True)
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the size/accuracy/speed plot (PNG) here.")
@click.option("--any-hardware", is_flag=True, help="Compare results from different machines too.")
@click.option("--target", help="The results measured on this fleet target (llmops bench --on); default: this machine's.")
@common
def bench_compare(refs: tuple[str, ...], plot: str | None, any_hardware: bool, target: str | None) -> None:
    """One table across formats from recorded results (dPPL% against the first REF), and a Pareto plot."""
    from llmops.app.bench_flow import run_compare

    r = run_compare(_state(), refs, plot, any_hardware, target)
    out(r, lambda d: _bench_table(d["rows"], against_first=True) + _task_table(d["rows"])
        + (f"\nplot: {d['plot']}" if d["plot"] else ""))
