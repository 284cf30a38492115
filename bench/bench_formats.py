"""Formats benchmark: every target of the SmolLM2 fixture through ``llmops bench``, and our
perplexity path against llama.cpp's own ``llama-perplexity`` on the same GGUF.

    python bench/bench_formats.py [--threads 2] [--chunks 16] [--runs 3] [--decode-tokens 64]
                                       [--targets gguf-f16,gguf-q8_0,gguf-q4,...] [--no-native]

1. Converts the fixture to each target (skipping targets whose converter is not installed),
   then runs ``llmops bench`` on all of them plus the fp32 source, with the source as the
   KL-divergence baseline: one table, the same hardware, one invocation.
2. Perplexity throughput: ``llmops.benchmarks.accuracy.evaluate`` on the Q4_K_M GGUF against
   llama.cpp's native ``llama-perplexity`` (built once with CMake from the llama-cpp-python
   source distribution's ``vendor/llama.cpp`` into the llmops cache; never part of the
   project), same context, chunks and threads; medians of ``--runs`` runs and their ratio.

3. llama.cpp speed: each GGUF's prefill and decode rates from ``llmops bench`` beside llama.cpp's
   own ``llama-bench`` (same build, flash attention on, decode measured after the prompt).

Prints markdown tables (the README's results table comes from here) and, with ``--json``,
the raw figures.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmops.app.reference import llama_cpp_tool

DEFAULT_TARGETS = "gguf-f16,gguf-q8_0,gguf-q4,onnx,onnx-int4,onnx-int4:rtn,gptq-4bit"
MISSING = "n/a"


def _num(v: object) -> float | None:
    """A finite number, or None for a missing metric (None, NaN, not a number)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def fmt(v: object, spec: str, suffix: str = "") -> str:
    """A table cell: "n/a" for a missing metric, never a number that stands in for it."""
    n = _num(v)
    return MISSING if n is None else format(n, spec) + suffix


def ratio(a: object, b: object) -> float | None:
    """a / b, or None when either side is missing (or b is 0): a ratio with a missing side is not computed."""
    x, y = _num(a), _num(b)
    return x / y if x is not None and y else None


def dppl_pct(ppl: object, base: object) -> float | None:
    r = ratio(ppl, base)
    return None if r is None else 100.0 * (r - 1.0)


def formats_row(name: str, r: dict[str, object], base_ppl: object) -> str:
    """One row of the formats table; ΔPPL % against ``base_ppl`` (the fp32 source's)."""
    return (f"| {name} | {r.get('backend') or MISSING} | {fmt(r.get('file_mb'), '.1f')} | "
            f"{fmt(r.get('bits_per_weight'), '.2f')} | {fmt(r.get('ppl'), '.3f')} | "
            f"{fmt(dppl_pct(r.get('ppl'), base_ppl), '+.2f')} | {fmt(r.get('kld'), '.4f')} | "
            f"{fmt(r.get('top1'), '.4f')} | {fmt(r.get('prefill_tps'), '.0f')} | {fmt(r.get('decode_tps'), '.1f')} | "
            f"{fmt(r.get('peak_rss_mb'), '.0f')} |")


def same_kernels(*no_repack: str) -> tuple[str, ...]:
    """The flags that make llama.cpp's tools run the kernels our runner runs: where llmops turns
    llama.cpp's repacking extra buffer types off (CPUs that report AMX, whose tile kernels fault
    under some hypervisors), the reference tool must too, or it dies with SIGILL."""
    from llmops.benchmarks.runner_llamacpp import extra_bufts_ok

    return () if extra_bufts_ok() else no_repack


def native_speed(binary: Path, gguf: Path, threads: int, runs: int, prompt: int, decode: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) from llama-bench: a ``prompt``-token prompt, and ``decode``
    tokens generated after that prompt (``-d``), as ``llmops bench`` decodes after its prompt."""
    out = []
    for args in (["-p", str(prompt), "-n", "0"], ["-p", "0", "-n", str(decode), "-d", str(prompt)]):
        p = subprocess.run([str(binary), "-m", str(gguf), "-t", str(threads), "-r", str(runs), "-fa", "1",
                            "-o", "json", *same_kernels("--repack", "0"), *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"llama-bench failed: {p.stderr[-2000:]}")
        out.append(float(json.loads(p.stdout)[0]["avg_ts"]))
    return out[0], out[1]


def native_perplexity(binary: Path, gguf: Path, text_file: Path, chunks: int,
                      threads: int) -> tuple[float, float | None]:
    """(seconds, perplexity) of llama-perplexity (None if it printed none); time includes its load, as ours does."""
    t0 = time.perf_counter()
    p = subprocess.run([str(binary), "-m", str(gguf), "-f", str(text_file), "-c", "512", "--chunks", str(chunks),
                        "-t", str(threads), "-b", "512", *same_kernels("-nr")], capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"llama-perplexity failed: {p.stderr[-2000:]}")
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", p.stdout + p.stderr)
    return secs, float(m.group(1)) if m else None


def ours_perplexity(gguf: Path, text: str, chunks: int, threads: int) -> tuple[float, float]:
    from llmops.benchmarks.accuracy import evaluate

    t0 = time.perf_counter()
    res = evaluate(gguf, text, chunks=chunks, threads=threads)
    return time.perf_counter() - t0, res["ppl_output"]


def convert_all(src: Path, targets: list[str], workdir: Path) -> dict[str, Path]:
    from llmops.app.converting import convert
    from llmops.core.errors import NotAvailable

    out: dict[str, Path] = {}
    for t in targets:
        dest = workdir / (f"{t}.gguf" if t.startswith("gguf") else t)
        try:
            print(f"converting to {t}", file=sys.stderr)
            out[t] = convert(src, t, dest, verify=False).output
        except NotAvailable as e:
            print(f"skipping {t}: {e}", file=sys.stderr)
    return out


def format_table(src: Path, arts: dict[str, Path], args: argparse.Namespace,
                 report: dict[str, object]) -> tuple[list[dict[str, object]], list[str]]:
    """Every target through one `llmops bench` invocation, printed as the README's results table."""
    cmd = [str(Path(sys.executable).with_name("llmops")), "--json", "bench", str(src), *map(str, arts.values()),
           "--baseline", str(src), "--threads", str(args.threads), "--chunks", str(args.chunks), "--runs",
           str(args.runs), "--decode-tokens", str(args.decode_tokens), "--no-record"]
    print("running: llmops bench <fp32 source> " + " ".join(arts), file=sys.stderr)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit(f"llmops bench failed ({p.returncode})")
    rows = json.loads(p.stdout)["rows"]
    names = ["fp32 (torch)", *arts]
    print(f"\n### Formats (SmolLM2-135M, {args.threads} threads, {args.chunks}×512 tokens, "
          f"median of {args.runs} runs, {args.decode_tokens} decode tokens)\n")
    print("| target | backend | MiB | bits/w | PPL | ΔPPL % | KLD | top-1 | prefill tok/s | decode tok/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base = rows[0].get("ppl")
    for name, r in zip(names, rows, strict=True):
        report["formats"].append({"target": name, **r})  # type: ignore[union-attr]
        print(formats_row(name, r, base))
    return rows, names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--targets", default=DEFAULT_TARGETS)
    ap.add_argument("--no-native", action="store_true", help="skip the llama-perplexity comparison")
    ap.add_argument("--only-perplexity", action="store_true",
                    help="only the perplexity path against llama-perplexity (on gguf-q4)")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from llmops.core.evaltext import evaluation_part, load_eval_text
    from llmops.app.fixtures import smollm2_checkpoint

    ev = load_eval_text()
    src = smollm2_checkpoint()
    with tempfile.TemporaryDirectory(prefix="llmops-bench-formats-", dir=args.workdir) as d:
        work = Path(d)
        targets = ["gguf-q4"] if args.only_perplexity else [t.strip() for t in args.targets.split(",") if t.strip()]
        arts = convert_all(src, targets, work)
        report: dict[str, object] = {"threads": args.threads, "chunks": args.chunks, "runs": args.runs,
                                     "decode_tokens": args.decode_tokens, "formats": []}
        rows, names = ([], []) if args.only_perplexity else format_table(src, arts, args, report)
        gguf = arts.get("gguf-q4")
        if gguf is not None and not args.no_native:
            binary = llama_cpp_tool("llama-perplexity")
            text_file = work / "eval.txt"
            text_file.write_text(evaluation_part(ev.text), encoding="utf-8")
            ntok, nat = [], []
            for _ in range(args.runs):
                nat.append(native_perplexity(binary, gguf, text_file, args.chunks, args.threads))
                ntok.append(ours_perplexity(gguf, ev.text, args.chunks, args.threads))
            t_ours = statistics.median(s for s, _ in ntok)
            t_nat = statistics.median(s for s, _ in nat)
            scored = args.chunks * 512
            report["perplexity_path"] = {"ours_s": t_ours, "native_s": t_nat, "ours_ppl": ntok[0][1],
                                         "native_ppl": nat[0][1], "throughput_ratio": t_nat / t_ours}
            print(f"\n### Perplexity path (Q4_K_M GGUF, {args.chunks}×512 tokens, {args.threads} threads, "
                  f"median of {args.runs}, load included)\n")
            print("| tool | seconds | tokens/s | PPL |\n|---|---|---|---|")
            print(f"| llama.cpp llama-perplexity | {t_nat:.2f} | {scored / t_nat:.0f} | {fmt(nat[0][1], '.4f')} |")
            print(f"| llmops (llama-cpp-python, child process) | {t_ours:.2f} | {scored / t_ours:.0f} | "
                  f"{fmt(ntok[0][1], '.4f')} |")
            print(f"\nthroughput ratio ours/native: {t_nat / t_ours:.2f}×")
        ggufs = {t: a for t, a in arts.items() if t.startswith("gguf")}
        if ggufs and rows and not args.no_native:
            lb = llama_cpp_tool("llama-bench")
            print(f"\n### llama.cpp speed: llmops bench against llama-bench on the same files ({args.threads} threads, "
                  f"512-token prompt, {args.decode_tokens} tokens decoded after it)\n")
            print("| target | prefill tok/s llmops | llama-bench | ratio | decode tok/s llmops | llama-bench | ratio |")
            print("|---|---|---|---|---|---|---|")
            speeds = {}
            for name, path in ggufs.items():
                pp, tg = native_speed(lb, path, args.threads, args.runs, 512, args.decode_tokens)
                r = rows[names.index(name)]
                speeds[name] = {"native_prefill_tps": pp, "native_decode_tps": tg}
                print(f"| {name} | {fmt(r.get('prefill_tps'), '.0f')} | {fmt(pp, '.0f')} | "
                      f"{fmt(ratio(r.get('prefill_tps'), pp), '.2f', '×')} | {fmt(r.get('decode_tps'), '.1f')} | "
                      f"{fmt(tg, '.1f')} | {fmt(ratio(r.get('decode_tps'), tg), '.2f', '×')} |")
            report["llama_bench"] = speeds
        if args.json:
            print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
