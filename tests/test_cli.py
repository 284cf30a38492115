"""The command-line contract: instant help, every command present, one-line errors, --json anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path


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
        "from llmops.app.cli import main\n"
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
    from llmops.app.server import port_free, stop, wait_until_up

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
            "from llmops.app.cli import main; sys.exit(main(['--json', 'db', 'upgrade']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first, rest = r.stdout.split("\n", 1)
    assert first.startswith(str(target))
    assert json.loads(rest)["revision"] == "0003"


def _cells(text: str) -> list[dict[str, str]]:
    """The rows of a printed table as {header: cell} (cells are separated by two or more spaces)."""
    import re

    lines = text.splitlines()
    headers = re.split(r"\s{2,}", lines[0].strip())
    return [dict(zip(headers, re.split(r"\s{2,}", ln.strip()), strict=True)) for ln in lines[2:]]


def test_missing_metrics_print_as_na_never_as_perfect_scores() -> None:
    from llmops.app.cli.convert_cmds import _bench_table, _render_convert

    measured = {"artifact": "q4.gguf", "format": "gguf", "quant": "Q4_K_M", "file_mb": 100.0, "bits_per_weight": 4.9,
                "ppl": 30.0, "ppl_baseline": 24.0, "kld": 0.125, "top1": 0.75, "prefill_tps": 200.0,
                "decode_tps": 20.0, "ttft_ms": 40.0, "peak_rss_mb": 300.0}
    missing = {"artifact": "bare.gguf", "format": None, "quant": None, "file_mb": 1.0, "bits_per_weight": None,
               "ppl": float("nan"), "ppl_baseline": 24.0, "kld": None, "top1": float("nan")}
    no_baseline = {"artifact": "alone.gguf", "format": "gguf", "quant": "Q8_0", "file_mb": 2.0, "ppl": 25.0,
                   "ppl_baseline": None}
    got, gone, alone = _cells(_bench_table([measured, missing, no_baseline]))
    assert got["dPPL%"] == "+25.00"  # 30 / 24 - 1
    assert (got["KLD"], got["TOP1"], got["BPW"]) == ("0.12500", "0.7500", "4.90")
    for col in ("FORMAT", "QUANT", "BPW", "PPL", "dPPL%", "KLD", "TOP1", "PREFILL t/s", "DECODE t/s", "TTFT ms",
                "RSS MiB"):
        assert gone[col] == "n/a", (col, gone)
    assert alone["PPL"] == "25.000" and alone["dPPL%"] == "n/a" and alone["KLD"] == "n/a"

    # bench compare: dPPL% against the first REF only, never against a row's own recorded baseline
    first, other = _cells(_bench_table([{"label": "a/1", "ppl": 20.0, "dppl_pct": 0.0},
                                        {"label": "b/1", "ppl": 30.0, "ppl_baseline": 24.0}], against_first=True))
    assert first["dPPL%"] == "+0.00" and other["dPPL%"] == "n/a"

    text = _render_convert({"output": "m.gguf", "format": "gguf", "quant": "Q8_0", "size_bytes": 2e6, "seconds": 1.0,
                            "verification": {"kld": None, "top1_agreement": None, "ppl_source": 24.0,
                                             "ppl_output": float("nan")}, "registered": None})
    assert text.splitlines()[1] == "verify: KLD n/a, top-1 n/a, PPL 24.000 -> n/a"
