"""What ``bench/bench_serve.py`` runs and prints: `llmops serve` and llama.cpp's own server as
child processes, concurrent streaming clients against them, and the tables.
 A client is plain ``http.client`` reading the SSE stream (the
same few lines of Python for every server, so no server is measured through a heavier client
than another): time to the first content chunk, completion tokens from the stream's usage
chunk (``stream_options.include_usage``), and the request's wall time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

LLMOPS = str(Path(sys.executable).parent / "llmops")
HOST = "127.0.0.1"
CLIENTS = (1, 2, 4, 8)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


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


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])




def stream_chat(port: int, model: str, prompt: str, max_tokens: int,
                headers: dict[str, str] | None = None) -> tuple[float, float, int]:
    """(seconds to the first content chunk, seconds to the end, completion tokens) of one greedy
    streamed chat completion."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(HOST, port, timeout=900)
    t0 = time.perf_counter()
    first = None
    tokens = 0
    chunks = 0
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
            if event.get("usage"):
                tokens = int(event["usage"].get("completion_tokens") or 0)
    finally:
        conn.close()
    t1 = time.perf_counter()
    return (first or t1) - t0, t1 - t0, tokens or chunks


def concurrent(port: int, model: str, clients: int, requests: int, max_tokens: int, prompt: str,
               tag: str) -> dict[str, Any]:
    """``clients`` clients at once, each ``requests`` requests in a row (the first words of each
    prompt differ, so no prompt cache helps): aggregate completion tokens/s over the wall time,
    and time-to-first-token percentiles."""
    ttfts: list[float] = []
    tokens = [0]
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def one(i: int) -> None:
        barrier.wait()
        for j in range(requests):
            try:
                ttft, _, n = stream_chat(port, model, f"{tag} {i}-{j}. {prompt}", max_tokens)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                ttfts.append(ttft)
                tokens[0] += n

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts.sort()
    return {"clients": clients, "tokens": tokens[0], "seconds": wall, "tokens_per_s": tokens[0] / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttfts) if ttfts else float("nan"),
            "ttft_p95_ms": 1000 * _pct(ttfts, 95) if ttfts else float("nan"),
            "failures": len(failures), "failure_examples": failures[:2]}


def _pct(xs: list[float], q: float) -> float:
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class LlamaServer:
    """llama.cpp's ``llama-server`` on a loopback port (built from the llama.cpp that
    llama-cpp-python vendors: ``llmops.app.reference.llama_cpp_tool``)."""

    def __init__(self, binary: Path, model: Path, port: int, *, threads: int, parallel: int, ctx_per_seq: int,
                 log: Path, preexec: Any = None) -> None:
        self.port = port
        self.log = log
        fh = open(log, "w")  # noqa: SIM115 - the child writes it
        self.proc = subprocess.Popen(
            [str(binary), "-m", str(model), "--host", HOST, "--port", str(port), "-t", str(threads), "-tb",
             str(threads), "--parallel", str(parallel), "--kv-unified", "-c", str(parallel * ctx_per_seq),
             "--no-webui", "--metrics"],
            stdout=fh, stderr=subprocess.STDOUT, preexec_fn=preexec)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"llama-server exited:\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5) as r:  # noqa: S310 - loopback
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"llama-server did not come up:\n{log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def report(out: dict[str, Any], files: dict[str, tuple[str, Path]], args: argparse.Namespace, prompt: str) -> None:
    print(f"\nSmolLM2-135M, {args.threads} threads, {args.max_tokens} greedy tokens per request after a "
          f"{len(prompt.split())}-word chat prompt, streamed; load average {out['load_before']} before, "
          f"{out['load_after']} after\n")
    for quant, res in out.get("concurrency", {}).items():
        s = res["summary"]
        print(f"{quant}: aggregate completion tokens/s (medians of {args.rounds} interleaved rounds)\n")
        print("| clients | `--parallel 1` | llama-server `--parallel 8 --kv-unified` | llmops serve | vs llama-server "
              "| vs `--parallel 1` | TTFT p95 ms (llmops / llama-server / `--parallel 1`) |")
        print("|---|---|---|---|---|---|---|")
        for c in CLIENTS:
            a, b, m = s["serial"][c], s["llama-server"][c], s["llmops"][c]
            print(f"| {c} | {a['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | {m['tokens_per_s']:.1f} | "
                  f"{m['tokens_per_s'] / b['tokens_per_s']:.2f}× | {m['tokens_per_s'] / a['tokens_per_s']:.2f}× | "
                  f"{m['ttft_p95_ms']:.0f} / {b['ttft_p95_ms']:.0f} / {a['ttft_p95_ms']:.0f} |")
        fails = sum(s[k][c]["failures"] for k in s for c in CLIENTS)
        print(f"\nfailed requests: {fails}\n")
    if "onnx" in out:
        o = out["onnx"]
        print(f"onnx-int4 through llmops serve: 1 client {o['parallel 4'][1]:.1f} tok/s, 4 clients "
              f"{o['parallel 4'][4]:.1f} tok/s ({o['parallel 4'][4] / o['parallel 4'][1]:.2f}×); --parallel 1: "
              f"{o['parallel 1'][1]:.1f} and {o['parallel 1'][4]:.1f}\n")
    if "single_stream" in out:
        med = out["single_stream"]["median"]
        mm = out["single_stream"]["text_mismatches"]
        print(f"single stream, Q4_K_M, median of {args.runs} interleaved runs (identical texts: {args.runs - mm}/{args.runs})\n")
        print("| | tokens/s | TTFT ms | tokens/s ratio | TTFT ratio |\n|---|---|---|---|---|")
        for key, label in (("inproc", "llama-cpp-python in-process"), ("traced", "llmops serve, tracing on"),
                           ("plain", "llmops serve --no-trace")):
            print(f"| {label} | {med[key]['tokens_per_s']:.1f} | {med[key]['ttft_ms']:.0f} | "
                  f"{med[key]['tokens_per_s'] / med['inproc']['tokens_per_s']:.3f} | "
                  f"{med[key]['ttft_ms'] / med['inproc']['ttft_ms']:.3f} |")
        print()
    if "swap" in out:
        swap = out["swap"]
        v1, v2 = files["q4_k_m"][1], files["q8_0"][1]
        print(f"swap v1 (Q4_K_M {v1.stat().st_size / 2**20:.1f} MiB) ⇄ v2 (Q8_0 {v2.stat().st_size / 2**20:.1f} MiB), "
              f"{args.runs} swaps under a streaming client: RSS before {swap['rss_before_mib']:.0f} MiB, peak during "
              f"swaps median {median(swap['peak_during_swap_mib']):.0f} MiB (max {max(swap['peak_during_swap_mib']):.0f}), "
              f"after median {median(swap['rss_after_mib']):.0f} MiB, VmHWM {swap['vmhwm_mib']:.0f} MiB (the trace "
              f"writer process: {swap['trace_writer_rss_mib']:.0f} MiB more); swap median "
              f"{median(swap['swap_seconds']):.2f} s; {swap['requests_during_swaps']} requests, "
              f"{swap['failed_requests']} failed")
