"""Scale-out: a shared MLflow server on PostgreSQL that clients convert, register and promote
through (artifacts uploaded via the server), and many CI writers at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

LLMOPS = str(Path(sys.executable).with_name("llmops"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(store: Path, db_url: str | None, tracking: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "LLMOPS_STORE")}
    env["LLMOPS_STORE"] = str(store)
    if db_url:
        env["LLMOPS_DATABASE_URL"] = db_url
    if tracking:
        env["MLFLOW_TRACKING_URI"] = tracking
    return env


def _run(env: dict[str, str], *args: object, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LLMOPS, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.postgres
def test_clients_work_through_a_shared_server(pg_url, tmp_path, tiny_models, eval_text_path) -> None:
    from llmops.app.server import stop, wait_until_up

    port = _free_port()
    server_store, client_store = tmp_path / "server-store", tmp_path / "client-store"
    server = subprocess.Popen([LLMOPS, "ui", "--serve-artifacts", "--port", str(port)],
                              env=_env(server_store, pg_url), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, server, timeout=300)  # MLflow migrates PostgreSQL on first start: slow on 2 cores
        client = _env(client_store, pg_url, tracking=url)
        # Convert, verify and register from a client process: the bytes go up through the server.
        r = _run(client, "--json", "convert", tiny_models("llama"), "--to", "gguf-q8_0",
                 "-o", tmp_path / "tiny-q8.gguf", "--register", "shared", "--eval-text", eval_text_path)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["registered"]["uri"] == "models:/shared/1"
        r = _run(client, "promote", "shared", "1", "--gate", "kld < 0.05", "--gate", "top1 >= 0.9")
        assert r.returncode == 0, r.stderr + r.stdout
        r = _run(client, "verify", "models:/shared/1")  # downloads through the server and re-hashes
        assert r.returncode == 0, r.stderr
        r = _run(client, "--json", "lineage", "models:/shared/1")
        assert r.returncode == 0, r.stderr
        assert {e["relation"] for e in json.loads(r.stdout)["edges"]} == {"converted_from", "evaluated_on"}

        stored = [p for p in (server_store / "artifacts").rglob("*.gguf")]
        assert len(stored) == 1 and stored[0].stat().st_size == (tmp_path / "tiny-q8.gguf").stat().st_size
        assert not [p for p in client_store.rglob("*") if p.is_file() and p.suffix == ".gguf"]

        from mlflow import MlflowClient

        mc = MlflowClient(tracking_uri=url, registry_uri=url)
        mv = mc.get_model_version_by_alias("shared", "production")
        assert mv.version == "1" and mv.tags["format"] == "gguf"
        assert mv.source.startswith("mlflow-artifacts:")
    finally:
        stop(server, timeout=30)


def _register_and_promote(env: dict[str, str], path: Path, threshold_mb: float) -> tuple[int, str, int, str]:
    r = _run(env, "--json", "models", "register", path, "--name", "race")
    if r.returncode != 0:
        return r.returncode, "", -1, r.stderr
    version = json.loads(r.stdout)["version"]
    p = _run(env, "promote", "race", version, "--gate", f"file_mb <= {threshold_mb}")
    return 0, version, p.returncode, p.stderr


def _race(env: dict[str, str], tmp_path: Path, n: int) -> list[tuple[int, str, int, str]]:
    files = []
    for i in range(n):
        f = tmp_path / f"w{i}.bin"
        f.write_bytes(os.urandom(1024 * (1 + i)))  # distinct bytes, growing sizes
        files.append(f)
    threshold = (1024 * (n // 2)) / (1024 * 1024)  # the first half pass their gate, the rest fail
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda f: _register_and_promote(env, f, threshold), files))


def _check_race(env: dict[str, str], results: list[tuple[int, str, int, str]], n: int) -> None:
    for reg_rc, _version, promo_rc, err in results:
        assert reg_rc == 0, err
        assert promo_rc in (0, 1), err  # passed, or a failed gate: nothing else
        assert "locked" not in err.lower()
    versions = sorted(int(v) for _, v, _, _ in results)
    assert versions == list(range(1, n + 1))  # no gaps, no duplicates
    assert sum(1 for r in results if r[2] == 0) == n // 2
    audit = json.loads(_run(env, "--json", "promotions", "list", "race").stdout)
    rows = audit["promotions"] if isinstance(audit, dict) else audit
    assert len(rows) == n
    shown = json.loads(_run(env, "--json", "models", "show", "models:/race@production").stdout)
    passed = {v for _, v, rc, _ in results if rc == 0}
    assert shown["version"] in passed  # the alias is on exactly one version, one that passed


@pytest.mark.postgres
def test_sixteen_ci_jobs_at_once_on_postgresql(pg_url, tmp_path) -> None:
    env = _env(tmp_path / "store", pg_url)
    assert _run(env, "db", "upgrade").returncode == 0
    _check_race(env, _race(env, tmp_path, 16), 16)


def test_four_writers_at_once_on_sqlite(tmp_path) -> None:
    env = _env(tmp_path / "store", None)
    assert _run(env, "db", "upgrade").returncode == 0
    _check_race(env, _race(env, tmp_path, 4), 4)
