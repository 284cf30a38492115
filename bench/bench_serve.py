"""Serving benchmark: `llmops serve` against llama-cpp-python called in-process, tracing on and off,
and the server's memory during a hot swap.

    python bench/bench_serve.py [--runs 5] [--threads 2] [--max-tokens 128] [--workdir DIR] [--json OUT]

On SmolLM2-135M-Instruct (the fixture checkpoint, converted here to gguf-q4 = Q4_K_M for v1 and
gguf-q8_0 for v2, both registered in a temporary store):

* **single stream**: one client, a chat request of ~200 tokens (its first words varied per run
  so no prompt cache helps), greedy decoding of up to ``--max-tokens`` tokens, streamed. Time to
  first token (first text chunk) and output tokens/s (completion tokens over the whole request),
  for llama-cpp-python's ``Llama.create_chat_completion(stream=True)`` with the GGUF's own chat
  template (``chat_format="chat_template.default"``) in this process, for
  ``llmops serve`` with tracing on, and with ``--no-trace``; the three interleaved, in a
  rotating order, ``--runs`` times; medians and ratios. The texts must be identical.
* **four clients**: 4 concurrent clients × ``--runs`` requests of 32 tokens against each server;
  total completion tokens/s, tracing on against off.
* **swap**: a third server follows ``models:/bench@production`` while a client streams; the
  alias moves v1 → v2 → v1 … ``--runs`` times. The server's RSS (``/proc/PID/status`` VmRSS,
  sampled every 20 ms) before the first swap, the peak during each swap, after it; VmHWM; the
  failed requests (must be 0).

Prints a markdown table and, with ``--json``, writes every figure. A benchmark, not a test:
it asserts nothing about times.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

LLMOPS = str(Path(sys.executable).parent / "llmops")
HOST = "127.0.0.1"
PROMPT = (
    "Robert Boulter is an English film, television and theatre actor. He had a guest-starring role on the "
    "television series The Bill in 2000. This was followed by a starring role in the play Herons written by "
    "Simon Stephens, which was performed in 2001 at the Royal Court Theatre. He had a guest role in the "
    "television series Judge John Deed in 2002. In 2004 Boulter landed a role as Craig in the episode Teddy's "
    "Story of the television series The Long Firm; he starred alongside actors Mark Strong and Derek Jacobi. "
    "He was cast in the 2005 theatre productions of the Philip Ridley play Mercury Fur, which was performed at "
    "the Drum Theatre in Plymouth and the Menier Chocolate Factory in London. Write a long biography of him."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                continue
    return out


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def die_with_parent() -> None:
    """A server started here ends when this process does, however it ends (Linux prctl PDEATHSIG)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


RUNNING: list["Server"] = []


class Server:
    def __init__(self, env: dict[str, str], ref: str, *args: str, log: Path) -> None:
        RUNNING.append(self)
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = log
        fh = open(log, "w")  # noqa: SIM115 - the child writes it
        self.proc = subprocess.Popen([LLMOPS, "serve", ref, "--port", str(self.port), *args], env=env,
                                     stdout=fh, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"llmops serve exited:\n{log.read_text()[-2000:]}")
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.3)
        raise SystemExit(f"llmops serve did not come up:\n{log.read_text()[-2000:]}")

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/health", timeout=10) as r:  # noqa: S310 - loopback
            return json.loads(r.read())

    def client(self):  # noqa: ANN201
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=600)

    def stop(self) -> None:
        from llmops.app.server import stop

        stop(self.proc, timeout=120)


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


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def concurrent_tps(server: Server, clients: int, requests: int, max_tokens: int) -> float:
    """Total completion tokens/s of ``clients`` concurrent clients × ``requests`` requests each."""
    total = [0]
    lock = threading.Lock()

    def one(i: int) -> None:
        c = server.client()
        for j in range(requests):
            r = c.chat.completions.create(model="bench", messages=messages(f"{i}-{j}. {PROMPT}"), max_tokens=max_tokens,
                                          temperature=0)
            with lock:
                total[0] += r.usage.completion_tokens

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total[0] / (time.perf_counter() - t0)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--workdir")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()

    from llmops.app.converting import convert
    from llmops.app.fixtures import smollm2_checkpoint

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="llmops-bench-serve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = smollm2_checkpoint(progress=lambda m: print(m, file=sys.stderr))
    v1 = workdir / "smollm2-q4_k_m.gguf"
    v2 = workdir / "smollm2-q8_0.gguf"
    for target, path in (("gguf-q4_k_m", v1), ("gguf-q8_0", v2)):
        if not path.exists():
            convert(ckpt, target, path, verify=False)

    store = workdir / "store"
    env = {k: v for k, v in os.environ.items() if k not in ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI")}
    env["LLMOPS_STORE"] = str(store)
    os.environ["LLMOPS_STORE"] = str(store)
    os.environ.pop("LLMOPS_DATABASE_URL", None)
    from llmops.app.cli import main as cli

    if not (store / "llmops.db").exists():
        for p in (v1, v2):
            assert cli(["models", "register", str(p), "--name", "bench"]) == 0
        assert cli(["promote", "bench", "1"]) == 0

    n_ctx = "2048"
    traced = Server(env, "models:/bench/1", "--threads", str(args.threads), "--ctx", n_ctx, log=workdir / "serve-traced.log")
    plain = Server(env, "models:/bench/1", "--threads", str(args.threads), "--ctx", n_ctx, "--no-trace",
                   log=workdir / "serve-plain.log")
    import llama_cpp

    from llmops.benchmarks.runner_llamacpp import _model_params, extra_bufts_ok

    # the same llama.cpp settings as the server's engine (n_batch 512, the CPU buffer types it picks)
    with _model_params(use_extra_bufts=extra_bufts_ok()):
        llm = llama_cpp.Llama(str(v1), n_ctx=int(n_ctx), n_batch=512, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False, chat_format="chat_template.default")
    clients = {"traced": traced.client(), "plain": plain.client()}
    res: dict[str, dict[str, list[float]]] = {k: {"ttft": [], "tps": [], "tokens": []} for k in ("inproc", "traced", "plain")}
    mismatches = 0
    order = ["inproc", "traced", "plain"]
    # warm-up: each side once
    stream_inprocess(llm, "w. " + PROMPT, 8)
    for c in clients.values():
        stream_served(c, "w. " + PROMPT, 8)
    for i in range(args.runs):
        prompt = f"{i + 1}. {PROMPT}"
        texts: dict[str, str] = {}
        tokens = None
        rot = order[i % 3:] + order[:i % 3]
        for side in rot:
            if side == "inproc":
                ttft, total, text = stream_inprocess(llm, prompt, args.max_tokens)
                res[side]["ttft"].append(ttft)
                res[side]["_total"] = res[side].get("_total", []) + [total]
                texts[side] = text
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
        if len(set(texts.values())) != 1:
            mismatches += 1
        print(f"run {i + 1}: " + ", ".join(f"{k} ttft {res[k]['ttft'][-1] * 1000:.0f} ms tps {res[k]['tps'][-1]:.1f}"
                                            for k in order), file=sys.stderr)
    llm.close()

    conc = {"traced": [], "plain": []}
    for i in range(max(1, args.runs // 2)):
        for side in (("traced", "plain") if i % 2 == 0 else ("plain", "traced")):
            conc[side].append(concurrent_tps(traced if side == "traced" else plain, 4, 4, 32))
    traced.stop()
    plain.stop()
    swap = swap_memory(env, workdir, args.runs, args.threads)

    med = {k: {"ttft_ms": median(v["ttft"]) * 1000, "tokens_per_s": median(v["tps"])} for k, v in res.items()}
    out = {
        "model": "SmolLM2-135M-Instruct gguf-q4 (Q4_K_M)", "threads": args.threads, "max_tokens": args.max_tokens,
        "runs": args.runs, "completion_tokens": res["traced"]["tokens"], "text_mismatches": mismatches,
        "single_stream": med,
        "ratios": {
            "serve_vs_inprocess_tokens_per_s": med["traced"]["tokens_per_s"] / med["inproc"]["tokens_per_s"],
            "serve_notrace_vs_inprocess_tokens_per_s": med["plain"]["tokens_per_s"] / med["inproc"]["tokens_per_s"],
            "serve_vs_inprocess_ttft": med["traced"]["ttft_ms"] / med["inproc"]["ttft_ms"],
            "tracing_on_vs_off_tokens_per_s": med["traced"]["tokens_per_s"] / med["plain"]["tokens_per_s"],
            "tracing_on_vs_off_ttft": med["traced"]["ttft_ms"] / med["plain"]["ttft_ms"],
            "tracing_on_vs_off_4_clients_tokens_per_s": median(conc["traced"]) / median(conc["plain"]),
        },
        "four_clients_tokens_per_s": {k: median(v) for k, v in conc.items()},
        "swap": swap,
        "raw": {k: {kk: vv for kk, vv in v.items()} for k, v in res.items()},
    }
    r = out["ratios"]
    rows = [
        ("llama-cpp-python in-process", med["inproc"]["tokens_per_s"], med["inproc"]["ttft_ms"], 1.0, 1.0),
        ("llmops serve, tracing on", med["traced"]["tokens_per_s"], med["traced"]["ttft_ms"],
         r["serve_vs_inprocess_tokens_per_s"], r["serve_vs_inprocess_ttft"]),
        ("llmops serve --no-trace", med["plain"]["tokens_per_s"], med["plain"]["ttft_ms"],
         r["serve_notrace_vs_inprocess_tokens_per_s"], med["plain"]["ttft_ms"] / med["inproc"]["ttft_ms"]),
    ]
    print(f"\nSmolLM2-135M gguf-q4, {args.threads} threads, {args.max_tokens} greedy tokens after a "
          f"{len(PROMPT.split())}-word prompt, streamed, median of {args.runs} interleaved runs "
          f"(identical texts: {args.runs - mismatches}/{args.runs})\n")
    print("| | tokens/s | TTFT ms | tokens/s ratio | TTFT ratio |\n|---|---|---|---|---|")
    for name, tps, ttft, rt, rf in rows:
        print(f"| {name} | {tps:.1f} | {ttft:.0f} | {rt:.3f} | {rf:.3f} |")
    print(f"\ntracing on/off: single stream {r['tracing_on_vs_off_tokens_per_s']:.3f}× tokens/s, "
          f"4 clients {r['tracing_on_vs_off_4_clients_tokens_per_s']:.3f}× tokens/s "
          f"({out['four_clients_tokens_per_s']['traced']:.1f} vs {out['four_clients_tokens_per_s']['plain']:.1f})")
    print(f"swap v1 (Q4_K_M {v1.stat().st_size / 2**20:.1f} MiB) ⇄ v2 (Q8_0 {v2.stat().st_size / 2**20:.1f} MiB), "
          f"{args.runs} swaps under a streaming client: RSS before {swap['rss_before_mib']:.0f} MiB, peak during "
          f"swaps median {median(swap['peak_during_swap_mib']):.0f} MiB (max {max(swap['peak_during_swap_mib']):.0f}), "
          f"after median {median(swap['rss_after_mib']):.0f} MiB, VmHWM {swap['vmhwm_mib']:.0f} MiB (the trace "
          f"writer process: {swap['trace_writer_rss_mib']:.0f} MiB more); swap "
          f"median {median(swap['swap_seconds']):.2f} s; {swap['requests_during_swaps']} requests, "
          f"{swap['failed_requests']} failed")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    import atexit

    atexit.register(lambda: [s.stop() for s in RUNNING])
    main()
