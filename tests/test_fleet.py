"""Benchmarks on fleet targets through a real Ray cluster on this machine: a head and two nodes
started with `llmops node start` (loopback addresses, no dashboard, token authentication),
driven by the real command line; results read back from the registry and MLflow."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray")

LLMOPS = str(Path(sys.executable).with_name("llmops"))
SMALL = ("--chunks", "2", "--runs", "1", "--decode-tokens", "8", "--prompt-tokens", "32")


@dataclass
class Fleet:
    root: Path
    env: dict[str, str]
    address: str
    nodes: list[dict[str, Any]]

    def run(self, *args: object, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([LLMOPS, *map(str, args)], capture_output=True, text=True, env=env or self.env,
                              timeout=timeout)

    def popen(self, *args: object) -> subprocess.Popen[str]:
        return subprocess.Popen([LLMOPS, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=self.env)

    def registered(self, path: Path, name: str) -> str:
        r = self.run("--json", "models", "register", path, "--name", name)
        assert r.returncode == 0, r.stderr
        return f"models:/{name}/{json.loads(r.stdout)['version']}"

    def listing(self) -> list[dict[str, Any]]:
        r = self.run("--json", "node", "list", "--address", self.address, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["nodes"]


def _start(env: dict[str, str], *args: str) -> dict[str, Any]:
    r = subprocess.run([LLMOPS, "--json", "node", "start", "--num-cpus", "1", *args], capture_output=True, text=True,
                       env=env, timeout=180)
    assert r.returncode == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, eval_text_path: Path) -> Iterator[Fleet]:
    """Target b (the head) and target a (two nodes), each on its own loopback address."""
    root = tmp_path_factory.mktemp("fleet")
    env = {k: v for k, v in os.environ.items() if k not in ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI")}
    env.update(LLMOPS_CACHE=str(root / "cache"), LLMOPS_STORE=str(root / "store"), LLMOPS_EVAL_TEXT=str(eval_text_path),
               RAY_ADDRESS="")
    env.pop("LLMOPS_RAY_ADDRESS", None)
    base = random.randint(20, 120)
    ips = [f"127.0.0.{base + i}" for i in range(3)]
    nodes = []
    try:
        head = _start(env, "--target", "b", "--head", "--node-ip", ips[0])
        nodes.append(head)
        nodes.append(_start(env, "--target", "a", "--address", head["address"], "--node-ip", ips[1]))
        nodes.append(_start(env, "--target", "a", "--address", head["address"], "--node-ip", ips[2]))
        for n, ip in zip(nodes, ips):
            n["node_ip"] = ip
        yield Fleet(root, env, head["address"], nodes)
    finally:
        subprocess.run([LLMOPS, "node", "stop"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_gguf(fleet: Fleet, tiny_models) -> str:  # noqa: ANN001
    out = fleet.root / "tiny-q8.gguf"
    r = fleet.run("convert", tiny_models("llama"), "--to", "gguf-q8_0", "-o", out, "--no-verify")
    assert r.returncode == 0, r.stderr
    return fleet.registered(out, "tiny-q8")


def test_nodes_join_with_their_labels_token_and_slot(fleet: Fleet) -> None:
    token = Path(fleet.nodes[0]["token_file"])
    assert oct(token.stat().st_mode & 0o777) == "0o600" and len(token.read_text().strip()) == 64
    listed = fleet.listing()
    assert sorted(n["target"] for n in listed) == ["a", "a", "b"]
    labels = listed[0]["labels"]
    assert labels["llmops-isa"] in ("avx2", "avx512", "amx", "neon") and int(labels["llmops-cores"]) >= 1
    assert labels["llmops-v-llmops"] and labels["llmops-v-llama-cpp"] and labels["llmops-cpu"]
    assert all(not n["busy"] for n in listed)
    assert all(n["resources"] == {"llmops_slot": 1, f"llmops_target_{n['target']}": 1} for n in fleet.nodes)
    # no dashboard: nothing answers on Ray's dashboard port
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", 8265)) != 0


def test_a_driver_without_the_token_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    wrong = tmp_path / "token"
    wrong.write_text("0" * 64)
    wrong.chmod(0o600)
    r = fleet.run("node", "list", "--address", fleet.address, "--token-file", wrong, timeout=180)
    assert r.returncode != 0 and "cannot connect to the Ray cluster" in r.stderr.splitlines()[-1]
    loose = tmp_path / "loose"
    loose.write_text("1" * 64)
    loose.chmod(0o644)
    r = fleet.run("node", "list", "--address", fleet.address, "--token-file", loose)
    assert r.returncode == 2 and "readable by others" in r.stderr


def test_a_tiny_gguf_benchmarked_on_both_targets(fleet: Fleet, tiny_gguf: str) -> None:
    """Two results, each with its target, node and measured hardware; on MLflow as TARGET/bench.*."""
    r = fleet.run("--json", "bench", tiny_gguf, "--on", fleet.address, "--target", "a,b", *SMALL,
                  "--baseline", tiny_gguf)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert sorted(row["target"] for row in d["rows"]) == ["a", "b"]
    assert all(row["status"] == "ok" and row["decode_tps"] > 0 and row["kld"] == pytest.approx(0, abs=1e-6)
               for row in d["rows"])
    by_target = {row["target"]: row for row in d["rows"]}
    b_nodes = {n["node_ip"] for n in fleet.nodes if n["target"] == "b"}
    assert by_target["b"]["node"] and by_target["a"]["node"] != by_target["b"]["node"]

    from llmops.core.settings import resolve
    from llmops.registry.store import Store
    from llmops.registry.tables import BenchmarkResult
    from sqlalchemy import select

    store = Store(resolve(fleet.root / "store"))
    with store.session() as s:
        rows = s.execute(select(BenchmarkResult.target, BenchmarkResult.node, BenchmarkResult.job_key,
                                BenchmarkResult.metric).where(BenchmarkResult.target.is_not(None))).all()
    targets = {(t, n) for t, n, _, _ in rows}
    assert {t for t, _ in targets} == {"a", "b"} and len(targets) == 2
    assert len({k for _, _, k, _ in rows}) == 2  # one job key per job
    assert len(b_nodes) == 1
    mv = store.mlflow.get_model_version("tiny-q8", tiny_gguf.rsplit("/", 1)[1])
    run = store.mlflow.get_run(mv.tags["llmops.run_id"] if "llmops.run_id" in mv.tags else mv.run_id)
    assert "a/bench.decode_tps" in run.data.metrics and "b/bench.kld" in run.data.metrics
    # the per-target table and gates read that target's figures, not this machine's
    r = fleet.run("--json", "bench", "compare", tiny_gguf, "--target", "b")
    assert r.returncode == 0 and json.loads(r.stdout)["rows"][0]["decode_tps"] == by_target["b"]["decode_tps"]
    version = tiny_gguf.rsplit("/", 1)[1]
    ok = fleet.run("promote", "tiny-q8", version, "--to", "production-b", "--target", "b",
                   "--gate", "decode_tps >= 1", "--gate", "kld <= 0.06")
    assert ok.returncode == 0, ok.stderr
    local = fleet.run("promote", "tiny-q8", version, "--to", "production", "--gate", "decode_tps >= 1")
    assert local.returncode == 1 and "no decode_tps recorded" in local.stdout
    audit = json.loads(fleet.run("--json", "promotions", "list", "tiny-q8").stdout)
    assert [(p["alias"], p["target"], p["verdict"]) for p in audit] == [("production-b", "b", "passed"),
                                                                         ("production", None, "failed")]


def test_a_target_nobody_carries_fails_at_once(fleet: Fleet, tiny_gguf: str) -> None:
    t0 = time.monotonic()
    r = fleet.run("bench", tiny_gguf, "--on", fleet.address, "--target", "gpu-h100", *SMALL)
    assert r.returncode != 0
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "no node carries target gpu-h100" in err[0] and "a, b" in err[0]
    assert time.monotonic() - t0 < 60


def test_bytes_that_do_not_match_the_registry_are_refused(fleet: Fleet, tiny_models) -> None:  # noqa: ANN001
    out = fleet.root / "tampered.gguf"
    r = fleet.run("convert", tiny_models("llama"), "--to", "gguf-f16", "-o", out, "--no-verify")
    assert r.returncode == 0, r.stderr
    ref = fleet.registered(out, "tampered")
    stored = Path(json.loads(fleet.run("--json", "models", "show", ref).stdout)["stored_uri"].removeprefix("file://"))
    with open(stored, "ab") as fh:
        fh.write(b"not the registered bytes")
    r = fleet.run("--json", "bench", ref, "--on", fleet.address, "--target", "b", *SMALL)
    assert r.returncode == 1
    row = json.loads(r.stdout)["rows"][0]  # one document, the failed job in it
    assert row["status"] == "failed" and "do not match the registry" in row["error"]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "do not match the registry" in errors[0]


def test_workers_get_no_credentials(fleet: Fleet) -> None:
    """A node started with database and tracking credentials in its environment hands none of them
    to the tasks it runs."""
    env = {**fleet.env, "LLMOPS_DATABASE_URL": "postgresql+psycopg://u:S3cret@db/x",
           "MLFLOW_TRACKING_PASSWORD": "S3cret"}
    ip = fleet.nodes[0]["node_ip"].rsplit(".", 1)
    extra = _start(env, "--target", "creds", "--address", fleet.address, "--node-ip", f"{ip[0]}.{int(ip[1]) + 100}")
    try:
        code = ("import json, os\n"
                "from llmops.app.fleet.cluster import connect\n"
                f"connect({fleet.address!r})\n"
                "import ray\n"
                "f = ray.remote(lambda: dict(os.environ))\n"
                "print(json.dumps(ray.get(f.options(resources={'llmops_target_creds': 0.001}).remote(), timeout=120)))\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=fleet.env, timeout=180)
        assert r.returncode == 0, r.stderr
        seen = json.loads(r.stdout.strip().splitlines()[-1])
        assert "S3cret" not in json.dumps(seen) and "LLMOPS_DATABASE_URL" not in seen
        assert seen["RAY_AUTH_MODE"] == "token"
    finally:
        os.kill(extra["pid"], signal.SIGTERM)


def _node_pid(fleet: Fleet, node_address: str) -> int:
    ip = node_address.split(":")[0]
    return next(n["pid"] for n in fleet.nodes if n["node_ip"] == ip)


def test_a_node_killed_mid_benchmark_is_retried_on_another_node_of_its_target(fleet: Fleet, tiny_gguf: str) -> None:
    """Target a has two nodes: the job moves to the other one, and its result is recorded once."""
    proc = fleet.popen("--json", "bench", tiny_gguf, "--on", fleet.address, "--target", "a", "--metrics", "latency",
                       "--runs", "40", "--decode-tokens", "200", "--prompt-tokens", "32")
    busy = None
    deadline = time.monotonic() + 120
    while busy is None and time.monotonic() < deadline and proc.poll() is None:
        busy = next((n for n in fleet.listing() if n["target"] == "a" and n["busy"]), None)
    assert busy is not None, "no node of target a ever ran the job"
    pid = _node_pid(fleet, busy["address"])
    os.killpg(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    rows = json.loads(out)["rows"]
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    assert not rows[0]["node"].endswith(busy["node_id"][:8])  # measured by the node that was left
    fleet.nodes = [n for n in fleet.nodes if n["pid"] != pid]
    from llmops.core.settings import resolve
    from llmops.registry.store import Store
    from llmops.registry.tables import BenchmarkResult
    from sqlalchemy import func, select

    store = Store(resolve(fleet.root / "store"))
    with store.session() as s:
        keys = s.execute(select(BenchmarkResult.job_key, func.count()).where(
            BenchmarkResult.target == "a", BenchmarkResult.metric == "decode_tps").group_by(BenchmarkResult.job_key)).all()
    assert all(n == 1 for _, n in keys)


def test_a_sweep_into_two_formats_on_two_targets(fleet: Fleet, tiny_models) -> None:  # noqa: ANN001
    """Four results, complete lineage, a choice per target promoted to its own alias."""
    src = tiny_models("llama")
    r = fleet.run("--json", "sweep", src, "--to", "gguf-q8_0,gguf-q4_0", "--register", "swept", "--on", fleet.address,
                  "--targets", "a,b", *SMALL, "--select", "kld <= 1", "--by", "file_mb", "--promote", "production",
                  timeout=600)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [c["status"] for c in d["conversions"]] == ["ok", "ok"]
    assert len([b for b in d["bench"] if b["status"] == "ok"]) == 4
    assert set(d["tables"]) == {"a", "b"} and all(len(rows) == 2 for rows in d["tables"].values())
    q4 = next(c["ref"] for c in d["conversions"] if c["format"] == "gguf-q4_0")
    assert all(d["choices"][t]["pick"] == q4 for t in ("a", "b"))  # the smaller file, both within the KLD bound
    assert {t: p["verdict"] for t, p in d["promotions"].items()} == {"a": "passed", "b": "passed"}
    assert all(Path(p).is_file() for p in d["plots"].values())
    for c in d["conversions"]:
        lin = json.loads(fleet.run("--json", "lineage", c["ref"], "--format", "json").stdout)
        assert any(e.get("relation") == "converted_from" for e in lin.get("edges", [])), lin
    show = json.loads(fleet.run("--json", "models", "show", "models:/swept@production-b").stdout)
    assert f"models:/swept/{show['version']}" == q4


def test_choosing_per_target() -> None:
    from llmops.app.fleet.sweep import choose
    from llmops.registry.gates import parse_gate

    rows = [{"ref": "q8", "decode_tps": 100.0, "kld": 0.001, "file_mb": 140.0},
            {"ref": "q4", "decode_tps": 150.0, "kld": 0.05, "file_mb": 100.0},
            {"ref": "q3", "decode_tps": 170.0, "kld": 0.2, "file_mb": 80.0},
            {"ref": "q4s", "decode_tps": 150.0, "kld": 0.04, "file_mb": 90.0}]
    c = choose(rows, [parse_gate("kld <= 0.06")], "decode_tps")
    assert c["pick"] == "q4s" and c["runner_up"] == "q4"  # a tie goes to the smaller file
    assert "fails kld <= 0.06" in c["excluded"]["q3"]
    assert choose(rows, [], "kld")["pick"] == "q8"  # less is better for kld
    assert choose(rows, [parse_gate("kld <= 0.0001")], "decode_tps")["pick"] is None


def test_version_skew_is_named() -> None:
    from llmops.app.fleet.cluster import Node, choose_targets
    from llmops.app.fleet.labels import VERSION_LABELS, version_skew
    from llmops.core.errors import LLMOpsError

    mine = {label: "1.0" for label in VERSION_LABELS}
    assert version_skew(dict(mine), mine) == []
    theirs = {**mine, "llmops-v-torch": "2.12.0"}
    assert version_skew(theirs, mine) == ["torch 2.12.0 (here 1.0)"]
    from llmops.app.fleet.labels import host_labels

    here = host_labels("t")
    nodes = [Node("n1", "edge", "h1", "h1:1", here), Node("n2", "edge", "h2", "h2:1", {**here, "llmops-v-llama-cpp": "0.0.1"})]
    with pytest.raises(LLMOpsError, match=r"node [^ ]+:n2 of target edge runs other versions.*llama-cpp 0.0.1 \(here "):
        choose_targets(nodes, ["edge"], False)
    assert choose_targets(nodes[:1], None, True) == ["edge"]
    with pytest.raises(LLMOpsError, match="no node carries target gpu: the cluster has edge"):
        choose_targets(nodes[:1], ["gpu"], False)


def test_stopping_the_driver_cancels_its_jobs_on_the_cluster(fleet: Fleet, tiny_gguf: str) -> None:
    """SIGTERM (or Ctrl-C) on the driver: its job is cancelled on the node, whose slot is free again."""
    proc = fleet.popen("bench", tiny_gguf, "--on", fleet.address, "--target", "b", "--metrics", "latency",
                       "--runs", "200", "--decode-tokens", "200", "--prompt-tokens", "32")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(n["busy"] for n in fleet.listing() if n["target"] == "b"):
            break
    else:
        raise AssertionError("the job never started")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "error: terminated", err
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(n["busy"] for n in fleet.listing() if n["target"] == "b"):
        time.sleep(0.5)
    assert not any(n["busy"] for n in fleet.listing() if n["target"] == "b"), "the cancelled job still holds the slot"
