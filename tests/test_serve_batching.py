"""`llmops serve` decodes several requests in one batch: steps with several sequences (seen in
/metrics), a new request joining a running batch, a client that leaves freeing its sequence,
a stop bounded by --grace whatever the trace backlog, a second signal ending it at once, and
a batch step llama.cpp refuses failing only its requests. Real servers and real llama.cpp
(and onnxruntime-genai) on tiny models."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from test_serve import (HOST, Server, _env, _wait, artifacts, onnx_model,  # noqa: F401 - fixtures
                        raw, register, start_server)


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def batch_server(artifacts, tmp_path_factory):  # noqa: ANN001, ANN201, F811
    """The GGUF file served as a path (no registry: its name is the file's, its version "local")."""
    tmp = tmp_path_factory.mktemp("serve-batch")
    server = start_server(_env(tmp / "store"), artifacts["gguf-f32"], "--threads", "1", "--ctx", "512",
                          "--parallel", "4", "--max-queue", "8", "--no-trace", tmp=tmp)
    yield server
    server.stop()


SERVED = {"model": "tiny-gguf-f32", "version": "local"}


def test_several_sequences_share_one_decode_step(batch_server: Server) -> None:
    """Four prompts in one request are four jobs handed over together: they decode in the same
    steps (a serialising server would show steps of one sequence only)."""
    body = {"prompt": [f"{i} The quick brown fox" for i in range(4)], "max_tokens": 60, "temperature": 0}
    code, _, data = raw(batch_server, "/v1/completions", json.dumps(body).encode())
    assert code == 200 and len(data["choices"]) == 4, data
    _, _, page = raw(batch_server, "/metrics")
    steps = _metric(page, "llmops_batch_occupancy_count", **SERVED)
    up_to_3 = _metric(page, "llmops_batch_occupancy_bucket", **SERVED, le="3.0")
    assert steps > 0 and steps - up_to_3 > 0, (steps, up_to_3)  # steps that decoded all four
    assert _metric(page, "llmops_parallel_sequences", **SERVED) == 4
    assert _metric(page, "llmops_queue_wait_seconds_count", **SERVED) >= 4
    health = batch_server.health()
    assert health["parallel"] == 4 and health["in_flight"] == 0 and health["queued"] == 0
    # each prompt's text is the one it gets alone (greedy), batched or not
    alone = raw(batch_server, "/v1/completions", json.dumps({**body, "prompt": body["prompt"][2]}).encode())[2]
    assert alone["choices"][0]["text"] == data["choices"][2]["text"]
    # ... its prompt found in the cells the batch left (all but the last token, whose logits it needs)
    assert alone["usage"]["prompt_tokens_details"]["cached_tokens"] == alone["usage"]["prompt_tokens"] - 1


class _Events:
    """A sink that records what happened, in order, across jobs (called on the engine's thread)."""

    def __init__(self, name: str, log: list[tuple[str, int]], on_token: Any = None) -> None:
        self.name, self.log, self.on_token, self.tokens = name, log, on_token, 0
        self.parts: list[str] = []
        self.ended = threading.Event()

    def text(self, piece: str) -> None:
        self.tokens += 1
        self.parts.append(piece)
        if self.on_token is not None:
            self.on_token(self.tokens)

    def done(self, error: BaseException | None) -> None:
        self.log.append((self.name, self.tokens))
        self.ended.set()


@pytest.mark.parametrize("parallel", [2, 1])
def test_a_new_request_joins_the_running_batch(artifacts, parallel: int) -> None:  # noqa: F811
    """B is handed in while A has hundreds of tokens to go (from A's own fifth token, so no
    clock is involved): with two slots B is decoded beside A and ends first; with one, it
    waits for A."""
    from llmops.app.serving.batching import LlamaBatchEngine
    from llmops.app.serving.engines import GenParams, Job

    engine = LlamaBatchEngine(artifacts["gguf-f32"], n_ctx=512, threads=1, parallel=parallel, name="tiny-v1")
    try:
        for i in range(20):  # greedy on a random model may end early: a prompt that runs 400 tokens
            probe = _Events("probe", [])
            probe_job = Job(engine.text_prompt(f"Story {i}:"), GenParams(max_tokens=400, temperature=0), probe)
            engine.submit(probe_job)
            assert probe.ended.wait(120)
            if probe_job.out.completion_tokens == 400:
                break
        else:
            pytest.skip("every candidate prompt ends early on this model")
        log: list[tuple[str, int]] = []
        b = _Events("B", log)
        b_job = Job(engine.text_prompt("Hi"), GenParams(max_tokens=3, temperature=0), b)
        a = _Events("A", log, lambda n: engine.submit(b_job) if n == 5 else None)
        a_job = Job(engine.text_prompt(f"Story {i}:"), GenParams(max_tokens=400, temperature=0), a)
        engine.submit(a_job)
        assert a.ended.wait(120) and b.ended.wait(120)
        assert a_job.out.completion_tokens == 400 and b_job.out.completion_tokens >= 1
        if parallel == 2:
            assert [name for name, _ in log] == ["B", "A"], log
            assert log[0][1] >= 1  # B produced its text while A was still generating
        else:
            assert [name for name, _ in log] == ["A", "B"], log
    finally:
        engine.close()
        assert engine.join(30)


def test_a_prompt_sharing_a_finished_ones_prefix_decodes_only_the_rest(artifacts) -> None:  # noqa: F811
    """A finished request's cells stay as a cache: the same prompt again, or a second chat turn
    that resends the first with its answer, decodes only what is new, and gives the greedy text
    a fresh context gives; an echo with logprobs (which needs every position's logits) reuses
    nothing."""
    from llmops.app.serving.batching import LlamaBatchEngine
    from llmops.app.serving.engines import GenParams, run_to_end

    greedy = GenParams(max_tokens=24, temperature=0)
    first = "The quick brown fox jumps over the lazy dog. " * 4
    cached = LlamaBatchEngine(artifacts["gguf-f32"], n_ctx=512, threads=1, parallel=2, name="tiny-v1")
    fresh = LlamaBatchEngine(artifacts["gguf-f32"], n_ctx=512, threads=1, parallel=1, name="tiny-v2")
    try:
        prompt = cached.text_prompt(first)
        text, out = run_to_end(cached, prompt, greedy, 120)
        assert out.cached_tokens == 0
        again, out2 = run_to_end(cached, cached.text_prompt(first), greedy, 120)
        assert out2.cached_tokens == len(prompt.tokens) - 1 and again == text
        turn = first + text + " And then"
        second = cached.text_prompt(turn)
        reply, out3 = run_to_end(cached, second, greedy, 120)
        assert out3.cached_tokens >= len(prompt.tokens), (out3.cached_tokens, len(prompt.tokens))
        assert out3.cached_tokens < len(second.tokens)
        alone, out4 = run_to_end(fresh, fresh.text_prompt(turn), greedy, 120)
        assert out4.cached_tokens == 0 and reply == alone
        echo = GenParams(max_tokens=0, temperature=0, logprobs=1, echo=True)
        _, out5 = run_to_end(cached, cached.text_prompt(turn), echo, 120)
        assert out5.cached_tokens == 0 and len(out5.logprobs.tokens) == len(second.tokens)
    finally:
        for engine in (cached, fresh):
            engine.close()
            assert engine.join(30)


def test_a_client_that_leaves_a_plain_request_frees_its_sequence(batch_server: Server) -> None:
    """Not streamed: the server notices the closed connection while the request decodes, drops
    its sequence, and counts it as cancelled, not served."""
    body = json.dumps({"prompt": "go on and on", "max_tokens": 480, "temperature": 0})
    s = socket.create_connection((HOST, batch_server.port), timeout=30)
    s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    s.close()

    def cancelled() -> bool:
        page = raw(batch_server, "/metrics")[2]
        return _metric(page, "llmops_requests_total", endpoint="completions", status="cancelled") == 1

    _wait(cancelled, 60, "the left request to be cancelled")
    _wait(lambda: batch_server.health()["in_flight"] == 0, 30, "its sequence to be freed")
    health = batch_server.health()
    assert health["queued"] == 0
    code, _, data = raw(batch_server, "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 2}).encode())
    assert code == 200, data


# -- stopping --------------------------------------------------------------------------------------
def _flood(server: Server, n: int, threads: int = 4) -> int:
    """``n`` requests refused for their length after tokenizing (each one a trace), on keep-alive
    connections; the count answered 400."""
    body = json.dumps({"prompt": "word " * 300, "max_tokens": 1}).encode()
    done = [0]
    lock = threading.Lock()

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
        for _ in range(k):
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            if r.status == 400:
                with lock:
                    done[0] += 1
        conn.close()

    ts = [threading.Thread(target=worker, args=(n // threads,)) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(600)
    return done[0]


def _traced_server(artifacts: dict[str, Path], tmp: Path, *args: str) -> Server:  # noqa: F811
    env = _env(tmp / "store")
    register(env, artifacts["gguf-q4_0"], "stopping")
    return start_server(env, "models:/stopping/1", "--threads", "1", "--ctx", "64", *args, tmp=tmp)


class _StoreLock:
    """SQLite's write lock on a server's store, held by another connection: the trace writer's
    every write waits for it (a busy store), so a backlog builds whatever the machine's speed."""

    def __init__(self, store: Path) -> None:
        self.db = sqlite3.connect(store / "llmops.db", isolation_level=None, timeout=60)
        self.db.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self.db is not None:
            self.db.execute("COMMIT")
            self.db.close()
            self.db = None


def test_a_stop_is_bounded_by_the_grace_whatever_the_trace_backlog(artifacts, tmp_path) -> None:  # noqa: F811
    """Thousands of traces queued behind a busy store: the store frees up as SIGTERM arrives,
    the writer writes what it can within --grace 2 and the server exits, saying how many it wrote
    and how many it dropped; none is unaccounted for."""
    server = _traced_server(artifacts, tmp_path, "--grace", "2")
    lock = _StoreLock(tmp_path / "store")
    try:
        sent = _flood(server, 2000)
        assert sent == 2000
        backlog = server.health()["traces"]["backlog"]
    finally:
        lock.release()
    server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(timeout=120)  # a bound for a broken stop, not a timing: the grace is 2 s
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise AssertionError(f"llmops serve was still running 120 s after SIGTERM with --grace 2\n"
                             f"{server.log.read_text()[-2000:]}") from None
    log = server.log.read_text()
    assert code == 0, log[-2000:]
    (line,) = [x for x in log.splitlines() if x.startswith("stopped:")]
    written = int(re.search(r"(\d+) trace\(s\) written", line).group(1))
    dropped = int(re.search(r"(\d+) dropped \((\d+) not written", line).group(1)) if "dropped" in line else 0
    assert backlog > 1000 and dropped > 0, (backlog, line)  # the grace cannot write them all
    assert written + dropped == sent, line
    assert "Traceback" not in log


def test_a_second_signal_stops_at_once(artifacts, tmp_path) -> None:  # noqa: F811
    """--grace 600 and traces the writer cannot write (the store stays busy): the first SIGTERM
    waits for them, the second ends the server at once, saying what it left."""
    server = _traced_server(artifacts, tmp_path, "--grace", "600")
    lock = _StoreLock(tmp_path / "store")
    try:
        assert _flood(server, 20) == 20
        server.proc.send_signal(signal.SIGTERM)
        _wait(lambda: "stopping:" in server.log.read_text(), 60, "the first signal to be taken")
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            raise AssertionError("a second SIGTERM did not stop llmops serve") from None
    finally:
        lock.release()
    log = server.log.read_text()
    assert code == 128 + signal.SIGTERM, log[-2000:]
    assert "stopped at once by a second SIGTERM" in log and "20 trace(s) not written" in log, log[-2000:]


def test_a_stop_cuts_requests_still_running_at_the_end_of_the_grace(artifacts, tmp_path) -> None:  # noqa: F811
    """--grace 0, one sequence at a time and six streams: what has not finished when the stop
    begins is cut, each stream ends properly (finish_reason cancelled, [DONE]) and the server
    says how many it cut."""
    server = start_server(_env(tmp_path / "store"), artifacts["gguf-f32"], "--threads", "1", "--ctx", "512",
                          "--parallel", "1", "--max-queue", "8", "--grace", "0", "--no-trace", tmp=tmp_path)
    streams: list[list[bytes]] = [[] for _ in range(6)]

    def one(i: int) -> None:
        conn = http.client.HTTPConnection(HOST, server.port, timeout=120)
        body = json.dumps({"prompt": f"{i} on and on", "max_tokens": 480, "temperature": 0, "stream": True})
        try:
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            for line in conn.getresponse():
                streams[i].append(line)
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: any(len(s) > 2 for s in streams), 60, "the first stream's tokens")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=120) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    for t in threads:
        t.join(60)
    log = server.log.read_text()
    cut = int(re.search(r"stopped: (\d+) request\(s\) cut at the end of the grace", log).group(1))
    texts = [b"".join(s) for s in streams]
    cancelled = [t for t in texts if b'"finish_reason": "cancelled"' in t]
    assert cut >= 1 and len(cancelled) >= 1, (cut, log[-1500:])
    assert all(t.rstrip().endswith(b"data: [DONE]") for t in cancelled)
    assert "Traceback" not in log


# -- a batch llama.cpp refuses ---------------------------------------------------------------------
def test_a_failed_decode_step_fails_its_requests_and_the_loop_goes_on(artifacts) -> None:  # noqa: F811
    """llama.cpp refuses a batch holding a token outside the vocabulary (the server answers 400
    before it gets there; the engine is handed one here): the requests of that step fail with
    one line, the next request is served, and after three failed steps in a row the context is
    made anew."""
    from llmops.app.serving.batching import RESTART_AFTER, LlamaBatchEngine
    from llmops.app.serving.engines import GenParams, Prompt, run_to_end
    from llmops.core.errors import LLMOpsError

    logs: list[str] = []
    engine = LlamaBatchEngine(artifacts["gguf-f32"], n_ctx=256, threads=1, parallel=2, log=logs.append, name="tiny-v1")
    try:
        bad = Prompt([1, 2, engine.n_vocab + 7])
        with pytest.raises(LLMOpsError, match="could not decode"):
            run_to_end(engine, bad, GenParams(max_tokens=3, temperature=0), 60)
        assert len(logs) == 1 and "\n" not in logs[0] and "1 request(s) failed; serving goes on" in logs[0], logs
        text, out = run_to_end(engine, engine.text_prompt("hello"), GenParams(max_tokens=3, temperature=0), 60)
        assert out.finish_reason in ("length", "stop") and out.first_token_at is not None
        for _ in range(RESTART_AFTER):
            with pytest.raises(LLMOpsError):
                run_to_end(engine, bad, GenParams(max_tokens=3, temperature=0), 60)
        assert engine.restarts == 1 and "made anew" in logs[-1], logs
        _, out = run_to_end(engine, engine.text_prompt("hello"), GenParams(max_tokens=3, temperature=0), 60)
        assert out.first_token_at is not None and engine.failed is None
    finally:
        engine.close()
        assert engine.join(30)


# -- ONNX ------------------------------------------------------------------------------------------
def test_onnx_requests_are_batched_by_onnxruntime_genai(onnx_model) -> None:  # noqa: F811
    """Four requests waiting together run as one static batch of onnxruntime-genai's engine, each
    with the greedy text it gets alone."""
    from llmops.app.serving.engines import GenParams, Job, Observer, run_to_end
    from llmops.app.serving.onnx_batch import OnnxBatchEngine

    class Steps(Observer):
        def __init__(self) -> None:
            self.sizes: list[int] = []

        def step(self, sequences: int) -> None:
            self.sizes.append(sequences)

    steps = Steps()
    engine = OnnxBatchEngine(onnx_model, threads=1, parallel=4, observer=steps, name="tiny-onnx")
    try:
        gate = threading.Event()
        held = engine.call(lambda: gate.wait(60))  # the engine's thread waits: all four are queued together
        log: list[tuple[str, int]] = []
        sinks = [_Events(str(i), log) for i in range(4)]
        params = GenParams(max_tokens=20, temperature=0)
        jobs = [Job(engine.text_prompt(f"{i} The quick brown fox"), params, sink) for i, sink in enumerate(sinks)]
        for job in jobs:
            engine.submit(job)
        gate.set()
        assert held.result(60)
        assert all(sink.ended.wait(120) for sink in sinks)
        assert max(steps.sizes) == 4, steps.sizes
        alone, _ = run_to_end(engine, engine.text_prompt("1 The quick brown fox"), params, 120)
        assert alone == "".join(sinks[1].parts)
    finally:
        engine.close()
        assert engine.join(30)
