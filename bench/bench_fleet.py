"""What a fleet costs: ``llmops bench --on`` a Ray cluster against a local ``llmops bench`` of the
same artifact, and ``llmops sweep`` of SmolLM2 into four formats on three local nodes against the
same conversions and benchmarks run one after another.

All on this machine, in one invocation: a cluster of one node (the overhead) or three nodes on
loopback addresses (the sweep), started with ``llmops node start`` and stopped at the end. The
overhead runs are interleaved (local, fleet, local, ...) and their medians compared: the fixed
cost is measured on a load-only job (``--metrics memory``), the relative cost on the full
benchmark. Targets: at most 2 s fixed, at most +10 % on SmolLM2 Q4_K_M. The sweep figure is
reported beside the sequential one; on one 2-core host three nodes share the same two cores, so
the sweep's gain here is what overlapping conversions with registration and benchmarks buys.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLMOPS = str(Path(sys.executable).with_name("llmops"))


def run(env: dict[str, str], *args: object, check: bool = True) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    r = subprocess.run([LLMOPS, *map(str, args)], env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"llmops {' '.join(map(str, args))} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0, r


def start_node(env: dict[str, str], *args: str) -> dict:
    _, r = run(env, "--json", "node", "start", *args)
    return json.loads(r.stdout)


def overhead(env: dict[str, str], ref: str, runs: int) -> dict:
    head = start_node(env, "--target", "here", "--head", "--node-ip", "127.0.0.61")
    addr = head["address"]
    light = ("--metrics", "memory")
    full = ("--chunks", "16", "--runs", "3")
    out: dict[str, list[float]] = {"local_light": [], "fleet_light": [], "local_full": [], "fleet_full": []}
    try:
        run(env, "bench", ref, "--on", addr, "--target", "here", *light, "--no-record")  # warm the node's worker
        for i in range(runs):
            for kind, extra in (("light", light), ("full", full)):
                pair = [("local", ()), ("fleet", ("--on", addr, "--target", "here"))]
                for side, where in (pair if i % 2 == 0 else pair[::-1]):
                    secs, _ = run(env, "bench", ref, *extra, *where, "--no-record")
                    out[f"{side}_{kind}"].append(secs)
                    print(f"  {side:5s} {kind:5s} {secs:6.2f} s", file=sys.stderr)
    finally:
        run(env, "node", "stop", check=False)
    med = {k: statistics.median(v) for k, v in out.items()}
    return {"runs": runs, "medians_s": med, "fixed_s": med["fleet_light"] - med["local_light"],
            "full_ratio": med["fleet_full"] / med["local_full"]}


def sweep(env: dict[str, str], source: Path, formats: list[str]) -> dict:
    head = start_node(env, "--target", "t1", "--head", "--node-ip", "127.0.0.62")
    addr = head["address"]
    start_node(env, "--target", "t2", "--address", addr, "--node-ip", "127.0.0.63")
    start_node(env, "--target", "t3", "--address", addr, "--node-ip", "127.0.0.64")
    opts = ("--chunks", "16", "--runs", "3")
    try:
        swept, r = run(env, "--json", "sweep", source, "--to", ",".join(formats), "--register", "swept", "--on", addr,
                       "--all-targets", *opts)
        d = json.loads(r.stdout)
    finally:
        run(env, "node", "stop", check=False)
    # the same work one command after another: convert and register each format, then benchmark
    # every version once per target (three local runs)
    t0 = time.perf_counter()
    refs = []
    with tempfile.TemporaryDirectory(dir=env["LLMOPS_STORE"]) as work:
        for f in formats:
            out = Path(work) / (f"{f}.gguf" if f.startswith("gguf") else f)
            _, rr = run(env, "--json", "convert", source, "--to", f, "-o", out, "--register", "sequential")
            refs.append(json.loads(rr.stdout)["registered"]["uri"])
    for ref in refs:
        for _ in range(3):
            run(env, "bench", ref, *opts, "--baseline", source)
    sequential = time.perf_counter() - t0
    return {"formats": formats, "sweep_s": swept, "sequential_s": sequential, "ratio": swept / sequential,
            "conversions": [(c["format"], c["status"]) for c in d["conversions"]],
            "bench_jobs_ok": sum(b["status"] == "ok" for b in d["bench"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs per side (medians)")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--formats", default="gguf-q4,gguf-q8_0,onnx-int4,gptq-4bit")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmops-bench-fleet-") as tmp:
        root = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k not in ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI")}
        env.update(LLMOPS_STORE=str(root / "store"), LLMOPS_RAY_TOKEN_FILE=str(root / "token"))
        env.pop("LLMOPS_RAY_ADDRESS", None)
        _, r = run(env, "--json", "fixtures", "smollm2")
        source = Path(json.loads(r.stdout)["path"])
        q4 = root / "smollm2-q4_k_m.gguf"
        _, r = run(env, "--json", "convert", source, "--to", "gguf-q4", "-o", q4, "--no-verify", "--register", "smollm2-q4")
        ref = json.loads(r.stdout)["registered"]["uri"]
        result: dict = {}
        if not args.skip_overhead:
            print(f"bench --on against a local bench of {ref} ({args.runs} interleaved runs each)", file=sys.stderr)
            o = overhead(env, ref, args.runs)
            m = o["medians_s"]
            print(f"load-only (--metrics memory): local {m['local_light']:.2f} s, --on {m['fleet_light']:.2f} s: "
                  f"fixed cost {o['fixed_s']:+.2f} s (target <= 2 s: {'MET' if o['fixed_s'] <= 2 else 'NOT MET'})")
            print(f"full bench (16 chunks, 3 timed runs): local {m['local_full']:.2f} s, --on {m['fleet_full']:.2f} s: "
                  f"{o['full_ratio']:.3f}x (target <= 1.10x: {'MET' if o['full_ratio'] <= 1.10 else 'NOT MET'})")
            result["overhead"] = o
        if not args.skip_sweep:
            formats = [f.strip() for f in args.formats.split(",") if f.strip()]
            s = sweep(env, source, formats)
            print(f"sweep of {', '.join(formats)} on 3 local nodes: {s['sweep_s']:.1f} s; the same conversions "
                  f"and 3 benchmarks of each one after another: {s['sequential_s']:.1f} s ({s['ratio']:.2f}x); "
                  f"conversions {s['conversions']}, {s['bench_jobs_ok']} benchmark jobs ok")
            result["sweep"] = s
        print(json.dumps(result))


if __name__ == "__main__":
    main()
