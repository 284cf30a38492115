"""Results carry their protocol: promotion gates and `bench compare` never mix two of them."""

from __future__ import annotations

import pytest

HW = {"cpu_model": "Test CPU", "cores": 2, "isa_flags": ["avx2"], "ram_bytes": 1 << 34}
OTHER_HW = {**HW, "cpu_model": "Other CPU"}
EVAL_SHA = "e" * 64
SOURCE_SHA = "5" * 64


def _protocol(kind: str, chunks: int, metric: str = "ppl", backend: str = "llama.cpp") -> dict:
    from llmops.app.recording import accuracy_protocol

    return accuracy_protocol(kind, metric, eval_sha256=EVAL_SHA, ctx=512, chunks=chunks, backend=backend, threads=2,
                             device="cpu", baseline_sha256=SOURCE_SHA, tools={"llmops": "0.1.0", "llama_cpp": "0.3.36"})


VERIFY = _protocol("verify", 4)
BENCH = _protocol("bench", 16)


def _register(cli, tmp_path, name: str, payload: bytes) -> str:  # noqa: ANN001
    f = tmp_path / f"{name}-{payload[:4].hex()}-{len(payload)}.bin"
    f.write_bytes(payload)
    r = cli("--json", "models", "register", f, "--name", name)
    assert r.code == 0, r.err
    return r.json()["version"]


def _record(store_env, name: str, version: str, metric: str, value: float, protocol: dict | None,  # noqa: ANN001
            hardware: dict = HW) -> None:
    from llmops.registry import results
    from llmops.registry.promotion import _artifact

    store = store_env.store()
    art = _artifact(store, name, version)
    with store.session() as s:
        results.record(s, artifact_id=art.id, hardware=hardware, backend=(protocol or {}).get("backend", "llama.cpp"),
                       device="cpu", measurements=[results.Measurement(metric, value, None, protocol)])


def _key(protocol: dict) -> str:
    from llmops.registry.protocols import protocol_key

    return protocol_key(protocol)[:12]


def test_protocol_key_is_the_sha256_of_canonical_json() -> None:
    import hashlib
    import json

    from llmops.registry.protocols import UNKNOWN, protocol_key, summary

    p = {"kind": "bench", "chunks": 16, "family": "accuracy"}
    assert protocol_key(p) == hashlib.sha256(b'{"chunks":16,"family":"accuracy","kind":"bench"}').hexdigest()
    assert protocol_key(dict(reversed(list(p.items())))) == protocol_key(p)
    assert protocol_key(None) == protocol_key(UNKNOWN) == hashlib.sha256(json.dumps(UNKNOWN).replace(" ", "").encode()).hexdigest()
    assert protocol_key(VERIFY) != protocol_key(BENCH)
    assert summary(BENCH, "ppl") == "bench ppl, 16 chunks x 512, llama.cpp, 2 threads, cpu"
    assert summary(VERIFY, "ppl") == "verify ppl, 4 chunks x 512, llama.cpp, 2 threads, cpu"
    # the baseline's bytes are part of the protocol of the metrics measured against it only
    assert "baseline_sha256" not in BENCH and _protocol("bench", 16, "kld")["baseline_sha256"] == SOURCE_SHA


def test_gate_reads_the_newest_protocol_and_says_which(store_env, cli, tmp_path) -> None:
    v = _register(cli, tmp_path, "proto", b"one" * 100)
    _record(store_env, "proto", v, "ppl", 30.0, VERIFY)  # convert --verify, 4 chunks
    _record(store_env, "proto", v, "ppl", 28.0, BENCH)  # llmops bench, 16 chunks, later
    r = cli("--json", "promote", "proto", v, "--gate", "ppl < 29", "--gate", "file_mb < 1", "--dry-run")
    assert r.code == 0, r.out + r.err
    gates = {g["metric"]: g for g in r.json()["gates"]}
    assert gates["ppl"]["measured"] == 28.0 and gates["ppl"]["passed"] is True
    assert gates["ppl"]["protocol"] == _key(BENCH)
    assert gates["ppl"]["protocol_summary"] == "bench ppl, 16 chunks x 512, llama.cpp, 2 threads, cpu"
    assert gates["file_mb"]["protocol"] is None and "size" in gates["file_mb"]["protocol_summary"]

    # A newer verification now defines the protocol: the 4-chunk figure, said so.
    _record(store_env, "proto", v, "ppl", 30.0, VERIFY)
    r = cli("--json", "promote", "proto", v, "--gate", "ppl < 29")
    assert r.code == 1
    g = r.json()["gates"][0]
    assert (g["measured"], g["protocol"]) == (30.0, _key(VERIFY)) and "4 chunks" in g["protocol_summary"]
    audit = cli("--json", "promotions", "list", "proto").json()
    assert audit[-1]["gates"][0]["protocol"] == _key(VERIFY)


def test_ratio_gate_needs_a_holder_result_of_the_same_protocol(store_env, cli, tmp_path) -> None:
    v1 = _register(cli, tmp_path, "ratio", b"one" * 100)
    v2 = _register(cli, tmp_path, "ratio", b"two" * 100)
    _record(store_env, "ratio", v1, "ppl", 30.0, VERIFY)  # the holder was only verified
    assert cli("promote", "ratio", v1).code == 0
    _record(store_env, "ratio", v2, "ppl", 31.0, VERIFY)
    _record(store_env, "ratio", v2, "ppl", 29.0, BENCH)

    r = cli("--json", "promote", "ratio", v2, "--gate", "ppl_ratio <= 1.05", "--gate", "file_mb_ratio <= 1")
    assert r.code == 1
    d = r.json()
    gates = {g["metric"]: g for g in d["gates"]}
    g = gates["ppl_ratio"]
    assert g["passed"] is False and g["measured"] is None
    assert "no comparable result" in g["note"] and f"models:/ratio/{v1}" in g["note"] and _key(BENCH) in g["note"]
    assert g["protocol"] == _key(BENCH) and g["protocol_summary"].startswith("bench ppl, 16 chunks")
    assert gates["file_mb_ratio"]["passed"] is True
    assert "ppl_ratio" not in d["metrics"]
    human = cli("promote", "ratio", v2, "--gate", "ppl_ratio <= 1.05")
    assert human.code == 1 and "no comparable result" in human.out

    # The holder's bench result on another machine does not count either; on this one it does,
    # and the ratio divides bench by bench even though the holder's newest figure is a verification.
    _record(store_env, "ratio", v1, "ppl", 28.0, BENCH, hardware=OTHER_HW)
    assert cli("--json", "promote", "ratio", v2, "--gate", "ppl_ratio <= 1.05").code == 1
    _record(store_env, "ratio", v1, "ppl", 28.5, BENCH)
    _record(store_env, "ratio", v1, "ppl", 30.0, VERIFY)
    r = cli("--json", "promote", "ratio", v2, "--gate", "ppl_ratio <= 1.05")
    assert r.code == 0, r.out
    g = r.json()["gates"][0]
    assert g["measured"] == pytest.approx(29.0 / 28.5) and g["protocol"] == _key(BENCH)
    assert cli("--json", "models", "show", "models:/ratio@production").json()["version"] == v2


def test_results_recorded_before_protocols_are_their_own_protocol(store_env, cli, tmp_path) -> None:
    v1 = _register(cli, tmp_path, "old", b"one" * 100)
    v2 = _register(cli, tmp_path, "old", b"two" * 100)
    _record(store_env, "old", v1, "decode_tps", 100.0, None)
    assert cli("promote", "old", v1).code == 0
    _record(store_env, "old", v2, "decode_tps", 120.0, None)
    r = cli("--json", "promote", "old", v2, "--gate", "decode_tps_ratio >= 1.1", "--dry-run")
    assert r.code == 0, r.out
    g = r.json()["gates"][0]
    assert g["measured"] == pytest.approx(1.2) and "without a protocol" in g["protocol_summary"]


def test_compare_puts_one_protocol_in_a_column_preferring_bench(store_env, cli, tmp_path) -> None:
    a = _register(cli, tmp_path, "cmp-a", b"a" * 3000)
    b = _register(cli, tmp_path, "cmp-b", b"b" * 2000)
    c = _register(cli, tmp_path, "cmp-c", b"c" * 1000)
    _record(store_env, "cmp-a", a, "ppl", 20.0, _protocol("bench", 16, backend="torch"))
    _record(store_env, "cmp-a", a, "ppl", 21.0, _protocol("verify", 4, backend="torch"))  # newer, but a verification
    _record(store_env, "cmp-b", b, "ppl", 22.0, BENCH)  # another format, another runtime: same protocol otherwise
    _record(store_env, "cmp-c", c, "ppl", 25.0, VERIFY)  # only verified: no 16-chunk figure to show
    r = cli("--json", "bench", "compare", f"models:/cmp-a/{a}", f"models:/cmp-b/{b}", f"models:/cmp-c/{c}")
    assert r.code == 0, r.err
    d = r.json()
    rows = {row["label"]: row for row in d["rows"]}
    assert rows[f"cmp-a/{a}"]["ppl"] == 20.0 and rows[f"cmp-b/{b}"]["ppl"] == 22.0
    assert rows[f"cmp-b/{b}"]["dppl_pct"] == pytest.approx(10.0)
    assert rows[f"cmp-c/{c}"].get("ppl") is None and "ppl" in rows[f"cmp-c/{c}"]["left_out"]
    assert d["protocols"]["ppl"]["summary"] == "bench ppl, 16 chunks x 512, 2 threads, cpu"
    human = cli("bench", "compare", f"models:/cmp-a/{a}", f"models:/cmp-b/{b}", f"models:/cmp-c/{c}")
    assert human.code == 0 and "20.000" in human.out and "25.000" not in human.out


def test_migration_gives_old_rows_the_unknown_protocol(store_env) -> None:
    from sqlalchemy import inspect, text

    from llmops.registry import db
    from llmops.registry.protocols import UNKNOWN, protocol_key

    if store_env.backend == "sqlite":
        store_env.store_dir.mkdir(parents=True)
    engine = db.engine_for(store_env.db_url)
    assert db.upgrade(engine, "0001") == "0001"
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO llmops_artifacts (id, kind, name, uri, sha256, size_bytes, metadata, created_at) "
                          "VALUES (1, 'model', 'm', 'file:///m', :sha, 1, '{}', CURRENT_TIMESTAMP)"), {"sha": "0" * 64})
        conn.execute(text("INSERT INTO llmops_benchmark_results (artifact_id, backend, device, metric, value, created_at) "
                          "VALUES (1, 'llama.cpp', 'cpu', 'ppl', 30.0, CURRENT_TIMESTAMP)"))
    assert db.upgrade(engine) == db.head_revision() == "0003"
    with engine.connect() as conn:
        protocol, key = conn.execute(text("SELECT protocol, protocol_key FROM llmops_benchmark_results")).one()
        # measured where llmops ran, before fleets: no target, node or job
        assert conn.execute(text("SELECT target, node, job_key FROM llmops_benchmark_results")).one() == (None, None, None)
    if isinstance(protocol, str):
        import json

        protocol = json.loads(protocol)
    assert protocol == UNKNOWN and key == protocol_key(UNKNOWN)
    cols = {c["name"]: c for c in inspect(engine).get_columns("llmops_benchmark_results")}
    assert cols["protocol"]["nullable"] is False and cols["protocol_key"]["nullable"] is False
    indexes = {ix["name"]: ix["column_names"] for ix in inspect(engine).get_indexes("llmops_benchmark_results")}
    assert indexes["ix_llmops_bench_protocol_key"] == ["protocol_key"]


def test_verify_and_bench_record_distinct_protocols_end_to_end(store_env, cli, tiny_models, eval_text_path,
                                                               tmp_path) -> None:
    """convert --verify (4 chunks) then llmops bench (6 chunks): promotion reads the bench figure."""
    from llmops.core.hashing import sha256_path
    from llmops.registry.promotion import _artifact
    from llmops.registry.tables import BenchmarkResult
    from sqlalchemy import select

    src = tiny_models("llama")
    r = cli("--json", "convert", src, "--to", "gguf-q8_0", "-o", tmp_path / "tiny-q8.gguf", "--register", "e2e",
            "--eval-text", eval_text_path, "--threads", "2")
    assert r.code == 0, r.err
    r = cli("--json", "bench", "models:/e2e/1", "--baseline", src, "--eval-text", eval_text_path, "--chunks", "6",
            "--metrics", "accuracy", "--threads", "2")
    assert r.code == 0, r.err
    bench_ppl = r.json()["rows"][0]["ppl"]

    store = store_env.store()
    art = _artifact(store, "e2e", "1")
    with store.session() as s:
        rows = s.scalars(select(BenchmarkResult).where(BenchmarkResult.artifact_id == art.id)).all()
        by = {(row.protocol["kind"], row.metric): row.protocol for row in rows}
    verify_kld, bench_kld = by[("verify", "kld")], by[("bench", "kld")]
    assert verify_kld["chunks"] == 4 and bench_kld["chunks"] == 6
    assert verify_kld["baseline_sha256"] == bench_kld["baseline_sha256"] == sha256_path(src)
    assert verify_kld["eval_sha256"] == bench_kld["eval_sha256"]
    assert verify_kld["scored"] == "second_half" and verify_kld["backend"] == "llama.cpp"
    assert by[("bench", "file_mb")] == {"kind": "bench", "family": "memory", "measure": "bytes"}

    p = cli("--json", "promote", "e2e", "1", "--gate", "ppl > 0", "--gate", "kld < 0.05", "--dry-run")
    assert p.code == 0, p.out
    gates = {g["metric"]: g for g in p.json()["gates"]}
    assert gates["ppl"]["measured"] == pytest.approx(bench_ppl)
    assert gates["ppl"]["protocol_summary"] == "bench ppl, 6 chunks x 512, llama.cpp, 2 threads, cpu"
    assert gates["kld"]["protocol_summary"].startswith("bench kld, 6 chunks x 512, against ")
