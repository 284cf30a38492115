"""`llmops serve` against hostile clients: web pages driving a key-less server (cross-site
posts, DNS rebinding), bodies a JSON parser chokes on, traces a client could inflate, what
`/health` tells strangers, gates a client could game, and IPv6 loopback."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_serve import KEY, Server, _env, _wait, artifacts, raw, register, start_server  # noqa: F401 - a fixture

CHAT = "/v1/chat/completions"
OK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
ECHO = json.dumps({"prompt": [1, 2, 3], "max_tokens": 0, "echo": True, "logprobs": 1}).encode()
TOKENIZE = json.dumps({"prompt": "hello"}).encode()
DETOKENIZE = json.dumps({"tokens": [1, 2]}).encode()


def request(server: Server, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            host: str | None = None) -> tuple[int, Any]:
    """One request with exactly these headers (urllib would add a Content-Type of its own)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest("POST" if body is not None else "GET", path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or f"127.0.0.1:{server.port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def open_server(artifacts, tmp_path_factory) -> Iterator[tuple[Server, dict[str, str]]]:  # noqa: F811
    """A key-less server on loopback, as `llmops serve` runs by default, tracing into its store."""
    tmp = tmp_path_factory.mktemp("serve-open")
    env = _env(tmp / "store")
    assert register(env, artifacts["gguf-f32"], "tiny") == "1"
    server = start_server(env, "models:/tiny/1", "--threads", "1", "--ctx", "256", "--max-tokens", "8",
                          "--max-request-bytes", "2m", "--allowed-host", "models.internal", tmp=tmp)
    yield server, env
    server.stop()


def test_a_cross_site_form_post_gets_no_completion(open_server) -> None:
    """A page's `fetch(url, {method: 'POST', body})` sends text/plain without a preflight."""
    server, _ = open_server
    body = json.dumps(OK).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        code, data = request(server, CHAT, body, headers)
        assert code == 415, (ctype, code, data)
        assert "application/json" in data["error"]["message"]
    code, data = request(server, CHAT, body, {"Content-Type": "application/json; charset=utf-8"})
    assert code == 200, data


def test_dns_rebinding_and_foreign_origins_are_refused(open_server) -> None:
    server, _ = open_server
    body = json.dumps(OK).encode()
    js = {"Content-Type": "application/json"}
    for host in ("attacker.example", "attacker.example:8000", "127.0.0.1.nip.io"):
        for path, data in ((CHAT, body), ("/v1/models", None), ("/health", None), ("/metrics", None)):
            code, answer = request(server, path, data, js if data else {}, host=host)
            assert code == 403, (host, path, code, answer)
            assert "--allowed-host" in answer["error"]["message"]
    code, answer = request(server, CHAT, body, {**js, "Origin": "https://attacker.example"})
    assert code == 403 and "web page" in answer["error"]["message"], answer
    assert request(server, CHAT, body, {**js, "Origin": "null"})[0] == 403
    # what reaches it legitimately: loopback names, IP literals, the allowed name, its own origin
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "[::1]", "models.internal:80",
                 "MODELS.INTERNAL"):
        assert request(server, "/v1/models", host=host)[0] == 200, host
    assert request(server, CHAT, body, {**js, "Origin": f"http://localhost:{server.port}"})[0] == 200


def test_a_key_makes_the_host_check_the_key(artifacts, tmp_path) -> None:  # noqa: F811
    """With --api-key a request from any name is answered when it carries the key (a page
    cannot add the header cross-site without a preflight), and /health tells a stranger only
    that the server is up."""
    env = _env(tmp_path / "store")
    register(env, artifacts["gguf-q4_0"], "keyed")
    server = start_server({**env, "LLMOPS_API_KEY": KEY}, "models:/keyed/1", "--threads", "1", "--ctx", "256",
                          "--no-trace", key=KEY, tmp=tmp_path)
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        assert request(server, "/v1/models", headers=auth, host="models.example.com")[0] == 200
        code, data = request(server, "/health")
        assert code == 200 and data == {"status": "ok"}
        code, data = request(server, "/health", headers={"Authorization": "Bearer wrong"})
        assert data == {"status": "ok"}
        code, data = request(server, "/health", headers=auth)
        assert data["version"] == "1" and data["sha256"] and "ref" in data
        code, data = request(server, CHAT, json.dumps(OK).encode(), {**auth, "Content-Type": "text/plain"})
        assert code == 415
        # the tokenizer endpoints and scoring completions (echo, logprobs) need the key too
        js = {"Content-Type": "application/json"}
        for path, body in (("/tokenize", TOKENIZE), ("/detokenize", DETOKENIZE), ("/tokenizer_info", None),
                           ("/v1/completions", ECHO)):
            code, data = request(server, path, body, js if body else {})
            assert code == 401 and data["error"]["code"] == "invalid_api_key", (path, data)
            assert request(server, path, body, {**(js if body else {}), **auth})[0] == 200, path
    finally:
        server.stop()


def test_health_details_stay_on_this_machine(open_server) -> None:
    """Without a key, a loopback client (the operator) sees the details; a client from another
    address sees only the status."""
    server, _ = open_server
    code, data = request(server, "/health")
    assert code == 200 and data["version"] == "1" and "sha256" in data

    from llmops.app.serving.guard import is_loopback_address

    assert is_loopback_address("127.0.0.1") and is_loopback_address("::1") and is_loopback_address("::ffff:127.0.0.1")
    assert not is_loopback_address("10.0.0.5") and not is_loopback_address("::ffff:10.0.0.5")
    assert not is_loopback_address("testclient")


def test_health_from_another_address_says_only_ok(artifacts, tmp_path) -> None:  # noqa: F811
    """Bound to every address, reached through this host's own non-loopback address."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only picks the outgoing interface
            addr = s.getsockname()[0]
    except OSError:
        addr = ""
    if not addr or addr.startswith("127."):
        pytest.skip("this host has no non-loopback IPv4 address")
    env = _env(tmp_path / "store")
    register(env, artifacts["gguf-q4_0"], "wide")
    server = start_server(env, "models:/wide/1", "--host", "0.0.0.0", "--threads", "1", "--ctx", "256",
                          "--no-trace", tmp=tmp_path)
    try:
        conn = http.client.HTTPConnection(addr, server.port, timeout=30)
        conn.request("GET", "/health")
        r = conn.getresponse()
        data = json.loads(r.read())
        conn.close()
        assert r.status == 200 and data == {"status": "ok"}, data
        assert "sha256" in server.health()  # loopback still sees it
    finally:
        log = server.stop()
    assert "without an API key" in log  # the exposure warning


@pytest.mark.parametrize("body, needle", [
    (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
    (b'{"messages": [{"role": "user", "content": "x"}], "seed": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"messages": "\xff\xfe"}', "UTF-8"),
])
def test_bodies_the_parser_chokes_on_are_a_400(open_server, body: bytes, needle: str) -> None:
    server, _ = open_server
    code, data = request(server, CHAT, body, {"Content-Type": "application/json"})
    assert code == 400, (code, data)
    assert needle in data["error"]["message"] and "Traceback" not in json.dumps(data)
    assert request(server, CHAT, json.dumps(OK).encode(), {"Content-Type": "application/json"})[0] == 200


def _store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_refused_requests_are_traced_by_size_not_body(artifacts, tmp_path) -> None:  # noqa: F811
    """Forty ~0.9 MB requests refused for their length leave traces of a few hundred bytes,
    not their messages."""
    env = _env(tmp_path / "store")
    register(env, artifacts["gguf-q4_0"], "flood")
    server = start_server(env, "models:/flood/1", "--threads", "1", "--ctx", "256", "--max-request-bytes", "2m",
                          tmp=tmp_path)
    store_dir = tmp_path / "store"
    big = {"messages": [{"role": "user", "content": f"{i} " + "lorem ipsum " * 250} for i in range(300)],
           "max_tokens": 2}
    payload = json.dumps(big).encode()
    assert len(payload) > 900_000
    try:
        before = _store_bytes(store_dir)
        for _ in range(40):
            code, data = request(server, CHAT, payload, {"Content-Type": "application/json"})
            assert code == 400 and "context" in data["error"]["message"], data
    finally:
        server.stop()  # writes what is queued
    grown = _store_bytes(store_dir) - before
    assert grown < 4 << 20, f"the store grew by {grown} bytes for 40 refused requests"

    from llmops.core.settings import resolve
    from llmops.registry.store import Store

    store = Store(resolve(store_dir))
    store.open()
    found = store.mlflow.search_traces(locations=[store.experiment_id], include_spans=True,
                                       filter_string="tags.`llmops.status` = 'rejected'")
    assert len(found) == 40
    inputs = found[0].data.spans[0].inputs
    assert inputs == {"refused_body_bytes": len(payload)}, str(inputs)[:300]


def test_a_trace_keeps_a_bounded_share_of_a_request() -> None:
    from llmops.app.serving.tracing import MAX_INPUT_TEXT, MAX_TEXT, bound_messages, record_bytes, RequestRecord

    msgs = [{"role": "user", "content": "x" * 3000} for _ in range(1000)]
    kept = bound_messages(msgs)
    assert sum(len(m["content"]) for m in kept[:-1]) <= MAX_INPUT_TEXT + 100 * len(kept)
    assert kept[-1]["role"] == "llmops" and "more messages" in kept[-1]["content"]
    one = bound_messages([{"role": "user", "content": "y" * 100_000}])
    assert len(one) == 1 and len(one[0]["content"]) < MAX_TEXT + 100
    rec = RequestRecord(endpoint="chat.completions", start_ns=0, t_arrival=0.0, name="m", version="1", alias=None,
                        logged_model_id=None, inputs={"messages": kept}, output="z" * 100)
    assert record_bytes(rec) < 64 << 10


def test_the_trace_queue_is_bounded_in_bytes(tmp_path, monkeypatch) -> None:
    """Records beyond the byte budget are dropped and counted, not held."""
    from llmops.app.serving.tracing import RequestRecord, Tracer
    from llmops.core.settings import resolve
    from llmops.registry.store import Store

    monkeypatch.setenv("LLMOPS_STORE", str(tmp_path / "store"))
    monkeypatch.delenv("LLMOPS_DATABASE_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = Store(resolve(tmp_path / "store"))
    store.open()
    logs: list[str] = []
    tracer = Tracer(store, True, logs.append, max_queue_bytes=200_000)
    try:
        tracer._proc.kill()  # a writer that never drains: everything stays queued
        tracer._proc.join(30)
        for i in range(100):
            tracer.request(RequestRecord(endpoint="completions", start_ns=time.time_ns(), t_arrival=0.0, name="m",
                                         version="1", alias=None, logged_model_id=None,
                                         inputs={"prompt": "p" * 4000}, output="o" * 4000))
        assert tracer.queued_bytes <= 200_000
        assert tracer.dropped >= 70 and any("queue is full" in m for m in logs)
    finally:
        tracer.close()


def test_client_errors_do_not_dilute_the_server_error_rate() -> None:
    from llmops.registry import traces as T

    def rec(status: str) -> T.RequestRecord:
        return T.RequestRecord(version="1", alias="production", status=status, endpoint="chat.completions",
                               timestamp_ms=1, acquired_ms=1, latency_ms=10.0, ttft_ms=1.0, generation_ms=5.0,
                               prompt_tokens=3, completion_tokens=2)

    served = [rec("ok")] * 8 + [rec("error")] * 2
    s = T.summarize_version("1", served)
    flooded = T.summarize_version("1", served + [rec("rejected")] * 990 + [rec("cancelled")] * 500)
    assert s.error_rate == flooded.error_rate == 0.2
    assert flooded.served == 10 and flooded.requests == 1500 and flooded.rejected == 990
    assert flooded.client_error_rate == pytest.approx(0.66)


def test_ipv6_loopback_serves(artifacts, tmp_path) -> None:  # noqa: F811
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    from llmops.app.server import port_free, url_host

    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert not port_free("::1", taken)
    assert port_free("::1", taken) and port_free("[::1]", taken)
    assert url_host("::1") == "[::1]" and url_host("127.0.0.1") == "127.0.0.1"

    import subprocess

    from test_serve import LLMOPS, die_with_parent, free_port

    env = _env(tmp_path / "store")
    register(env, artifacts["gguf-q4_0"], "six")
    port = free_port()
    log = tmp_path / "serve6.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([LLMOPS, "serve", "models:/six/1", "--host", "::1", "--port", str(port),
                                 "--threads", "1", "--ctx", "256", "--no-trace"], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(log.read_text())
            try:
                conn = http.client.HTTPConnection("::1", port, timeout=5)
                conn.request("GET", "/v1/models")
                ok = conn.getresponse().status == 200
                conn.close()
                return ok
            except OSError:
                return False

        _wait(up, 180, "llmops serve on [::1]")
        assert f"http://[::1]:{port}/v1" in log.read_text()
    finally:
        from llmops.app.server import stop

        stop(proc, timeout=60)


def test_the_tokenizer_and_echo_paths_keep_the_guard(open_server) -> None:
    """/tokenize, /detokenize, /tokenizer_info and completions with echo and logprobs on a
    key-less server: a foreign Host or Origin (403) and a form post (415) are refused (the key
    they need where one is set: test_a_key_makes_the_host_check_the_key)."""
    server, _ = open_server
    js = {"Content-Type": "application/json"}
    for path, body in (("/tokenize", TOKENIZE), ("/detokenize", DETOKENIZE), ("/tokenizer_info", None),
                       ("/v1/completions", ECHO)):
        assert request(server, path, body, js if body else {}, host="attacker.example")[0] == 403, path
        assert request(server, path, body, {**js, "Origin": "https://attacker.example"} if body else
                       {"Origin": "https://attacker.example"})[0] == 403, path
        if body is not None:
            assert request(server, path, body, {"Content-Type": "text/plain"})[0] == 415, path
        assert request(server, path, body, js if body else {})[0] == 200, path


def test_a_long_batch_of_prompts_stays_within_the_limits(open_server) -> None:
    """Prompts beyond what the server admits at once are refused whole (400), a body past the
    limit is refused before it is read (413), and the server answers the next request."""
    server, _ = open_server
    js = {"Content-Type": "application/json"}
    many = json.dumps({"prompt": [[1, 2, 3]] * 1000, "max_tokens": 1, "echo": True, "logprobs": 5}).encode()
    code, data = request(server, "/v1/completions", many, js)
    assert code == 400 and "exceed what this server admits" in data["error"]["message"], data
    huge = json.dumps({"prompt": [[7] * 200] * 4000, "max_tokens": 1, "echo": True, "logprobs": 5}).encode()
    assert len(huge) > 2 << 20
    code, data = request(server, "/v1/completions", huge, js)
    assert code == 413 and "limit" in data["error"]["message"], data
    code, data = request(server, "/v1/completions", json.dumps({"prompt": "x", "logprobs": 50}).encode(), js)
    assert code == 400 and "'logprobs'" in data["error"]["message"]
    assert request(server, "/v1/completions", json.dumps({"prompt": [1, 2], "max_tokens": 1, "echo": True,
                                                          "logprobs": 5}).encode(), js)[0] == 200
