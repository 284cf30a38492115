"""Serving benchmark: `llmops serve` under concurrent clients against llama.cpp's own
`llama-server` and against itself serialised; a single stream against llama-cpp-python called
in-process; ONNX batching; the server's memory during a hot swap.

    python bench/bench_serve.py [--runs 5] [--rounds 2] [--threads 2] [--max-tokens 128]
                                [--sections single,concurrency,onnx,swap] [--workdir DIR] [--json OUT]

On SmolLM2-135M-Instruct (the fixture checkpoint, converted here to gguf-q4 = Q4_K_M, gguf-f16,
gguf-q8_0 and onnx-int4, registered in a temporary store), all with ``--threads`` threads:

* **concurrency** (per GGUF, Q4_K_M and F16): 1, 2, 4 and 8 concurrent streaming clients, each
  sending two chat requests of ~200 prompt tokens in a row (first words varied so no prompt
  cache helps), greedy, ``--max-tokens`` each; aggregate completion tokens/s over the wall time
  and time to first token (p50, p95) for (1) ``llmops serve --parallel 1`` (one request at a
  time, as the server was before batching), (2) ``llama-server --parallel 8 --kv-unified``
  (llama.cpp's server, built from the llama.cpp llama-cpp-python vendors, called directly) and
  (3) ``llmops serve`` with its defaults (continuous batching, 8 sequences), tracing on. The
  three servers run side by side and the measurements are interleaved, ``--rounds`` times;
  medians. Every client is the same few lines of ``http.client`` (bench/serve_load.py).
* **onnx**: onnx-int4 through ``llmops serve`` (onnxruntime-genai's engine, 4 sequences) with 1
  and 4 clients, and ``--parallel 1`` beside it.
* **single**: one client, llama-cpp-python's ``Llama.create_chat_completion(stream=True)`` with
  the GGUF's own chat template in this process against ``llmops serve`` tracing on and
  ``--no-trace``; interleaved in a rotating order ``--runs`` times; the texts must be identical.
* **swap**: a server follows ``models:/bench@production`` while a client streams; the alias moves
  v1 (Q4_K_M) → v2 (Q8_0) → v1 … ``--runs`` times: RSS before, peak during, after; failed
  requests (must be 0).

Prints markdown tables and, with ``--json``, writes every figure. A benchmark, not a test: it
asserts nothing about times. Run it on an otherwise idle machine: it prints the load average
before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import (  # noqa: E402
    CLIENTS,
    RUNNING,
    LlamaServer,
    Server,
    children,
    concurrent,
    die_with_parent,
    free_port,
    loadavg,
    median,
    report,
    rss_kib,
)

PROMPT = (
    "Robert Boulter is an English film, television and theatre actor. He had a guest-starring role on the "
    "television series The Bill in 2000. This was followed by a starring role in the play Herons written by "
    "Simon Stephens, which was performed in 2001 at the Royal Court Theatre. He had a guest role in the "
    "television series Judge John Deed in 2002. In 2004 Boulter landed a role as Craig in the episode Teddy's "
    "Story of the television series The Long Firm; he starred alongside actors Mark Strong and Derek Jacobi. "
    "He was cast in the 2005 theatre productions of the Philip Ridley play Mercury Fur, which was performed at "
    "the Drum Theatre in Plymouth and the Menier Chocolate Factory in London. Write a long biography of him."
)


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def stream_served(client, prompt: str, max_tokens: int) -> tuple[float, float, int, str]:  # noqa: ANN001
    """(ttft s, total s, completion tokens, text) of one streamed chat completion through the server."""
    t0 = time.perf_counter()
    first = None
    parts: list[str] = []
    tokens = 0
    for chunk in client.chat.completions.create(model="bench", messages=messages(prompt), max_tokens=max_tokens,
                                                temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    t1 = time.perf_counter()
    return (first or t1) - t0, t1 - t0, tokens, "".join(parts)


def stream_inprocess(llm, prompt: str, max_tokens: int) -> tuple[float, float, str]:  # noqa: ANN001
    """The same through ``Llama.create_chat_completion(stream=True)`` with the GGUF's own chat template."""
    t0 = time.perf_counter()
    first = None
    parts: list[str] = []
    for chunk in llm.create_chat_completion(messages(prompt), max_tokens=max_tokens, temperature=0, stream=True):
        text = chunk["choices"][0]["delta"].get("content")
        if text:
            if first is None:
                first = time.perf_counter()
            parts.append(text)
    t1 = time.perf_counter()
    return (first or t1) - t0, t1 - t0, "".join(parts)


def swap_memory(env: dict[str, str], workdir: Path, runs: int, threads: int) -> dict[str, Any]:
    from llmops.app.cli import main

    assert main(["promote", "bench", "1"]) == 0  # start from v1 whatever an earlier run left
    server = Server(env, "models:/bench@production", "--threads", str(threads), "--poll", "0.2",
                    log=workdir / "serve-swap.log")
    pid = server.proc.pid
    stop = threading.Event()
    failures: list[str] = []
    served = [0]

    def client_loop() -> None:
        c = server.client()
        while not stop.is_set():
            try:
                stream_served(c, PROMPT, 16)
                served[0] += 1
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{type(exc).__name__}: {exc}")

    t = threading.Thread(target=client_loop, daemon=True)
    t.start()
    time.sleep(3)
    before = rss_kib(pid)
    peaks, afters, seconds = [], [], []
    version = "1"
    for i in range(runs):
        target = "2" if version == "1" else "1"
        samples: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(rss_kib(pid))
                time.sleep(0.02)

        st = threading.Thread(target=sample, daemon=True)
        st.start()
        if target == "2":
            rc = main(["promote", "bench", "2"])
        else:
            rc = main(["rollback", "bench", "--reason", f"bench swap {i}"])
        assert rc == 0
        deadline = time.time() + 120
        while time.time() < deadline and server.health()["version"] != target:
            time.sleep(0.05)
        time.sleep(1.5)  # the old version unloads when its last request ends
        done.set()
        st.join()
        version = target
        peaks.append(max(samples))
        afters.append(rss_kib(pid))
        seconds.append(server.health()["last_swap"]["seconds"])
    stop.set()
    t.join(60)
    hwm = rss_kib(pid, "VmHWM")
    writer = sum(rss_kib(c) for c in children(pid))  # the trace writer process
    server.stop()
    mib = 1024.0
    return {"rss_before_mib": before / mib, "peak_during_swap_mib": [p / mib for p in peaks],
            "rss_after_mib": [a / mib for a in afters], "vmhwm_mib": hwm / mib, "swap_seconds": seconds,
            "requests_during_swaps": served[0], "failed_requests": len(failures), "failures": failures[:3],
            "trace_writer_rss_mib": writer / mib}


def single_stream(env: dict[str, str], workdir: Path, v1: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One client: llama-cpp-python in this process against llmops serve, tracing on and off."""
    n_ctx = "2048"
    traced = Server(env, "models:/bench/1", "--threads", str(args.threads), "--ctx", n_ctx,
                    log=workdir / "serve-traced.log")
    plain = Server(env, "models:/bench/1", "--threads", str(args.threads), "--ctx", n_ctx, "--no-trace",
                   log=workdir / "serve-plain.log")
    import llama_cpp
    from llmops.benchmarks.runner_llamacpp import _model_params, extra_bufts_ok

    # the same llama.cpp settings as the server's engine (n_batch 512, flash attention, the CPU
    # buffer types it picks)
    with _model_params(use_extra_bufts=extra_bufts_ok()):
        llm = llama_cpp.Llama(str(v1), n_ctx=int(n_ctx), n_batch=512, n_threads=args.threads,
                              n_threads_batch=args.threads, flash_attn=True, verbose=False,
                              chat_format="chat_template.default")
    clients = {"traced": traced.client(), "plain": plain.client()}
    res: dict[str, dict[str, list[float]]] = {k: {"ttft": [], "tps": [], "tokens": []} for k in ("inproc", "traced", "plain")}
    mismatches = 0
    order = ["inproc", "traced", "plain"]
    stream_inprocess(llm, "w. " + PROMPT, 8)  # warm-up: each side once
    for c in clients.values():
        stream_served(c, "w. " + PROMPT, 8)
    for i in range(args.runs):
        prompt = f"{i + 1}. {PROMPT}"
        texts: dict[str, str] = {}
        tokens = None
        for side in order[i % 3:] + order[:i % 3]:
            if side == "inproc":
                ttft, total, text = stream_inprocess(llm, prompt, args.max_tokens)
                res[side]["ttft"].append(ttft)
                res[side]["_total"] = res[side].get("_total", []) + [total]
            else:
                ttft, total, n, text = stream_served(clients[side], prompt, args.max_tokens)
                tokens = n
                res[side]["ttft"].append(ttft)
                res[side]["tps"].append(n / total)
                res[side]["tokens"].append(n)
            texts[side] = text
        # the same greedy text on every side: the served token count is the in-process one too
        res["inproc"]["tps"].append(tokens / res["inproc"]["_total"][-1])
        res["inproc"]["tokens"].append(tokens)
        mismatches += len(set(texts.values())) != 1
        print(f"run {i + 1}: " + ", ".join(f"{k} ttft {res[k]['ttft'][-1] * 1000:.0f} ms tps {res[k]['tps'][-1]:.1f}"
                                            for k in order), file=sys.stderr)
    llm.close()
    traced.stop()
    plain.stop()
    med = {k: {"ttft_ms": median(v["ttft"]) * 1000, "tokens_per_s": median(v["tps"])} for k, v in res.items()}
    return {"median": med, "text_mismatches": mismatches, "completion_tokens": res["traced"]["tokens"],
            "raw": {k: dict(v) for k, v in res.items()}}


def concurrency(env: dict[str, str], workdir: Path, name: str, model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """1, 2, 4, 8 clients against the serialised server, llama-server and llmops serve, interleaved."""
    from llmops.app.reference import llama_cpp_tool

    binary = llama_cpp_tool("llama-server")
    ctx = 2048
    servers: dict[str, Any] = {
        "serial": Server(env, f"models:/{name}/1", "--threads", str(args.threads), "--ctx", str(ctx), "--parallel", "1",
                         "--max-queue", "64", log=workdir / f"serve-{name}-serial.log"),
        "llama-server": LlamaServer(binary, model, free_port(), threads=args.threads, parallel=8, ctx_per_seq=ctx,
                                    log=workdir / f"llama-server-{name}.log", preexec=die_with_parent),
        "llmops": Server(env, f"models:/{name}/1", "--threads", str(args.threads), "--ctx", str(ctx), "--parallel", "8",
                         "--max-queue", "64", log=workdir / f"serve-{name}-batched.log"),
    }
    models = {"serial": name, "llama-server": "model", "llmops": name}
    out: dict[str, dict[int, list[dict[str, Any]]]] = {k: {c: [] for c in CLIENTS} for k in servers}
    for side, srv in servers.items():  # warm-up at full length (first-use allocations)
        concurrent(srv.port, models[side], 2, 1, args.max_tokens, PROMPT, "warm")
    for r in range(args.rounds):
        for c in CLIENTS:
            sides = list(servers)
            for side in sides[r % 3:] + sides[:r % 3]:
                m = concurrent(servers[side].port, models[side], c, 2, args.max_tokens, PROMPT, f"r{r}c{c}")
                out[side][c].append(m)
                print(f"{name} round {r + 1}, {c} clients, {side}: {m['tokens_per_s']:.1f} tok/s, ttft p95 "
                      f"{m['ttft_p95_ms']:.0f} ms, {m['failures']} failed", file=sys.stderr)
    for srv in servers.values():
        srv.stop()
    summary = {side: {c: {"tokens_per_s": median([m["tokens_per_s"] for m in ms]),
                          "ttft_p50_ms": median([m["ttft_p50_ms"] for m in ms]),
                          "ttft_p95_ms": median([m["ttft_p95_ms"] for m in ms]),
                          "failures": sum(m["failures"] for m in ms)} for c, ms in per.items()}
               for side, per in out.items()}
    return {"summary": summary, "raw": out}


def onnx_section(env: dict[str, str], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    servers = {"parallel 4": Server(env, "models:/bench-onnx/1", "--threads", str(args.threads), "--parallel", "4",
                                    log=workdir / "serve-onnx-batched.log"),
               "parallel 1": Server(env, "models:/bench-onnx/1", "--threads", str(args.threads), "--parallel", "1",
                                    log=workdir / "serve-onnx-serial.log")}
    out: dict[str, dict[int, list[float]]] = {k: {1: [], 4: []} for k in servers}
    for srv in servers.values():  # warm-up at full length, alone and batched (first-use allocations)
        for c in (1, 4):
            concurrent(srv.port, "bench-onnx", c, 1, args.max_tokens, PROMPT, f"warm{c}")
    for r in range(args.rounds):
        for c in (1, 4):
            for side, srv in (list(servers.items())[::-1] if r % 2 else servers.items()):
                m = concurrent(srv.port, "bench-onnx", c, 2, args.max_tokens, PROMPT, f"r{r}c{c}")
                out[side][c].append(m["tokens_per_s"])
                print(f"onnx round {r + 1}, {c} clients, {side}: {m['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    for srv in servers.values():
        srv.stop()
    return {k: {c: median(v) for c, v in per.items()} for k, per in out.items()}




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--sections", default="single,concurrency,onnx,swap")
    ap.add_argument("--workdir")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    from llmops.app.converting import convert
    from llmops.app.fixtures import smollm2_checkpoint

    load_before = loadavg()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="llmops-bench-serve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = smollm2_checkpoint(progress=lambda m: print(m, file=sys.stderr))
    files = {"q4_k_m": ("gguf-q4_k_m", workdir / "smollm2-q4_k_m.gguf"), "q8_0": ("gguf-q8_0", workdir / "smollm2-q8_0.gguf"),
             "f16": ("gguf-f16", workdir / "smollm2-f16.gguf"), "onnx": ("onnx-int4", workdir / "smollm2-onnx-int4")}
    for target, path in files.values():
        if not path.exists():
            convert(ckpt, target, path, verify=False)

    store = workdir / "store"
    env = {k: v for k, v in os.environ.items() if k not in ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI")}
    env["LLMOPS_STORE"] = str(store)
    os.environ["LLMOPS_STORE"] = str(store)
    os.environ.pop("LLMOPS_DATABASE_URL", None)
    from llmops.app.cli import main as cli

    if not (store / "llmops.db").exists():
        for key in ("q4_k_m", "q8_0"):
            assert cli(["models", "register", str(files[key][1]), "--name", "bench"]) == 0
        assert cli(["promote", "bench", "1"]) == 0
        assert cli(["models", "register", str(files["f16"][1]), "--name", "bench-f16"]) == 0
        assert cli(["models", "register", str(files["onnx"][1]), "--name", "bench-onnx"]) == 0

    out: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "threads": args.threads, "max_tokens": args.max_tokens,
                           "runs": args.runs, "rounds": args.rounds, "load_before": load_before}
    if "single" in sections:
        out["single_stream"] = single_stream(env, workdir, files["q4_k_m"][1], args)
    if "concurrency" in sections:
        out["concurrency"] = {"Q4_K_M": concurrency(env, workdir, "bench", files["q4_k_m"][1], args),
                              "F16": concurrency(env, workdir, "bench-f16", files["f16"][1], args)}
    if "onnx" in sections:
        out["onnx"] = onnx_section(env, workdir, args)
    if "swap" in sections:
        out["swap"] = swap_memory(env, workdir, args.runs, args.threads)
    out["load_after"] = loadavg()
    report(out, files, args, PROMPT)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    import atexit

    atexit.register(lambda: [s.stop() for s in RUNNING])
    main()
