"""Operational safety: no secret on a command line, a warning before serving artifacts to the
network, a bounded baseline-logits cache, and evaluation scratch kept out of a RAM-backed /tmp."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

LLMOPS = str(Path(sys.executable).parent / "llmops")
PG_URL = "postgresql+psycopg://alice:Pa55-w0rd.secret@db.example.org:5432/llmops"


def _store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_url: str | None = None):  # noqa: ANN202
    from llmops.core.settings import resolve
    from llmops.registry.store import Store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    if db_url is None:
        monkeypatch.delenv("LLMOPS_DATABASE_URL", raising=False)
    else:
        monkeypatch.setenv("LLMOPS_DATABASE_URL", db_url)
    return Store(resolve(tmp_path / "store"))


# -- the database URI goes through the environment ----------------------------------------
def test_mlflow_reads_the_store_uris_from_these_variables() -> None:
    """The variable names are MLflow's own (its CLI options' envvar), not a guess."""
    from mlflow.cli import server

    from llmops.app.server import BACKEND_STORE_ENV, REGISTRY_STORE_ENV

    envvars = {p.name: p.envvar for p in server.params}
    assert envvars["backend_store_uri"] == BACKEND_STORE_ENV == "MLFLOW_BACKEND_STORE_URI"
    assert envvars["registry_store_uri"] == REGISTRY_STORE_ENV == "MLFLOW_REGISTRY_STORE_URI"
    assert "app_name" in envvars  # the basic-auth app the warning points to: --app-name basic-auth


@pytest.mark.parametrize("serve_artifacts", [False, True])
def test_server_argv_carries_no_password(monkeypatch, tmp_path, serve_artifacts) -> None:
    from llmops.app.server import server_launch

    store = _store(monkeypatch, tmp_path, PG_URL)
    argv, env = server_launch(store, "0.0.0.0", 5123, serve_artifacts=serve_artifacts, workers=2,
                              base_env={"PATH": "/usr/bin", "MLFLOW_READ_REPLICA_BACKEND_STORE_URI": "sqlite:///x"})
    for secret in ("Pa55-w0rd.secret", "alice", PG_URL, "db.example.org"):
        assert not any(secret in a for a in argv), (secret, argv)
    assert env["MLFLOW_BACKEND_STORE_URI"] == PG_URL
    assert env["MLFLOW_REGISTRY_STORE_URI"] == PG_URL
    assert "MLFLOW_READ_REPLICA_BACKEND_STORE_URI" not in env
    assert env["PATH"] == "/usr/bin"
    assert argv[1:4] == ["-m", "mlflow", "server"] and "--backend-store-uri" not in argv
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "5123"
    assert ("--serve-artifacts" in argv) is serve_artifacts


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return []


def _with_password(url: str) -> str:
    """``url`` with a password in it: its own, or a made-up one where the server trusts local
    connections (a test server's usual setup); skips where the made-up one is refused."""
    from sqlalchemy import create_engine, make_url

    u = make_url(url)
    if u.password:
        return url
    fake = u.set(password="Fake-Pa55.for-ps").render_as_string(hide_password=False)
    engine = create_engine(fake, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as c:
            c.exec_driver_sql("SELECT 1")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"the test server refuses a made-up password: {type(exc).__name__}")
    finally:
        engine.dispose()
    return fake


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ui_database(request: pytest.FixtureRequest, tmp_path: Path):  # noqa: ANN201
    """(LLMOPS_DATABASE_URL or None, the database URI, the secret that must stay off argv)."""
    if request.param == "sqlite":
        db_url = f"sqlite:///{(tmp_path / 'store').resolve() / 'llmops.db'}"
        yield None, db_url, db_url
        return
    from sqlalchemy import make_url

    from llmops.registry import db

    url = _with_password(request.getfixturevalue("pg_url"))
    yield url, url, make_url(url).password
    db.dispose_all()


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_ui_child_gets_the_database_through_its_environment(tmp_path, ui_database) -> None:
    """A real `llmops ui`: no process it starts has the database URI (on PostgreSQL: its
    password) in its argv, which `ps` shows every user; MLflow's server has it in its
    environment, readable only by its owner."""
    from llmops.app.server import port_free, stop, wait_until_up

    setting, db_url, secret = ui_database
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.pop("LLMOPS_DATABASE_URL", None)
    env["LLMOPS_STORE"] = str(tmp_path / "store")
    if setting:
        env["LLMOPS_DATABASE_URL"] = setting
    port = next(p for p in range(5700, 5800) if port_free("127.0.0.1", p))
    proc = subprocess.Popen([LLMOPS, "ui", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}", proc, timeout=300)  # PostgreSQL: MLflow migrates first
        tree = _descendants(proc.pid)
        argvs = {p: _cmdline(p) for p in tree}
        servers = [p for p, a in argvs.items() if a[1:4] == ["-m", "mlflow", "server"]]
        assert servers and len(tree) > 2, argvs  # llmops, MLflow's server, and its workers
        for p, argv in argvs.items():
            assert not any(secret in a or db_url in a for a in argv), (p, argv)
        environ = Path(f"/proc/{servers[0]}/environ").read_bytes().split(b"\0")
        assert f"MLFLOW_BACKEND_STORE_URI={db_url}".encode() in environ
        assert os.stat(f"/proc/{servers[0]}/environ").st_mode & 0o077 == 0  # owner only
    finally:
        stop(proc, timeout=60)
        _, err = proc.communicate(timeout=30)
    assert "warning:" not in err  # loopback: nothing to warn about
    assert secret not in err
    # Stopping `llmops ui` stops every process the server started (its own process group).
    deadline = time.time() + 15
    while time.time() < deadline and any(_running(p) for p in tree):
        time.sleep(0.2)
    assert not [argvs[p][:4] for p in tree if _running(p)]


# -- serving artifacts beyond loopback -----------------------------------------------------
def test_exposure_warning_decides_by_host() -> None:
    from llmops.app.server import exposure_warning, is_loopback

    for host in ("127.0.0.1", "127.0.1.1", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
        assert exposure_warning(host, 5000, True) is None
    for host in ("0.0.0.0", "::", "192.168.1.20", "10.0.0.5"):
        assert not is_loopback(host), host
        w = exposure_warning(host, 5000, True)
        assert w is not None and "\n" not in w and "mlflow server --app-name basic-auth" in w
    assert exposure_warning("0.0.0.0", 5000, False) is None  # the UI alone: not this warning


def _busy(host: str) -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind((host, 0))
    s.listen()
    return s, s.getsockname()[1]


def test_ui_warns_on_stderr_before_serving_artifacts_to_the_network(cli, tmp_path, monkeypatch) -> None:
    """The real command line, on a busy port so that no server has to start."""
    monkeypatch.setenv("LLMOPS_STORE", str(tmp_path / "s"))
    monkeypatch.delenv("LLMOPS_DATABASE_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s, port = _busy("0.0.0.0")
    with s:
        r = cli("ui", "--host", "0.0.0.0", "--serve-artifacts", "--port", str(port))
    assert r.code == 1 and "in use" in r.err
    warnings = [line for line in r.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, r.err
    assert f"0.0.0.0:{port}" in warnings[0] and "without authentication" in warnings[0]
    assert "mlflow server --app-name basic-auth" in warnings[0]
    assert r.out == ""

    s, port = _busy("127.0.0.1")
    with s:
        r = cli("ui", "--host", "127.0.0.1", "--serve-artifacts", "--port", str(port))
    assert r.code == 1 and "in use" in r.err and "warning:" not in r.err


# -- the baseline-logits cache --------------------------------------------------------------
def test_logits_cache_limit_from_the_environment(monkeypatch) -> None:
    from llmops.core.errors import UsageError
    from llmops.core.settings import logits_cache_limit_bytes

    monkeypatch.delenv("LLMOPS_LOGITS_CACHE_MB", raising=False)
    assert logits_cache_limit_bytes() == 4096 * 1024 * 1024
    monkeypatch.setenv("LLMOPS_LOGITS_CACHE_MB", "0")
    assert logits_cache_limit_bytes() == 0
    monkeypatch.setenv("LLMOPS_LOGITS_CACHE_MB", "1.5")
    assert logits_cache_limit_bytes() == 1536 * 1024
    for bad in ("-1", "lots", "nan", "inf"):
        monkeypatch.setenv("LLMOPS_LOGITS_CACHE_MB", bad)
        with pytest.raises(UsageError, match="LLMOPS_LOGITS_CACHE_MB"):
            logits_cache_limit_bytes()


def test_logits_cache_evicts_the_least_recently_used(tmp_path) -> None:
    from llmops.benchmarks.accuracy import _cache_hit, _store

    cache, work = tmp_path / "logits", tmp_path / "work"
    work.mkdir()
    said: list[str] = []

    def produce(name: str, value: float) -> Path:
        p = work / f"{name}.npy"
        np.save(p, np.full((2, 100), value, dtype=np.float32))
        return p

    size = produce("probe", 0).stat().st_size
    limit = int(3.5 * size)  # room for three entries
    entries = {n: cache / f"logits-{n}.npy" for n in "abcd"}
    now = time.time()
    for i, n in enumerate("abc"):
        assert _store(entries[n], produce(n, i), limit, said.append)
        os.utime(entries[n], (now - 100 + i, now - 100 + i))  # a, then b, then c: oldest first
    assert said[-1].startswith(f"source logits cached at {entries['c']} (")
    assert "LLMOPS_LOGITS_CACHE_MB" in said[-1]

    hit = _cache_hit(entries["a"])  # a use moves a to the back of the queue
    assert hit is not None and float(hit[0, 0]) == 0.0
    del hit
    assert _store(entries["d"], produce("d", 3), limit, said.append)
    assert sorted(p.name for p in cache.iterdir()) == ["logits-a.npy", "logits-c.npy", "logits-d.npy"]
    assert _cache_hit(entries["b"]) is None  # evicted: a miss, not an error
    assert sum(p.stat().st_size for p in cache.iterdir()) <= limit
    assert all(p.exists() for p in work.iterdir())  # the produced files are not moved away

    # An entry larger than the whole cap is not cached, and evicts nothing.
    big = work / "big.npy"
    np.save(big, np.zeros((40, 100), dtype=np.float32))
    assert not _store(cache / "logits-big.npy", big, limit, said.append)
    assert "not cached" in said[-1] and len(list(cache.iterdir())) == 3

    # A leftover temporary file of a killed writer counts, and goes first once it is stale.
    stale = cache / "logits-e.tmp999999"
    stale.write_bytes(b"\0" * size)
    os.utime(stale, (now - 7200, now - 7200))
    assert _store(cache / "logits-f.npy", produce("f", 5), limit, said.append)
    assert not stale.exists()
    assert len(list(cache.glob("logits-*.npy"))) == 3


# -- evaluation end to end: scratch in the cache, the cache capped ---------------------------
def _text(n_lines: int = 400) -> str:
    from llmops.app.tiny_models import _CORPUS

    words = _CORPUS.split()
    rng = random.Random(0)
    return "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(n_lines)) + "\n"


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    from llmops.app.converting import convert
    from llmops.app.tiny_models import tiny_model

    root = tmp_path_factory.mktemp("reliability")
    src = tiny_model("llama", root / "src")
    rec = convert(src, "gguf-f32", root / "tiny-f32.gguf", verify=False)
    return src, Path(rec.output)


def test_evaluation_scratch_goes_to_the_cache_and_is_removed(tiny_pair, tmp_path, monkeypatch) -> None:
    import tempfile

    import llmops.benchmarks.accuracy as accuracy
    from llmops.benchmarks.bench import BenchOptions, bench_artifact

    src, gguf = tiny_pair
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMOPS_CACHE", str(cache))
    monkeypatch.delenv("LLMOPS_LOGITS_CACHE_MB", raising=False)
    # Anything still written to the system temporary folder would land here.
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    scratch = cache / "scratch"
    seen: list[Path] = []
    real = accuracy.run_in_child

    def spy(job, what, workdir, timeout=None):  # noqa: ANN001, ANN202
        files = [Path(v) for k, v in job.items() if k in ("text_file", "out", "inputs", "targets", "nll") and v]
        for f in [Path(workdir), *files]:
            assert f.resolve().is_relative_to(scratch.resolve()), (what, f)
        seen.extend(files)
        reply = real(job, what, workdir, timeout)
        assert all(f.exists() for f in files)  # written there
        return reply

    monkeypatch.setattr(accuracy, "run_in_child", spy)
    text = _text()
    logits = cache / "logits"
    said: list[str] = []
    res = accuracy.evaluate(gguf, text, source=src, chunks=2, n_ctx=128, threads=2, source_cache=logits,
                            progress=said.append)
    assert res["kld"] is not None and res["kld"] < 1e-3  # f32 GGUF against its own source
    assert {f.name for f in seen} >= {"text.txt", "output-inputs.npy", "output.npy", "source.npy", "output-nll.npy"}
    assert scratch.is_dir() and list(scratch.iterdir()) == []  # cleaned after use
    assert list(systmp.iterdir()) == []
    info = res["source_cache"]
    entry = Path(info["entry"])
    assert info["hit"] is False and info["dir"] == str(logits.resolve()) and info["limit_mb"] == 4096
    assert entry.is_file() and entry.parent == logits
    assert any(m.startswith(f"source logits cached at {entry} (") for m in said), said

    # The same baseline again, through `llmops bench`'s code: a cache hit, its path in the details.
    monkeypatch.setattr(accuracy, "run_in_child", real)
    seen.clear()
    before = entry.stat().st_mtime
    os.utime(entry, (before - 50, before - 50))
    out = bench_artifact(gguf, BenchOptions(metrics={"accuracy"}, text=text, chunks=2, ctx=128, threads=2,
                                            baseline=src, cache_dir=logits), progress=said.append)
    details = out["details"]["baseline_logits_cache"]
    assert details == {"dir": str(logits.resolve()), "entry": str(entry), "hit": True, "limit_mb": 4096}
    assert entry.stat().st_mtime > before - 50  # touched on the hit
    assert out["metrics"]["kld"] == pytest.approx(res["kld"])
    assert list(scratch.iterdir()) == [] and list(systmp.iterdir()) == []

    # A cap smaller than the entry: evaluated, not cached; 0: caching off altogether.
    monkeypatch.setenv("LLMOPS_LOGITS_CACHE_MB", "0.01")
    small = tmp_path / "small-cache"
    res = accuracy.evaluate(gguf, text, source=src, chunks=2, n_ctx=128, threads=2, source_cache=small,
                            in_process=True, progress=said.append)
    assert res["source_cache"]["entry"] is None and not list(small.glob("logits-*.npy"))
    assert any(m.startswith("source logits not cached:") for m in said)
    monkeypatch.setenv("LLMOPS_LOGITS_CACHE_MB", "0")
    res = accuracy.evaluate(gguf, text, source=src, chunks=2, n_ctx=128, threads=2, source_cache=small,
                            in_process=True, progress=said.append)
    assert res["source_cache"] == {"dir": str(small.resolve()), "entry": None, "hit": False, "limit_mb": 0}
    assert not small.exists()
    assert list(scratch.iterdir()) == [] and list(systmp.iterdir()) == []
