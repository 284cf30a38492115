"""Gated promotion, the audit trail, prompts and datasets, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LLMOPS = str(Path(sys.executable).parent / "llmops")
HW = {"cpu_model": "Test CPU", "cores": 2, "isa_flags": ["avx2"], "ram_bytes": 1 << 34}


def _register(cli, tmp_path: Path, name: str, payload: bytes) -> str:
    f = tmp_path / f"{name}-{len(payload)}-{payload[:4].hex()}.bin"
    f.write_bytes(payload)
    r = cli("--json", "models", "register", f, "--name", name)
    assert r.code == 0, r.err
    return r.json()["version"]


def _bench(store_env, name: str, version: str, **metrics: float) -> None:
    """Record benchmark results the way `llmops bench` does (16 chunks, 3 runs of 512 + 128 tokens)."""
    from types import SimpleNamespace

    from llmops.app.recording import bench_protocol
    from llmops.registry import results
    from llmops.registry.promotion import _artifact

    opts = SimpleNamespace(metrics={"memory", "latency", "accuracy"}, device="cpu", threads=2, ctx=512, chunks=16,
                           runs=3, prompt_tokens=512, decode_tokens=128)
    details = {"backend": "llama.cpp", "chunks": 16, "ctx": 512, "prompt_tokens": 512, "decode_tokens": 128, "runs": 3}
    store = store_env.store()
    art = _artifact(store, name, version)
    with store.session() as s:
        results.record(s, artifact_id=art.id, hardware=HW, backend="llama.cpp", device="cpu",
                       measurements=[results.Measurement(k, v, None, bench_protocol(
                           k, details, opts, eval_sha256="e" * 64, baseline_sha256=None, tools={"llmops": "test"}))
                           for k, v in metrics.items()])


def test_gates_pass_move_the_alias_and_fail_leaves_it(store_env, cli, tmp_path) -> None:
    v1 = _register(cli, tmp_path, "chat", b"one" * 100)
    v2 = _register(cli, tmp_path, "chat", b"two" * 100)
    _bench(store_env, "chat", v1, ppl=30.0, decode_tps=100.0)
    _bench(store_env, "chat", v2, ppl=31.0, decode_tps=120.0)

    r = cli("--json", "promote", "chat", v1, "--gate", "ppl < 35", "--gate", "decode_tps >= 50")
    assert r.code == 0, r.err
    assert r.json()["verdict"] == "passed" and r.json()["moved"] is True

    # v2 is faster but 3.3 % worse in perplexity than the holder: the ratio gate fails.
    r = cli("--json", "promote", "chat", v2, "--gate", "ppl_ratio <= 1.02", "--gate", "decode_tps_ratio >= 1.1")
    assert r.code == 1
    d = r.json()
    assert d["verdict"] == "failed" and d["moved"] is False and d["previous_version"] == v1
    gates = {g["metric"]: g for g in d["gates"]}
    assert gates["ppl_ratio"]["passed"] is False and gates["ppl_ratio"]["measured"] == pytest.approx(31 / 30)
    assert gates["decode_tps_ratio"]["passed"] is True
    # Each gate names the protocol its figures were read under.
    assert gates["ppl_ratio"]["protocol_summary"] == "bench ppl, 16 chunks x 512, llama.cpp, 2 threads, cpu"
    assert gates["decode_tps_ratio"]["protocol_summary"].startswith("bench decode_tps, 512-token prompt, 128 decoded")
    assert len(gates["ppl_ratio"]["protocol"]) == 12 and gates["ppl_ratio"]["protocol"] != gates["decode_tps_ratio"]["protocol"]
    assert len(r.err.strip().splitlines()) == 1 and "failed its gates" in r.err

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store_env.db_url, registry_uri=store_env.db_url)
    assert str(client.get_model_version_by_alias("chat", "production").version) == v1

    audit = cli("--json", "promotions", "list", "chat").json()
    assert [(a["version"], a["verdict"], a["previous_version"]) for a in audit] == [(v1, "passed", None), (v2, "failed", v1)]
    assert audit[1]["gates"][0]["measured"] == pytest.approx(31 / 30)
    assert audit[1]["gates"][0]["protocol"] == gates["ppl_ratio"]["protocol"]

    human = cli("promotions", "list", "chat")
    assert "failed" in human.out and "passed" in human.out


def test_missing_metric_fails_naming_what_to_run(store_env, cli, tmp_path) -> None:
    v = _register(cli, tmp_path, "m", b"x" * 10)
    r = cli("promote", "m", v, "--gate", "kld < 0.01", "--gate", "file_mb < 1")
    assert r.code == 1
    assert "FAIL" in r.out and "llmops bench" in r.out and "pass" in r.out


def test_dry_run_changes_nothing_and_force_needs_a_reason(store_env, cli, tmp_path) -> None:
    v = _register(cli, tmp_path, "m", b"x" * 10)
    r = cli("--json", "promote", "m", v, "--dry-run", "--gate", "file_mb < 1")
    assert r.code == 0 and r.json()["dry_run"] is True and r.json()["moved"] is False
    assert cli("--json", "promotions", "list", "m").json() == []
    shown = cli("--json", "models", "show", f"models:/m/{v}").json()
    assert shown["aliases"] == []

    r = cli("promote", "m", v, "--gate", "ppl < 1", "--force")
    assert r.code == 2 and "--reason" in r.err
    r = cli("--json", "promote", "m", v, "--gate", "ppl < 1", "--force", "--reason", "hotfix, bench pending")
    assert r.code == 0 and r.json()["verdict"] == "forced" and r.json()["moved"] is True
    audit = cli("--json", "promotions", "list", "m").json()
    assert audit[-1]["forced"] is True and audit[-1]["reason"] == "hotfix, bench pending"
    assert cli("--json", "models", "show", "models:/m@production").json()["version"] == v


@pytest.mark.parametrize("gate", ["ppl", "ppl <", "ppl < abc", "< 3", "ppl << 3", "ppl < 1; rm -rf /", "PPL < 3", "ppl < nan"])
def test_malformed_gates_are_usage_errors(cli, gate, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLMOPS_STORE", str(tmp_path / "s"))
    r = cli("promote", "m", "1", "--gate", gate)
    assert r.code == 2 and "invalid gate" in r.err
    assert not (tmp_path / "s").exists()


def test_ci_metadata_goes_into_the_audit(store_env, cli, tmp_path, monkeypatch) -> None:
    v = _register(cli, tmp_path, "m", b"x" * 10)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_SHA", "abc123")
    monkeypatch.setenv("GITHUB_SERVER_URL", "https://github.example")
    monkeypatch.setenv("GITHUB_REPOSITORY", "org/repo")
    monkeypatch.setenv("GITHUB_RUN_ID", "42")
    monkeypatch.setenv("GITHUB_ACTOR", "ci-bot")
    assert cli("promote", "m", v, "--to", "staging").code == 0
    a = cli("--json", "promotions", "list", "m").json()[0]
    assert a["alias"] == "staging" and a["actor"] == "ci-bot"
    assert a["ci"] == {"system": "github-actions", "commit": "abc123",
                       "job_url": "https://github.example/org/repo/actions/runs/42"}


def test_concurrent_promotions_are_serialised_and_both_audited(store_env, cli, tmp_path) -> None:
    v1 = _register(cli, tmp_path, "race", b"a" * 50)
    v2 = _register(cli, tmp_path, "race", b"b" * 50)
    env = {**os.environ}
    procs = [subprocess.Popen([LLMOPS, "--json", "promote", "race", v], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for v in (v1, v2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    audit = cli("--json", "promotions", "list", "race").json()
    assert sorted(a["version"] for a in audit) == sorted([v1, v2])
    # Serialised: the second saw the first as the previous holder.
    assert audit[0]["previous_version"] is None and audit[1]["previous_version"] == audit[0]["version"]
    holder = cli("--json", "models", "show", "models:/race@production").json()["version"]
    assert holder == audit[1]["version"]


def test_prompt_versions_and_link_to_the_promoted_model(store_env, cli, tmp_path) -> None:
    a = cli("--json", "prompts", "add", "support", "--template", "You are helpful.\nAnswer: {{q}}", "-m", "v1")
    assert a.code == 0 and a.json()["version"] == "1" and a.json()["created"] is True
    same = cli("--json", "prompts", "add", "support", "--template", "You are helpful.\nAnswer: {{q}}")
    assert same.json()["version"] == "1" and same.json()["created"] is False
    f = tmp_path / "p.txt"
    f.write_text("You are concise.\nAnswer: {{q}}")
    b = cli("--json", "prompts", "add", "support", "--file", f, "-m", "shorter")
    assert b.json()["version"] == "2"
    d = cli("prompts", "diff", "support", "1", "2")
    assert "-You are helpful." in d.out and "+You are concise." in d.out
    assert cli("--json", "prompts", "show", "prompts:/support/1").json()["template"].startswith("You are helpful.")
    assert [p["name"] for p in cli("--json", "prompts", "list").json()] == ["support"]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store_env.db_url, registry_uri=store_env.db_url)
    assert client.load_prompt("support", version=2).template == "You are concise.\nAnswer: {{q}}"

    v = _register(cli, tmp_path, "bot", b"w" * 10)
    assert cli("promote", "bot", v, "--prompt", "prompts:/support/2").code == 0
    up = cli("--json", "lineage", f"models:/bot/{v}").json()
    assert any(e["relation"] == "uses_prompt" for e in up["edges"])
    assert any("prompts:/support/2" in n["labels"] for n in up["nodes"])

    assert cli("prompts", "add", "x").code == 2
    assert cli("prompts", "show", "prompts:/support/9").code == 1


def test_datasets_are_content_addressed(store_env, cli, tmp_path) -> None:
    f = tmp_path / "calib.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(5)) + "\n")
    a = cli("--json", "datasets", "add", "calib", f, "-m", "first").json()
    assert (a["version"], a["records"], a["format"], a["created"]) == ("1", 5, "jsonl", True)
    again = cli("--json", "datasets", "add", "calib", f).json()
    assert again["version"] == "1" and again["created"] is False
    f.write_text(f.read_text() + json.dumps({"text": "row 5"}) + "\n")
    b = cli("--json", "datasets", "add", "calib", f).json()
    assert b["version"] == "2" and b["records"] == 6 and b["sha256"] != a["sha256"]
    shown = cli("--json", "datasets", "show", "datasets:/calib/1").json()
    assert shown["sha256"] == a["sha256"]
    assert cli("--json", "datasets", "list").json()[0]["latest_version"] == "2"

    from llmops.registry.artifacts import local_path
    from llmops.core.hashing import sha256_file

    assert sha256_file(local_path(shown["stored_uri"])) == a["sha256"]
    assert cli("datasets", "show", "datasets:/calib/7").code == 1
