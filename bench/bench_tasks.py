"""Task accuracy benchmark: SmolLM2 across formats on lm-eval's multiple-choice tasks, and the
scoring rate of llmops' runners against lm-eval's own ``hf`` model.

    python bench/bench_tasks.py [--limit 100] [--tasks hellaswag,piqa,arc_easy] [--threads 2]
                                [--rate-questions 20] [--rate-rounds 3] [--skip-table] [--skip-rate] [--json]

1. Converts the SmolLM2 fixture (fp32) to Q8_0, Q4_K_M, Q4_K_M with an importance matrix
   (computed from the first 64 KiB of the eval text's calibration part, which evaluation never
   reads), onnx-int4 and gptq-4bit, once: the outputs are kept in the llmops cache (``bench-tasks/``) and reused.
2. One ``llmops bench SRC ART... --baseline SRC --metrics tasks`` over all of them: the first
   ``--limit`` questions of each task (the same questions for every model), acc_norm with its
   standard error, the paired difference against fp32 in points with its standard error, and
   the flip rate. Prints the README's table.
3. Scoring rate: the same first ``--rate-questions`` HellaSwag questions through lm-eval's
   ``hf`` model (fp32, CPU, batch size 1 as its default, and 4) and through llmops' ``RunnerLM``
   over the torch runner and over the GGUF files, all in one process taking turns for
   ``--rate-rounds`` rounds (a shared machine's speed drifts by minutes: each round's scorers
   are neighbours in time), each timing only its ``loglikelihood`` call (the same requests,
   tokenization included; model load excluded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TARGETS = {  # row name -> (target, extra convert arguments)
    "Q8_0": ("gguf-q8_0", []),
    "Q4_K_M": ("gguf-q4", []),
    "Q4_K_M + imatrix": ("gguf-q4", ["--imatrix", "{calib}"]),
    "onnx-int4": ("onnx-int4", []),
    "gptq-4bit": ("gptq-4bit", []),
}
LLMOPS = str(Path(sys.executable).with_name("llmops"))
CALIBRATION_CHARS = 64 * 1024  # of the eval text's calibration part, for the importance matrix


def convert_all(src: Path, workdir: Path, threads: int) -> dict[str, Path]:
    from llmops.core.evaltext import calibration_part, load_eval_text

    calib = workdir / "calibration.txt"
    if not calib.is_file():  # its first ~32 chunks of 512 tokens: the whole part takes 20 min on 2 cores
        calib.write_text(calibration_part(load_eval_text().text)[0][:CALIBRATION_CHARS], encoding="utf-8")
    out: dict[str, Path] = {}
    for name, (target, extra) in TARGETS.items():
        dest = workdir / (name.replace(" + ", "-").replace(" ", "-") + (".gguf" if target.startswith("gguf") else ""))
        if not dest.exists():
            print(f"converting to {name}", file=sys.stderr)
            args = [a.format(calib=calib) for a in extra]
            subprocess.run([LLMOPS, "convert", str(src), "--to", target, "-o", str(dest), "--no-verify",
                            "--threads", str(threads), *args], check=True)
        out[name] = dest
    return out


def table(src: Path, arts: dict[str, Path], args: argparse.Namespace) -> dict[str, object]:
    cmd = [LLMOPS, "--json", "bench", str(src), *map(str, arts.values()), "--baseline", str(src), "--metrics",
           "tasks", "--tasks", args.tasks, "--limit", str(args.limit), "--threads", str(args.threads), "--no-record"]
    print("$ " + " ".join(cmd), file=sys.stderr)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    rows = json.loads(done.stdout)["rows"]
    names = ["fp32 (source)", *arts]
    tasks = args.tasks.split(",")
    head = "| model | backend | " + " | ".join(f"{t} acc_norm | Δ pt ± SE | flips" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (2 + 3 * len(tasks))]
    for name, r in zip(names, rows):
        cells = [name, str(r["backend"])]
        for t in tasks:
            cells.append(f"{r[f'{t}.acc_norm']:.4f} ± {r[f'{t}.acc_norm_stderr']:.4f}")
            if name.startswith("fp32"):
                cells += ["(baseline)", "(baseline)"]
            else:
                cells += [f"{r[f'{t}.acc_norm_delta']:+.2f} ± {r[f'{t}.acc_norm_delta_se']:.2f}",
                          f"{100 * r[f'{t}.flip_rate']:.1f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(f"\n{args.limit} questions per task (the first of each validation split), {args.threads} threads, "
          f"one invocation: {seconds:.0f} s")
    return {"rows": rows, "seconds": seconds, "command": " ".join(cmd)}


RATE = r"""
import json, sys, time
from llmops.benchmarks.tasks import TaskOptions, TaskSuite
n, rounds, threads, src = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ggufs = dict(a.split("=", 1) for a in sys.argv[5:])
suite = TaskSuite(TaskOptions(tasks=("hellaswag",), limit=n))
task = suite.load()["tasks"]["hellaswag"]
task.build_all_requests(limit=n, rank=0, world_size=1)
requests = list(task.instances)
import torch
torch.set_num_threads(threads)
from lm_eval.models.huggingface import HFLM
from llmops.benchmarks.lm_eval_model import RunnerLM
from llmops.benchmarks.runners import RunnerSpec, make_runner
def ours(backend, path):
    spec = RunnerSpec(backend, path, 2048, threads)
    return RunnerLM(spec, runner=make_runner(spec))
scorers = {"lm-eval hf, batch 1": HFLM(pretrained=src, dtype="float32", device="cpu", batch_size=1),
           "lm-eval hf, batch 4": HFLM(pretrained=src, dtype="float32", device="cpu", batch_size=4),
           "llmops torch (fp32)": ours("torch", src)}
scorers.update({f"llmops llama.cpp ({k})": ours("llama.cpp", v) for k, v in ggufs.items()})
for lm in scorers.values():
    lm.loglikelihood(requests[:8])  # warm-up: first-call allocations and kernel choices
seconds = {k: [] for k in scorers}
scores = {}
for r in range(rounds):  # the scorers take turns, so the machine's drift falls on all of them
    for name, lm in scorers.items():
        t0 = time.perf_counter()
        scores[name] = lm.loglikelihood(requests)
        seconds[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}: {name} {n / seconds[name][-1]:.2f} questions/s", file=sys.stderr, flush=True)
print(json.dumps({"questions": n, "requests": len(requests), "seconds": seconds, "scores": scores}), flush=True)
import os
os._exit(0)  # llama-cpp-python's finalizers raise at interpreter shutdown; nothing is left to clean up
"""


def rates(src: Path, arts: dict[str, Path], args: argparse.Namespace) -> dict[str, object]:
    """Every scorer in one process, in turns: per scorer the median rate over the rounds, and
    its ratio to lm-eval's hf model (batch 1) taken round by round (neighbours in time), median."""
    import statistics

    ggufs = [f"{k}={arts[k]}" for k in ("Q8_0", "Q4_K_M") if k in arts]
    cmd = [sys.executable, "-c", RATE, str(args.rate_questions), str(args.rate_rounds), str(args.threads), str(src),
           *ggufs]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    n, secs = r["questions"], r["seconds"]
    base = "lm-eval hf, batch 1"
    ref = [s[0] for s in r["scores"][base]]
    print("\n| scorer | questions/s (median of rounds) | × lm-eval hf batch 1 (median of per-round ratios) "
          "| max abs Δ loglikelihood vs hf |")
    print("|---|---|---|---|")
    out: dict[str, object] = {}
    for name, times in secs.items():
        qps = n / statistics.median(times)
        ratio = statistics.median(b / t for b, t in zip(secs[base], times))
        diff = max(abs(a[0] - b) for a, b in zip(r["scores"][name], ref))
        print(f"| {name} | {qps:.2f} | {ratio:.2f}× | {diff:.2e} |")
        out[name] = {"questions_per_s": qps, "ratio_to_hf_batch1": ratio, "seconds": times, "max_abs_diff": diff}
    print(f"\nthe first {n} HellaSwag validation questions ({r['requests']} requests), {args.threads} threads, "
          f"{args.rate_rounds} rounds in turns, loglikelihood calls only (after a warm-up of 8 requests)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--tasks", default="hellaswag,piqa,arc_easy")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rate-questions", type=int, default=20)
    ap.add_argument("--rate-rounds", type=int, default=3)
    ap.add_argument("--skip-table", action="store_true")
    ap.add_argument("--skip-rate", action="store_true")
    ap.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    args = ap.parse_args()
    from llmops.app.fixtures import smollm2_checkpoint
    from llmops.core.settings import cache_dir

    t0 = time.perf_counter()
    src = smollm2_checkpoint()
    workdir = cache_dir() / "bench-tasks"
    workdir.mkdir(parents=True, exist_ok=True)
    arts = convert_all(src, workdir, args.threads)
    report: dict[str, object] = {}
    if not args.skip_table:
        report["table"] = table(src, arts, args)
    if not args.skip_rate:
        report["rate"] = rates(src, arts, args)
    print(f"\nbench_tasks: {time.perf_counter() - t0:.0f} s in all")
    if args.json:
        print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
