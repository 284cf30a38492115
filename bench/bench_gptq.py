"""GPTQ conversion benchmark: ``llmops convert --to gptq-4bit`` against GPTQModel called directly.

    python bench/bench_gptq.py [--runs 1] [--threads 2] [--group-size 64]

Both sides quantize the SmolLM2 fixture on the CPU with the same settings (4 bits, the given
group size, no act-order, symmetric) and the same calibration token windows (the default:
32 samples of 256 tokens from the eval text's calibration part), each in a fresh process,
interleaved, ``--runs`` times. The direct side is the few lines a user would write by hand:
``GPTQModel.load`` → ``quantize`` → ``save``; ours adds what llmops does around it (the
child process, checks, atomic output, float16 storage of the kept tensors), but not
verification (``--no-verify``), which the direct side has no counterpart for.

Reports wall time and peak RSS (of the whole process tree) per side, medians, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from measure import measured

DIRECT = r"""
import json, sys, torch
from gptqmodel import GPTQModel, QuantizeConfig
job = json.load(open(sys.argv[1]))
torch.set_num_threads(job["threads"])
qc = QuantizeConfig(bits=4, group_size=job["group_size"], desc_act=False, sym=True, device="cpu",
                    pack_impl="original")
model = GPTQModel.load(job["source"], qc, dtype=torch.float32)
model.quantize([{"input_ids": s, "attention_mask": [1] * len(s)} for s in job["samples"]], batch_size=1)
model.save(job["output"])
"""


def _timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one command; cwd: GPTQModel writes its ./logs folder wherever it runs."""
    return measured(cmd, cwd, env)


def median_rss_mb(runs: list[tuple[float, int]]) -> str:
    return f"{statistics.median(rss for _, rss in runs) / 1e6:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from llmops.converters.gptq.calibration import build_calibration
    from llmops.app.fixtures import smollm2_checkpoint

    src = smollm2_checkpoint()
    calib = build_calibration(AutoTokenizer.from_pretrained(src), {}, lambda _m: None)
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
    llmops = str(Path(sys.executable).with_name("llmops"))
    ours, direct = [], []
    with tempfile.TemporaryDirectory(prefix="llmops-bench-gptq-") as d:
        work = Path(d)
        job = work / "direct.json"
        for i in range(args.runs):
            job.write_text(json.dumps({"source": str(src), "samples": calib.samples, "threads": args.threads,
                                       "group_size": args.group_size, "output": str(work / f"direct-{i}")}))
            print(f"run {i + 1}/{args.runs}: GPTQModel directly", file=sys.stderr)
            direct.append(_timed([sys.executable, "-c", DIRECT, str(job)], env, work))
            print(f"run {i + 1}/{args.runs}: llmops convert --to gptq-4bit", file=sys.stderr)
            ours.append(_timed([llmops, "convert", str(src), "--to", "gptq-4bit", "--group-size",
                                str(args.group_size), "--threads", str(args.threads), "--no-verify",
                                # the same work as the direct call: llmops' scale search and
                                # sensitivity pass (on by default) are GPTQModel options it is not given
                                "--mse", "0", "--no-keep-outliers",
                                "-o", str(work / f"ours-{i}")], env, work))
    t_o, t_d = statistics.median(s for s, _ in ours), statistics.median(s for s, _ in direct)
    print(f"\n### GPTQ 4-bit g{args.group_size} on CPU (SmolLM2-135M, {len(calib.samples)}×"
          f"{calib.tokens_per_sample} calibration tokens, {args.threads} threads, median of {args.runs})\n")
    print("| side | seconds | peak RSS MB |\n|---|---|---|")
    print(f"| GPTQModel directly | {t_d:.1f} | {median_rss_mb(direct)} |")
    print(f"| llmops convert --to gptq-4bit | {t_o:.1f} | {median_rss_mb(ours)} |")
    print(f"\ntime ratio llmops/direct: {t_o / t_d:.2f}×")
    if args.json:
        print(json.dumps({"ours": ours, "direct": direct, "ratio": t_o / t_d}))


if __name__ == "__main__":
    main()
