"""`llmops serve`, `llmops monitor` and `llmops rollback`.

Real servers on loopback ports, driven by the real `openai` client (and curl for SSE), on
tiny GGUF and ONNX models; a bounded load test that promotes and rolls back under 8
concurrent clients; traces read back from MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

LLMOPS = str(Path(sys.executable).parent / "llmops")
HOST = "127.0.0.1"
KEY = "test-key-123"
# Test servers write every queued trace when they stop, however busy the machine (a stop ends
# once the writer is done; the grace only bounds a stuck one).
STOP_GRACE_S = 600
HEAVY = ("torch", "transformers", "mlflow", "llama_cpp", "onnxruntime", "onnxruntime_genai", "sqlalchemy", "numpy",
         "fastapi", "uvicorn", "prometheus_client", "openai")


# -- helpers --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _env(store_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "LLMOPS_API_KEY")}
    env["LLMOPS_STORE"] = str(store_dir)
    env.update(extra)
    return env


def die_with_parent() -> None:
    """A server started here ends when this process does, however it ends (Linux prctl PDEATHSIG)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    key: str | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def client(self, **kw: Any):  # noqa: ANN201 - openai.OpenAI
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key or "none", max_retries=0,
                             timeout=kw.pop("timeout", 60), **kw)

    def health(self) -> dict[str, Any]:
        """/health as the operator sees it (with the key, where one is set)."""
        req = urllib.request.Request(f"{self.url}/health", headers=self.headers())
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
            return json.loads(r.read())

    def stop(self, timeout: float = STOP_GRACE_S + 60) -> str:
        from llmops.app.server import stop

        stop(self.proc, timeout=timeout)
        return self.log.read_text()


def start_server(env: dict[str, str], *args: str, key: str | None = None, tmp: Path) -> Server:
    port = free_port()
    log = tmp / f"serve-{port}.log"
    fh = open(log, "w")  # noqa: SIM115 - the child writes it while we wait
    grace = [] if "--grace" in args else ["--grace", str(STOP_GRACE_S)]
    proc = subprocess.Popen([LLMOPS, "serve", *map(str, args), *grace, "--port", str(port)], env=env,
                            stdout=fh, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    server = Server(proc, port, log, key)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"llmops serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            server.health()
            return server
        except OSError:
            time.sleep(0.3)
    server.stop()
    raise AssertionError(f"llmops serve did not come up:\n{log.read_text()[-3000:]}")


def raw(server: Server, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
        method: str | None = None) -> tuple[int, dict[str, str], Any]:
    """One HTTP request with urllib: (status, headers with lower-case names, parsed JSON or text)."""
    req = urllib.request.Request(f"{server.url}{path}", data=body, method=method or ("POST" if body is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers if headers is not None else server.headers())})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310 - loopback
            status, hdrs, data = r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, data = e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()
    try:
        return status, hdrs, json.loads(data)
    except ValueError:
        return status, hdrs, data.decode("utf-8", "replace")


def hf_tokenizer(folder: Path):  # noqa: ANN201
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def chat_prompt_tokens(tok, messages: list[dict[str, str]]) -> int:  # noqa: ANN001
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    return len(ids)


def text_prompt_tokens(tok, text: str) -> int:  # noqa: ANN001
    return len(tok(text)["input_ids"])


def in_process(env: dict[str, str], *args: Any) -> tuple[int, str]:
    """``llmops ARGS`` in this process with the store of ``env`` (faster than a new interpreter)."""
    import contextlib
    import io

    from llmops.app.cli import main

    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for var in ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            mp.delenv(var, raising=False)
        for k in ("LLMOPS_STORE", "LLMOPS_DATABASE_URL"):
            if k in env:
                mp.setenv(k, env[k])
        with contextlib.redirect_stdout(buf):
            code = main([str(a) for a in args])
    return code, buf.getvalue()


def register(env: dict[str, str], path: Path, name: str) -> str:
    code, out = in_process(env, "--json", "models", "register", path, "--name", name)
    assert code == 0, out
    return json.loads(out)["version"]


# -- models -----------------------------------------------------------------------------------
# Built once per test session and shared by every serve module that imports these fixtures (an
# imported fixture is a fixture of each module: its value is kept here, beside the session's
# temporary folders that hold the files). Tests read the files and register copies of them.
_BUILT: dict[str, Any] = {}


@pytest.fixture(scope="module")
def artifacts(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny llama as two different GGUFs (f32, q8_0), a third (q4_0) and, on demand, ONNX int4."""
    from llmops.app.converting import convert

    if "gguf" not in _BUILT:
        src = tiny_models("llama")
        out = tmp_path_factory.mktemp("serve-models")
        made = {"src": src}
        for target in ("gguf-f32", "gguf-q8_0", "gguf-q4_0"):
            made[target] = convert(src, target, out / f"tiny-{target}.gguf", verify=False).output
        _BUILT["gguf"] = made
    return dict(_BUILT["gguf"])


@pytest.fixture(scope="module")
def onnx_model(artifacts, tmp_path_factory) -> Path:
    from llmops.app.converting import convert

    if "onnx" not in _BUILT:
        out = tmp_path_factory.mktemp("serve-onnx") / "tiny-onnx-int4"
        _BUILT["onnx"] = Path(convert(artifacts["src"], "onnx-int4", out, verify=False).output)
    return _BUILT["onnx"]


# -- the command line without a model ----------------------------------------------------------------
def test_help_of_serve_monitor_rollback_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from llmops.app.cli import main\n"
        "for args in (['serve'], ['monitor'], ['rollback']):\n"
        "    assert main([*args, '--help']) == 0, args\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_serve_fails_in_one_line(cli, store_env, tmp_path) -> None:
    r = cli("serve", "models:/nothing@production", "--port", free_port())
    assert r.code == 1 and len(r.err.strip().splitlines()) == 1 and "not found" in r.err
    r = cli("--json", "serve", tmp_path / "missing.gguf", "--port", free_port())
    assert r.code == 2 and "no such file" in r.json()["error"]
    busy = socket.socket()
    busy.bind((HOST, 0))
    busy.listen()
    try:
        r = cli("serve", tmp_path, "--port", busy.getsockname()[1])
        assert r.code == 1 and "in use" in r.err
    finally:
        busy.close()
    r = cli("serve", "models:/x@production", "--max-request-bytes", "lots")
    assert r.code == 2 and "--max-request-bytes" in r.err


def _register_bytes(cli, tmp_path: Path, name: str, payload: bytes) -> str:
    f = tmp_path / f"{name}-{payload.hex()[:12]}.bin"
    f.write_bytes(payload)
    r = cli("--json", "models", "register", f, "--name", name)
    assert r.code == 0, r.err
    return r.json()["version"]


def test_rollback_walks_back_the_audit_trail(store_env, cli, tmp_path) -> None:
    vs = [_register_bytes(cli, tmp_path, "rb", bytes([i]) * 64) for i in (1, 2, 3)]
    r = cli("rollback", "rb", "--reason", "nothing yet")
    assert r.code == 1 and len(r.err.strip().splitlines()) == 1 and "does not exist" in r.err
    for v in vs:
        assert cli("promote", "rb", v).code == 0
    assert cli("rollback", "rb").code == 2  # --reason is required
    r = cli("--json", "rollback", "rb", "--reason", "v3 is slow", "--dry-run")
    assert r.code == 0 and r.json()["to_version"] == vs[1] and r.json()["moved"] is False
    assert cli("--json", "models", "show", "models:/rb@production").json()["version"] == vs[2]

    r = cli("--json", "rollback", "rb", "--reason", "v3 is slow")
    assert r.code == 0, r.err
    d = r.json()
    assert (d["from_version"], d["to_version"], d["moved"]) == (vs[2], vs[1], True) and d["audit_id"]
    assert cli("--json", "models", "show", "models:/rb@production").json()["version"] == vs[1]
    # a second rollback goes further back, not back to v3
    r = cli("--json", "rollback", "rb", "--reason", "v2 too")
    assert r.code == 0 and r.json()["to_version"] == vs[0]
    r = cli("rollback", "rb", "--reason", "and again")
    assert r.code == 1 and "nothing to roll back to" in r.err and len(r.err.strip().splitlines()) == 1

    trail = cli("--json", "promotions", "list", "rb").json()
    assert [(t["version"], t["previous_version"], t["verdict"]) for t in trail] == [
        (vs[0], None, "passed"), (vs[1], vs[0], "passed"), (vs[2], vs[1], "passed"),
        (vs[1], vs[2], "rollback"), (vs[0], vs[1], "rollback")]
    assert trail[3]["reason"] == "v3 is slow" and trail[3]["actor"]
    # promoting again after rollbacks: the history goes on from there
    assert cli("promote", "rb", vs[2]).code == 0
    assert cli("--json", "rollback", "rb", "--reason", "r").json()["to_version"] == vs[0]


def test_rollback_holders_from_rows() -> None:
    from types import SimpleNamespace as R

    from llmops.registry.rollback import holders

    rows = [R(version="1", previous_version=None, verdict="passed"), R(version="2", previous_version="1", verdict="failed"),
            R(version="2", previous_version="1", verdict="forced"), R(version="3", previous_version="2", verdict="passed"),
            R(version="2", previous_version="3", verdict="rollback")]
    assert holders(rows) == ["1", "2"]
    # a history that starts after the alias was first set elsewhere
    assert holders([R(version="5", previous_version="4", verdict="passed")]) == ["4", "5"]


def test_monitor_figures_phases_and_since() -> None:
    from llmops.registry import traces as T

    def rec(v: str, at: int, status: str = "ok", latency: float = 100.0) -> T.RequestRecord:
        return T.RequestRecord(version=v, alias="production", status=status, endpoint="chat.completions",
                               timestamp_ms=at, acquired_ms=at, latency_ms=latency, ttft_ms=latency / 4,
                               generation_ms=latency / 2, prompt_tokens=10, completion_tokens=5, queue_ms=latency / 10)

    recs = [rec("1", 1000 + i, latency=10.0 * (i + 1)) for i in range(10)] + \
           [rec("2", 2000 + i, status="error" if i == 0 else "ok") for i in range(4)] + \
           [rec("1", 3000 + i) for i in range(3)] + [rec("1", 3100, status="cancelled")]
    assert [(p.version, p.requests) for p in T.phases(recs)] == [("1", 10), ("2", 4), ("1", 4)]
    s = T.summarize_version("1", [r for r in recs if r.version == "1"])
    assert s.requests == 14 and s.errors == 0 and s.cancelled == 1 and s.error_rate == 0
    # the wait for a sequence slot, over completed requests: 1..10 ms, then three of 10 ms
    assert s.p50_queue_ms == pytest.approx(7.0) and s.p95_queue_ms == pytest.approx(10.0)
    assert T.percentile([10.0 * (i + 1) for i in range(10)], 50) == 55.0
    assert T.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    s2 = T.summarize_version("2", [r for r in recs if r.version == "2"])
    assert s2.errors == 1 and s2.error_rate == 0.25 and s2.tokens_per_s == pytest.approx(100.0)
    now = 1_000_000.0
    assert T.parse_since("90s", now) == (now - 90) * 1000
    assert T.parse_since("2h", now) == (now - 7200) * 1000
    assert T.parse_since("2025-06-01T12:00") == 1748779200000
    with pytest.raises(Exception, match="--since"):
        T.parse_since("yesterday")


def test_traces_are_read_back_by_monitor_and_gates(store_env, cli, tmp_path) -> None:
    """Traces written through the serving tracer (MLflow's async export) come back per version,
    linked to the version's LoggedModel, as `llmops monitor` figures and prod_* gate metrics."""
    from llmops.app.serving.tracing import RequestRecord, Tracer
    from llmops.registry import traces as T

    v1, v2 = (_register_bytes(cli, tmp_path, "traced", bytes([i]) * 32) for i in (7, 8))
    store = store_env.store()
    store.open()
    logs: list[str] = []
    tracer = Tracer(store, True, logs.append)
    ids = {v: T.logged_model_for(store, "traced", v) for v in (v1, v2)}
    assert all(ids.values()) and ids[v1] != ids[v2]
    assert T.logged_model_for(store, "traced", v1) == ids[v1]  # created once, named in the version's tag
    assert cli("--json", "models", "show", f"models:/traced/{v1}").json()["tags"][T.LOGGED_MODEL_TAG] == ids[v1]
    t0 = time.perf_counter()
    plan = [(v1, "ok")] * 6 + [(v2, "ok")] * 3 + [(v2, "error")] + [(v1, "ok")] * 2 + [(v1, "cancelled")]
    for i, (v, status) in enumerate(plan):
        tracer.request(RequestRecord(
            endpoint="chat.completions", start_ns=time.time_ns(), t_arrival=t0, name="traced", version=v,
            alias="production", logged_model_id=ids[v], t_acquired=t0, acquired_ms=int(time.time() * 1000) + i,
            t_slot=t0 + 0.001, t_first=t0 + 0.01, t_end=t0 + 0.05 + 0.01 * i, prompt_tokens=12, completion_tokens=8,
            finish_reason="length", status=status, inputs={"messages": [{"role": "user", "content": "hi"}]}, output="ok"))
    tracer.swap(name="traced", alias="production", from_version=v1, to_version=v2, ok=True, seconds=0.5, error=None,
                logged_model_id=ids[v2])
    # the writer is done when it is done: the bound only stops a stuck one (a busy machine is slow, not stuck)
    assert tracer.flush(600) and tracer.failed == 0 and not logs

    r = cli("--json", "monitor", "traced", "--since", "10m")
    assert r.code == 0, r.err
    d = r.json()
    assert d["requests"] == len(plan)
    by = {v["version"]: v for v in d["versions"]}
    assert by[v1]["requests"] == 9 and by[v1]["cancelled"] == 1 and by[v1]["errors"] == 0
    assert by[v2]["requests"] == 4 and by[v2]["errors"] == 1 and by[v2]["error_rate"] == 0.25
    assert by[v1]["p50_latency_ms"] > 0 and by[v1]["p95_ttft_ms"] == pytest.approx(10.0, abs=0.5)
    assert [p["version"] for p in d["phases"]] == [v1, v2, v1]
    assert [(s["from_version"], s["to_version"], s["status"]) for s in d["swaps"]] == [(v1, v2, "ok")]
    assert by[v1]["p95_queue_ms"] == pytest.approx(1.0, abs=0.5)  # arrival to the slot
    text = cli("monitor", "traced", "--since", "10m").out
    assert "phases: v1" in text and "P95 MS" in text and "P95 QUEUE" in text
    assert cli("--json", "monitor", "traced", "--alias", "staging").json()["requests"] == 0

    gm = T.gate_metrics(store, "traced", v2)
    assert gm["prod_requests"] == 4 and gm["prod_error_rate"] == 0.25 and gm["prod_p95_latency_ms"] > 0
    assert T.gate_metrics(store, "traced", "99") == {}
    found = store.mlflow.search_traces(locations=[store.experiment_id], model_id=ids[v2], include_spans=False)
    assert {t.info.tags[T.TAG_VERSION] for t in found} == {v2} and len(found) == 5  # 4 requests + the swap


@pytest.mark.slow  # MLflow waits out SQLite's lock for 20 s (its busy_timeout) before a write fails and is retried
def test_a_busy_store_delays_traces_without_losing_them(tmp_path, monkeypatch) -> None:
    """Another connection holds SQLite's write lock: the writer's tries meet a locked database,
    are tried again, and every trace is in the store once the lock is gone."""
    import sqlite3

    from llmops.app.serving.tracing import RequestRecord, Tracer
    from llmops.core.settings import resolve
    from llmops.registry.store import Store

    _sqlite_env(tmp_path, monkeypatch)
    store = Store(resolve(tmp_path / "store")).open()
    logs: list[str] = []
    tracer = Tracer(store, True, logs.append)
    lock = sqlite3.connect(tmp_path / "store" / "llmops.db", isolation_level=None, timeout=60)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.perf_counter()
        for i in range(5):
            tracer.request(RequestRecord(
                endpoint="completions", start_ns=time.time_ns(), t_arrival=t0, name="busy", version="1", alias=None,
                logged_model_id=None, t_slot=t0, t_first=t0 + 0.01, t_end=t0 + 0.02, prompt_tokens=3,
                completion_tokens=2, inputs={"prompt": f"p{i}"}, output="o"))
        _wait(lambda: tracer.retried >= 1, 600, "a write to meet the locked store")
        assert tracer.written == 0
    finally:
        lock.execute("COMMIT")
        lock.close()
    assert tracer.flush(600) and tracer.written == 5 and tracer.failed == 0, (tracer.written, tracer.failed, logs)
    found = store.mlflow.search_traces(locations=[store.experiment_id], include_spans=False,
                                       filter_string="tags.`llmops.model` = 'busy'")
    assert len(found) == 5


# -- a GGUF version, pinned ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_server(artifacts, tmp_path_factory) -> Iterator[tuple[Server, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("serve-gguf")
    env = _env(tmp / "store")
    assert register(env, artifacts["gguf-f32"], "tiny") == "1"
    server = start_server({**env, "LLMOPS_API_KEY": KEY}, "models:/tiny/1", "--threads", "1", "--ctx", "512",
                          "--parallel", "2", "--max-queue", "0", "--max-tokens", "600", "--max-request-bytes", "64k",
                          key=KEY, tmp=tmp)
    yield server, env
    server.stop()


MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "The quick brown fox"}]


def test_chat_and_completion_with_the_openai_client(gguf_server, artifacts) -> None:
    server, _ = gguf_server
    client = server.client()
    tok = hf_tokenizer(artifacts["src"])

    raw_resp = client.chat.completions.with_raw_response.create(model="tiny", messages=MSGS, max_tokens=7,
                                                                temperature=0, seed=1)
    assert raw_resp.headers["x-llmops-model-version"] == "1" and raw_resp.headers["x-llmops-model"] == "tiny"
    chat = raw_resp.parse()
    assert chat.model == "tiny/1" and chat.object == "chat.completion"
    assert chat.usage.prompt_tokens == chat_prompt_tokens(tok, MSGS)
    c = chat.usage.completion_tokens
    assert c == 7 if chat.choices[0].finish_reason == "length" else c < 7
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + c

    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=7, temperature=0, seed=1,
                                                 stream=True, stream_options={"include_usage": True}))
    assert {ch.model for ch in chunks} == {"tiny/1"}
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == chat.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == c
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == chat.choices[0].finish_reason

    prompt = "Perplexity measures how well a language model predicts text"
    comp = client.completions.create(model="models:/tiny/1", prompt=prompt, max_tokens=9, temperature=0)
    assert comp.model == "tiny/1" and comp.usage.prompt_tokens == text_prompt_tokens(tok, prompt)
    assert comp.usage.completion_tokens == 9 if comp.choices[0].finish_reason == "length" else comp.usage.completion_tokens < 9
    parts = list(client.completions.create(model="tiny/1", prompt=prompt, max_tokens=9, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == comp.choices[0].text
    last = [p for p in parts if p.usage is not None][-1]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (comp.usage.prompt_tokens, comp.usage.completion_tokens)

    models = client.models.list()
    assert {m.id for m in models.data} == {"tiny", "tiny/1"}


def test_sse_with_curl(gguf_server) -> None:
    server, _ = gguf_server
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"model": "tiny", "messages": MSGS, "max_tokens": 5, "stream": True, "temperature": 0})
    r = subprocess.run(["curl", "-sS", "-N", "-D", "-", "--max-time", "60", "-H", f"Authorization: Bearer {KEY}",
                        "-H", "Content-Type: application/json", "-d", body, f"{server.url}/v1/chat/completions"],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    head, _, stream = r.stdout.replace("\r\n", "\n").partition("\n\n")
    assert "text/event-stream" in head.lower() and "x-llmops-model-version: 1" in head.lower()
    events = [line[len("data: "):] for line in stream.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert payloads[-1]["usage"]["completion_tokens"] <= 5 and payloads[-1]["choices"][0]["finish_reason"]


def test_bad_input_is_a_4xx_naming_the_problem(gguf_server) -> None:
    server, _ = gguf_server
    chat = "/v1/chat/completions"
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def post(body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return raw(server, chat, data, headers)

    cases = [
        (b'{"messages": [', 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({**ok, "max_tokens": "8"}, 400, "'max_tokens'"),
        ({**ok, "temperature": 7}, 400, "'temperature'"),
        ({**ok, "stream": "yes"}, 400, "'stream'"),
        ({**ok, "frobnicate": 1}, 400, "unknown field 'frobnicate'"),
        ({**ok, "logprobs": True}, 400, "'logprobs' is not supported"),
        ({"max_tokens": 2}, 400, "'messages' is required"),
        ({"messages": []}, 400, "'messages'"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ({**ok, "n": 3}, 400, "'n'"),
        ({**ok, "max_tokens": 5000}, 400, "limit of 600"),
        ({**ok, "model": "someone-else"}, 404, "not served here"),
        ({"messages": [{"role": "user", "content": "hello world " * 300}]}, 400, "context"),
        (json.dumps({**ok, "pad": "x" * 70000}).encode(), 413, "limit of 65536"),
    ]
    for body, status, needle in cases:
        code, _, data = post(body)
        assert code == status, (body if len(str(body)) < 200 else str(body)[:200], code, data)
        assert needle in data["error"]["message"], (needle, data)
        assert data["error"]["type"] in ("invalid_request_error",)
    # a completion takes several prompts (texts or token ids), each its own choice; not streamed
    code, _, data = raw(server, "/v1/completions", json.dumps({"prompt": ["a", "b"], "max_tokens": 2}).encode())
    assert code == 200 and [c["index"] for c in data["choices"]] == [0, 1], data
    for body, needle in (({"prompt": ["a", "b"], "stream": True}, "one prompt"),
                         ({"prompt": [[1, 2], []]}, "'prompt' is empty"),
                         ({"prompt": [1, 10**6]}, "not in this model's vocabulary"),
                         ({"prompt": [1, "a"]}, "list of token ids"),
                         ({"prompt": "a", "logprobs": 6}, "'logprobs'"),
                         ({"prompt": ["a"] * 3}, "exceed what this server admits")):
        code, _, data = raw(server, "/v1/completions", json.dumps(body).encode())
        assert code == 400 and needle in data["error"]["message"], (body, data)
    code, _, data = raw(server, "/v1/nothing")
    assert code == 404 and "no such endpoint" in data["error"]["message"]
    # authentication: /health is open, everything else needs the key
    assert raw(server, chat, json.dumps(ok).encode(), headers={})[0] == 401
    code, hdrs, data = raw(server, chat, json.dumps(ok).encode(), headers={"Authorization": "Bearer wrong"})
    assert code == 401 and data["error"]["code"] == "invalid_api_key" and hdrs.get("www-authenticate") == "Bearer"
    assert raw(server, "/metrics", headers={})[0] == 401
    assert raw(server, "/health", headers={})[0] == 200
    # and the worker is alive
    code, hdrs, data = post(ok)
    assert code == 200 and hdrs["x-llmops-model-version"] == "1" and data["usage"]["completion_tokens"] <= 2


def test_a_full_queue_answers_503_with_retry_after(gguf_server) -> None:
    """--parallel 2 --max-queue 0: two requests at a time; the rest of a burst is told to come back."""
    server, _ = gguf_server
    body = json.dumps({"prompt": "The quick brown fox", "max_tokens": 120, "temperature": 0}).encode()
    results: list[tuple[int, dict[str, str], Any]] = []
    barrier = threading.Barrier(6)

    def one() -> None:
        barrier.wait()
        results.append(raw(server, "/v1/completions", body))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = sorted(r[0] for r in results)
    assert len(codes) == 6 and set(codes) <= {200, 503}, codes
    assert 200 in codes and 503 in codes, codes
    for code, hdrs, data in results:
        if code == 503:
            assert hdrs.get("retry-after") == "1" and "busy" in data["error"]["message"]
    assert server.health()["in_flight"] == 0


def test_a_client_that_leaves_mid_stream_frees_its_slot(gguf_server) -> None:
    """The chat stream's first event (the assistant role) comes before generation; the client
    leaves right after it, and the generation stops at its next token."""
    server, _ = gguf_server
    body = json.dumps({"messages": [{"role": "user", "content": "go on"}], "max_tokens": 480, "stream": True,
                       "temperature": 0})
    s = socket.create_connection((HOST, server.port), timeout=30)
    s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    got = b""
    while b"data: " not in got:
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    assert b"200 OK" in got.split(b"\r\n", 1)[0]
    s.close()
    deadline = time.time() + 30
    while time.time() < deadline and server.health()["in_flight"] != 0:
        time.sleep(0.05)
    assert server.health()["in_flight"] == 0
    code, _, metrics = raw(server, "/metrics")
    assert code == 200
    assert 'llmops_requests_total{endpoint="chat.completions",model="tiny",status="cancelled",version="1"} 1.0' in metrics
    # the slot is free: the next request (the queue holds none) is served at once
    code, _, data = raw(server, "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 2}).encode())
    assert code == 200, data


def test_metrics_and_traces_of_the_pinned_version(gguf_server) -> None:
    """Runs last in this group: stops the server, whose traces are then all in MLflow."""
    server, env = gguf_server
    assert raw(server, "/v1/models", headers={})[0] == 401
    code, _, metrics = raw(server, "/metrics")
    assert 'llmops_served_version{model="tiny",version="1"} 1.0' in metrics
    assert 'llmops_refused_requests_total{code="401",endpoint="models"}' in metrics
    assert "llmops_time_to_first_token_seconds_bucket" in metrics
    ok = int(float(metrics.split('llmops_requests_total{endpoint="chat.completions",model="tiny",status="ok",version="1"} ')[1].split()[0]))
    assert ok >= 3
    log = server.stop()
    assert "Traceback" not in log, log[-3000:]
    code, text = in_process(env, "--json", "monitor", "tiny", "--all", "--since", "1h")
    assert code == 0, text
    d = json.loads(text)
    (v,) = d["versions"]
    assert v["version"] == "1" and v["cancelled"] >= 1 and v["rejected"] >= 1 and v["errors"] == 0
    assert v["p50_latency_ms"] > 0 and v["p50_ttft_ms"] > 0 and v["tokens_per_s"] > 0
    assert [p["version"] for p in d["phases"]] == ["1"]
    assert json.loads(in_process(env, "--json", "monitor", "tiny")[1])["requests"] == 0  # nothing through @production
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LLMOPS_DATABASE_URL", raising=False)
        from llmops.core.settings import resolve
        from llmops.registry.store import Store
        from llmops.registry.traces import read_requests

        recs = read_requests(Store(resolve(env["LLMOPS_STORE"])), "tiny", 0)
    left = [r for r in recs if r.status == "cancelled"]
    assert left and all(r.completion_tokens < 480 for r in left), [(r.completion_tokens, r.latency_ms) for r in left]
    assert {r.status for r in recs} == {"ok", "cancelled", "rejected"}


# -- ONNX --------------------------------------------------------------------------------------------
def test_onnx_folder_through_onnxruntime_genai(onnx_model, artifacts, tmp_path) -> None:
    env = _env(tmp_path / "store")
    assert register(env, onnx_model, "tiny-onnx") == "1"
    server = start_server(env, "models:/tiny-onnx/1", "--threads", "1", "--no-trace", tmp=tmp_path)
    try:
        client = server.client()
        tok = hf_tokenizer(artifacts["src"])
        health = server.health()
        assert health["backend"] == "onnxruntime-genai" and health["traces"]["enabled"] is False
        chat = client.chat.completions.create(model="tiny-onnx", messages=MSGS, max_tokens=6, temperature=0)
        assert chat.model == "tiny-onnx/1" and chat.usage.prompt_tokens == chat_prompt_tokens(tok, MSGS)
        c = chat.usage.completion_tokens
        assert c == 6 if chat.choices[0].finish_reason == "length" else c < 6
        chunks = list(client.chat.completions.create(model="tiny-onnx", messages=MSGS, max_tokens=6, temperature=0,
                                                     stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == c and chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens
        prompt = "The quick brown fox jumps over the lazy dog."
        comp = client.completions.create(model="tiny-onnx", prompt=prompt, max_tokens=8, temperature=0)
        assert comp.usage.prompt_tokens == text_prompt_tokens(tok, prompt)
        parts = list(client.completions.create(model="tiny-onnx", prompt=prompt, max_tokens=8, temperature=0, stream=True))
        assert "".join(p.choices[0].text for p in parts) == comp.choices[0].text
        assert parts[-1].usage.completion_tokens == comp.usage.completion_tokens
        code, _, data = raw(server, "/v1/completions", json.dumps({"prompt": "word " * 2000, "max_tokens": 2}).encode())
        assert code == 400 and "context" in data["error"]["message"]
    finally:
        log = server.stop()
    assert "Traceback" not in log, log[-3000:]


# -- hot swap under load ------------------------------------------------------------------------------
@dataclass
class Client:
    seen: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def runs(self) -> list[str]:
        out: list[str] = []
        for v in self.seen:
            if not out or out[-1] != v:
                out.append(v)
        return out


# Long enough that the request rate stays within what MLflow's trace export writes to SQLite on
# two cores (each trace costs its store tens of milliseconds), so none is dropped.
MAX_TOKENS_UNDER_LOAD = 32


def _client_loop(server: Server, c: Client, i: int, stop: threading.Event, deadline: float) -> None:
    client = server.client(timeout=60)
    n = 0
    while not stop.is_set() and time.time() < deadline and n < 5000:
        n += 1
        try:
            if (n + i) % 2:
                r = client.chat.completions.create(model="swap", messages=[{"role": "user", "content": f"hi {n}"}],
                                                   max_tokens=MAX_TOKENS_UNDER_LOAD, temperature=0)
                c.seen.append(r.model.split("/")[-1])
            else:
                versions = {ch.model.split("/")[-1] for ch in client.completions.create(
                    model="swap", prompt=f"The quick {n}", max_tokens=MAX_TOKENS_UNDER_LOAD, temperature=0, stream=True)}
                assert len(versions) == 1, versions
                c.seen.append(versions.pop())
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
            c.failures.append(f"{type(exc).__name__}: {exc}")


def _wait(cond, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _load_test(cli, env: dict[str, str], artifacts: dict[str, Path], tmp: Path) -> None:  # noqa: ANN001
    """The promotion and rollbacks run in this process (the CLI in-process), the server in its own."""
    for target, want in (("gguf-f32", "1"), ("gguf-q8_0", "2"), ("gguf-q4_0", "3")):
        r = cli("--json", "models", "register", artifacts[target], "--name", "swap")
        assert r.code == 0 and r.json()["version"] == want, r.err
    assert cli("promote", "swap", "1").code == 0
    server = start_server(env, "models:/swap@production", "--threads", "1", "--poll", "0.25", "--max-queue", "32",
                          tmp=tmp)
    clients = [Client() for _ in range(8)]
    stop = threading.Event()
    deadline = time.time() + 150  # a hard stop whatever happens
    threads = [threading.Thread(target=_client_loop, args=(server, c, i, stop, deadline), daemon=True)
               for i, c in enumerate(clients)]
    try:
        for t in threads:
            t.start()
        _wait(lambda: all(len(c.seen) >= 3 for c in clients), 60, "every client to be served by v1")
        r = cli("--json", "promote", "swap", "2")
        assert r.code == 0, r.err
        _wait(lambda: server.health()["version"] == "2", 60, "the server to switch to v2")
        marks = [len(c.seen) for c in clients]
        _wait(lambda: all(c.seen[m:].count("2") >= 3 for c, m in zip(clients, marks)), 60, "every client to see v2")
        r = cli("--json", "rollback", "swap", "--reason", "v2 misbehaves")
        assert r.code == 0 and r.json()["to_version"] == "1", r.err
        _wait(lambda: server.health()["version"] == "1", 60, "the server to switch back to v1")
        marks = [len(c.seen) for c in clients]
        _wait(lambda: all(c.seen[m:].count("1") >= 3 for c, m in zip(clients, marks)), 60, "every client to see v1")

        # a version whose stored bytes were changed is refused; v1 keeps serving
        stored = Path(cli("--json", "models", "show", "models:/swap/3").json()["stored_uri"].removeprefix("file://"))
        with open(stored, "ab") as fh:
            fh.write(b"tampered")
        assert cli("promote", "swap", "3").code == 0
        _wait(lambda: (server.health().get("last_swap") or {}).get("to_version") == "3", 60, "the failed switch to v3")
        h = server.health()
        assert h["version"] == "1" and h["last_swap"]["ok"] is False and "sha256" in h["last_swap"]["error"]
        marks = [len(c.seen) for c in clients]
        _wait(lambda: all(len(c.seen) >= m + 2 for c, m in zip(clients, marks)), 60, "requests after the refusal")
        r = cli("--json", "rollback", "swap", "--reason", "v3 bytes tampered")
        assert r.code == 0 and r.json()["to_version"] == "1", r.err
    finally:
        stop.set()
        for t in threads:
            t.join(90)
        log = server.stop()

    failures = [f for c in clients for f in c.failures]
    assert failures == [], failures[:5]
    for c in clients:
        assert c.runs() == ["1", "2", "1"], c.runs()
    assert "not switching swap@production to version 3" in log and "sha256" in log
    assert "Traceback" not in log and "discarded" not in log, log[-3000:]

    trail = cli("--json", "promotions", "list", "swap").json()
    assert [(t["version"], t["previous_version"], t["verdict"]) for t in trail] == [
        ("1", None, "passed"), ("2", "1", "passed"), ("1", "2", "rollback"), ("3", "1", "passed"), ("1", "3", "rollback")]

    r = cli("--json", "monitor", "swap", "--since", "30m")
    assert r.code == 0, r.err
    d = r.json()
    assert [p["version"] for p in d["phases"]] == ["1", "2", "1"]
    served = sum(len(c.seen) for c in clients)
    assert d["requests"] == served, (d["requests"], served)
    by = {v["version"]: v for v in d["versions"]}
    assert by["1"]["errors"] == by["2"]["errors"] == 0 and by["2"]["requests"] >= 24
    swaps = [(s["from_version"], s["to_version"], s["status"]) for s in d["swaps"]]
    assert swaps[:3] == [("1", "2", "ok"), ("2", "1", "ok"), ("1", "3", "failed")], swaps
    text = cli("monitor", "swap", "--since", "30m").out
    assert "phases: v1" in text and "→ v2" in text and "FAILED" in text


def _sqlite_env(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("LLMOPS_STORE", str(tmp / "store"))
    for var in ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    return _env(tmp / "store")


def test_promote_and_rollback_under_load_drop_no_request(cli, artifacts, tmp_path, monkeypatch) -> None:
    """8 clients for the whole time; the alias moves to v2, back to v1, then to a tampered v3 that
    is refused. Every request answered, each client sees v1, then v2, then v1; audit and
    monitor show it."""
    _load_test(cli, _sqlite_env(tmp_path, monkeypatch), artifacts, tmp_path)


@pytest.mark.slow
@pytest.mark.postgres
def test_promote_and_rollback_under_load_on_postgres(cli, artifacts, tmp_path, monkeypatch, pg_url) -> None:
    _sqlite_env(tmp_path, monkeypatch)
    monkeypatch.setenv("LLMOPS_DATABASE_URL", pg_url)
    try:
        _load_test(cli, _env(tmp_path / "store", LLMOPS_DATABASE_URL=pg_url), artifacts, tmp_path)
    finally:
        from llmops.registry import db

        db.dispose_all()
