"""The command-line contract: instant help, every command present, one-line errors, --json anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LLMOPS = str(Path(sys.executable).parent / "llmops")
HEAVY = ("torch", "transformers", "mlflow", "gguf", "llama_cpp", "onnxruntime", "sqlalchemy", "numpy")
COMMANDS = [
    ["convert"], ["bench"], ["bench", "compare"], ["models", "register"], ["models", "list"], ["models", "show"],
    ["prompts", "add"], ["prompts", "list"], ["prompts", "show"], ["prompts", "diff"], ["datasets", "add"],
    ["datasets", "list"], ["datasets", "show"], ["lineage"], ["promote"], ["promotions", "list"], ["verify"],
    ["ui"], ["db", "upgrade"], ["db", "current"],
]


def test_help_imports_nothing_heavy() -> None:
    """Every --help runs without importing torch, transformers, mlflow or the SQL stack."""
    code = (
        "import sys\n"
        "from llmops.cli import main\n"
        f"for args in {COMMANDS!r}:\n"
        "    assert main([*args, '--help']) == 0, args\n"
        "assert main(['--help']) == 0\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_every_command_of_the_contract_is_listed() -> None:
    r = subprocess.run([LLMOPS, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    for name in ("convert", "bench", "models", "prompts", "datasets", "lineage", "promote", "promotions",
                 "verify", "ui", "db"):
        assert f"  {name} " in r.stdout, name


def test_a_converter_that_is_not_installed_says_so_and_exits_2(cli, tiny_models, tmp_path, monkeypatch) -> None:
    from llmops.converters import api

    monkeypatch.setitem(api.CONVERTERS, "gguf", "llmops.converters.not_installed:Converter")
    r = cli("convert", tiny_models("llama"), "--to", "gguf-q8_0", "-o", tmp_path / "x.gguf", "--no-verify")
    assert r.code == 2
    assert r.err.strip().startswith("error:") and "not available" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_json_before_and_after_the_command(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLMOPS_STORE", str(tmp_path / "s"))
    monkeypatch.delenv("LLMOPS_DATABASE_URL", raising=False)
    a = cli("--json", "models", "list")
    b = cli("models", "list", "--json")
    assert a.code == b.code == 0
    assert a.json() == b.json() == []
    c = cli("models", "list", "--store", str(tmp_path / "other"), "--json")
    assert c.code == 0 and (tmp_path / "other" / "llmops.db").exists()


def test_usage_errors_are_one_line_and_exit_2(cli) -> None:
    r = cli("models", "register")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1
    r = cli("no-such-command")
    assert r.code == 2 and "No such command" in r.err


def test_ui_serves_the_store_to_mlflows_client(tmp_path, tiny_models) -> None:
    """`llmops ui` starts MLflow's server on the store; MLflow's own client reads the model over HTTP."""
    from llmops.server import port_free, stop, wait_until_up

    env = {**os.environ, "LLMOPS_STORE": str(tmp_path / "store")}
    env.pop("LLMOPS_DATABASE_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    reg = subprocess.run([LLMOPS, "--json", "models", "register", str(tiny_models("qwen2")), "--name", "ui-model"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert reg.returncode == 0, reg.stderr
    port = next(p for p in range(5600, 5700) if port_free("127.0.0.1", p))
    proc = subprocess.Popen([LLMOPS, "ui", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, timeout=180)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=url, registry_uri=url)
        mv = client.get_model_version("ui-model", "1")
        assert mv.tags["format"] == "safetensors"
        assert mv.tags["sha256"] == json.loads(reg.stdout)["sha256"]
        import urllib.request

        with urllib.request.urlopen(url, timeout=10) as page:  # noqa: S310 - our own loopback server
            assert b"<html" in page.read(2000).lower()
    finally:
        stop(proc)
    assert proc.returncode is not None


def test_ui_refuses_a_busy_port(cli, tmp_path, monkeypatch) -> None:
    import socket

    monkeypatch.setenv("LLMOPS_STORE", str(tmp_path / "s"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli("ui", "--port", str(port))
    assert r.code == 1 and "in use" in r.err


def test_wheel_ships_the_migrations(tmp_path) -> None:
    """A non-editable install carries alembic/ as llmops.migrations, and `db upgrade` works from it."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    wheel = next((tmp_path / "dist").glob("llmops-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "llmops/migrations/env.py" in names
    assert any(n.startswith("llmops/migrations/versions/0001") for n in names)
    assert "llmops/registry/store.py" in names and "llmops/converters/base.py" in names
    assert not any(n.startswith(("registry/", "benchmarks/", "converters/", "alembic/")) for n in names)

    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "PYTHONPATH": str(target), "LLMOPS_STORE": str(tmp_path / "store")}
    env.pop("LLMOPS_DATABASE_URL", None)
    code = ("import sys; from llmops.registry.db import migrations_dir; print(migrations_dir());"
            "from llmops.cli import main; sys.exit(main(['--json', 'db', 'upgrade']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first, rest = r.stdout.split("\n", 1)
    assert first.startswith(str(target))
    assert json.loads(rest)["revision"] == "0001"
