"""All or nothing: a registration, an alias move with its audit row, a dataset version.

Each failure is injected in the middle of the operation; afterwards MLflow (asked through its
own client) and the llmops tables must look as if the operation had never started.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select


def _client(store_env):  # noqa: ANN001, ANN202
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store_env.db_url, registry_uri=store_env.db_url)


def _row_counts(store) -> dict[str, int]:  # noqa: ANN001
    from llmops.registry.tables import Base

    with store.session() as s:
        return {t.name: s.scalar(select(func.count()).select_from(t)) for t in Base.metadata.sorted_tables}


def _running_runs(client) -> list:  # noqa: ANN001
    from mlflow.entities import ViewType

    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return [r for r in client.search_runs(exps, run_view_type=ViewType.ACTIVE_ONLY) if r.info.status == "RUNNING"]


def _boom(*_a, **_k):  # noqa: ANN002, ANN003
    raise RuntimeError("results table unavailable")


def test_convert_register_failing_midway_leaves_nothing(store_env, cli, tiny_models, eval_text_path, tmp_path,
                                                        monkeypatch) -> None:
    """The verification results fail to land: no model version, no active run, no llmops row, no bytes."""
    import mlflow

    from llmops.app.recording import eval_dataset_name
    from llmops.core.evaltext import load_eval_text
    from llmops.registry import results

    # The eval text is a dataset of its own (content-addressed, shared by every registration
    # that uses it); adding it first makes the row counts below exact.
    ds = cli("--json", "datasets", "add", eval_dataset_name(load_eval_text(eval_text_path)), eval_text_path)
    assert ds.code == 0, ds.err
    store = store_env.store()
    before = _row_counts(store)
    client = _client(store_env)

    real = results.record
    monkeypatch.setattr(results, "record", _boom)
    out = tmp_path / "tiny-q8.gguf"
    r = cli("--json", "convert", tiny_models("llama"), "--to", "gguf-q8_0", "-o", out, "--register", "atomic",
            "--eval-text", eval_text_path, "--threads", "2")
    assert r.code == 1 and "results table unavailable" in r.err, r.err

    assert client.search_registered_models(filter_string="name = 'atomic'") == []
    assert client.search_model_versions("name = 'atomic'") == []
    assert _running_runs(client) == [] and mlflow.active_run() is None
    assert _row_counts(store) == before
    assert not any((store_env.store_dir / "artifacts").rglob("*.gguf"))

    # The same registration without the fault lands whole: version, results, edges, inputs.
    monkeypatch.setattr(results, "record", real)
    r = cli("--json", "convert", tiny_models("llama"), "--to", "gguf-q8_0", "-o", out, "--register", "atomic",
            "--eval-text", eval_text_path, "--threads", "2")
    assert r.code == 0, r.err
    assert r.json()["registered"]["uri"] == "models:/atomic/1"
    after = _row_counts(store)
    assert after["llmops_benchmark_results"] == before["llmops_benchmark_results"] + 3  # ppl, kld, top1
    up = cli("--json", "lineage", "models:/atomic/1").json()
    assert {e["relation"] for e in up["edges"]} == {"converted_from", "evaluated_on"}
    mv = client.get_model_version("atomic", "1")
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED"
    assert {"kld", "top1_agreement", "ppl_output"} <= run.data.metrics.keys()
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == [eval_dataset_name(load_eval_text(eval_text_path))]


def test_register_with_a_failing_results_writer_leaves_nothing(store_env, tmp_path, monkeypatch) -> None:
    """The registry's own unit: version, rows, edges, results and dataset inputs, or none of them."""
    import mlflow

    from llmops.registry import datasets, results
    from llmops.registry.evaluations import Evaluation
    from llmops.registry.results import Measurement
    from llmops.registry.registration import register
    from llmops.registry.versions import ParentSpec

    store = store_env.store()
    text = tmp_path / "eval.txt"
    text.write_text("some evaluation text\n" * 50)
    info = datasets.add(store, "eval", text)
    parent = tmp_path / "parent.bin"
    parent.write_bytes(b"parent" * 100)
    before = _row_counts(store)
    client = _client(store_env)
    hw = {"cpu_model": "Test CPU", "cores": 2, "isa_flags": ["avx2"], "ram_bytes": 1 << 34}
    evaluation = Evaluation(measurements=[Measurement("ppl", 12.5, None, {"kind": "verify", "family": "accuracy"})],
                            hardware=hw, backend="llama.cpp", device="cpu", dataset=info)
    blob = tmp_path / "child.bin"
    blob.write_bytes(b"child" * 1000)

    real = results.record
    monkeypatch.setattr(results, "record", _boom)
    with pytest.raises(RuntimeError, match="results table unavailable"):
        register(store, blob, "unit", parents=[ParentSpec(str(parent))], evaluations=[evaluation],
                 dataset_inputs=[(info, "evaluation")], metrics={"ppl_output": 12.5})
    assert client.search_registered_models(filter_string="name = 'unit'") == []
    assert client.search_model_versions("name = 'unit'") == []
    assert _running_runs(client) == [] and mlflow.active_run() is None
    assert _row_counts(store) == before
    assert not any((store_env.store_dir / "artifacts").rglob("child.bin"))

    monkeypatch.setattr(results, "record", real)
    v = register(store, blob, "unit", parents=[ParentSpec(str(parent))], evaluations=[evaluation],
                 dataset_inputs=[(info, "evaluation")], metrics={"ppl_output": 12.5})
    assert v.version == "1"
    after = _row_counts(store)
    assert after["llmops_benchmark_results"] == before["llmops_benchmark_results"] + 1
    assert after["llmops_lineage"] == before["llmops_lineage"] + 2  # converted_from, evaluated_on
    run = client.get_run(v.run_id)
    assert run.info.status == "FINISHED" and [i.dataset.name for i in run.inputs.dataset_inputs] == ["eval"]


def test_a_failing_termination_undoes_the_committed_rows(store_env, tmp_path, monkeypatch) -> None:
    """The run is terminated after our rows are committed; if that fails, the rows go too."""
    from llmops.registry.registration import register

    store = store_env.store()
    store.open()
    before = _row_counts(store)
    client = store.mlflow
    real = client.set_terminated

    def failing(run_id: str, status: str = "FINISHED", *a, **k):  # noqa: ANN002, ANN003
        if status == "FINISHED":
            raise RuntimeError("tracking server went away")
        return real(run_id, status, *a, **k)

    monkeypatch.setattr(client, "set_terminated", failing)
    blob = tmp_path / "w.bin"
    blob.write_bytes(b"w" * 1000)
    with pytest.raises(RuntimeError, match="went away"):
        register(store, blob, "late")
    monkeypatch.setattr(client, "set_terminated", real)
    check = _client(store_env)
    assert check.search_model_versions("name = 'late'") == []
    assert _running_runs(check) == []
    assert _row_counts(store) == before


def test_alias_move_whose_audit_insert_fails_stays_put(store_env, cli, tmp_path) -> None:
    from sqlalchemy import event

    from llmops.registry.tables import Promotion

    versions = []
    for payload in (b"one" * 100, b"two" * 100):
        f = tmp_path / f"{payload[:3].decode()}.bin"
        f.write_bytes(payload)
        r = cli("--json", "models", "register", f, "--name", "audited")
        assert r.code == 0, r.err
        versions.append(r.json()["version"])
    v1, v2 = versions
    assert cli("promote", "audited", v1).code == 0

    def refuse(*_a, **_k):  # noqa: ANN002, ANN003
        raise RuntimeError("audit insert refused")

    event.listen(Promotion, "before_insert", refuse)
    try:
        r = cli("--json", "promote", "audited", v2, "--stage", "Production")
        first = cli("--json", "promote", "audited", v2, "--to", "staging")
    finally:
        event.remove(Promotion, "before_insert", refuse)
    assert r.code == 1 and "audit insert refused" in r.err
    assert first.code == 1 and "audit insert refused" in first.err

    client = _client(store_env)
    assert str(client.get_model_version_by_alias("audited", "production").version) == v1
    with pytest.raises(Exception):
        client.get_model_version_by_alias("audited", "staging")
    assert client.get_model_version("audited", v2).current_stage == "None"
    audit = cli("--json", "promotions", "list", "audited").json()
    assert [(a["version"], a["alias"]) for a in audit] == [(v1, "production")]

    # Without the fault the same move lands, with its row.
    assert cli("promote", "audited", v2).code == 0
    assert str(client.get_model_version_by_alias("audited", "production").version) == v2
    assert [a["version"] for a in cli("--json", "promotions", "list", "audited").json()] == [v1, v2]


N_WRITERS = 6


def test_concurrent_dataset_adds_get_versions_one_to_n(store_env, tmp_path, monkeypatch) -> None:
    import time

    from llmops.registry import datasets

    store_env.store().open()  # migrations once, before the writers start
    describe = datasets._info

    def slow_describe(*a, **k):  # noqa: ANN002, ANN003, ANN202 - a slow writer widens any race window
        time.sleep(0.3)
        return describe(*a, **k)

    monkeypatch.setattr(datasets, "_info", slow_describe)
    files = []
    for i in range(N_WRITERS):
        f = tmp_path / f"part{i}.jsonl"
        f.write_text("".join(f'{{"text": "row {i}.{j}"}}\n' for j in range(i + 1)))
        files.append(f)
    barrier = threading.Barrier(N_WRITERS)
    got: list[object] = [None] * N_WRITERS

    def add(i: int) -> None:
        store = store_env.store()
        barrier.wait()
        try:
            got[i] = datasets.add(store, "shared", files[i])
        except Exception as exc:  # noqa: BLE001 - reported below
            got[i] = exc

    threads = [threading.Thread(target=add, args=(i,)) for i in range(N_WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    errors = [g for g in got if isinstance(g, Exception)]
    assert not errors, errors
    assert sorted(int(g.version) for g in got) == list(range(1, N_WRITERS + 1))  # type: ignore[union-attr]
    by_version = {g.version: g.sha256 for g in got}  # type: ignore[union-attr]
    store = store_env.store()
    for version, sha in by_version.items():
        assert datasets.show(store, f"datasets:/shared/{version}").sha256 == sha
    assert datasets.list_datasets(store) == [dict(datasets.list_datasets(store)[0], name="shared",
                                                  latest_version=str(N_WRITERS), versions=N_WRITERS)]


def test_registration_copies_once_and_refuses_bytes_changed_since_hashed(store_env, tmp_path) -> None:
    """The bytes are hashed while they are copied into the store; a caller's hash that the copied
    bytes do not match (the file changed after conversion) registers nothing and leaves no copy."""
    from llmops.core.errors import LLMOpsError
    from llmops.core.hashing import sha256_path
    from llmops.registry.registration import register

    store = store_env.store()
    client = _client(store_env)
    blob = tmp_path / "model.gguf"
    blob.write_bytes(b"weights" * 300_000)
    before = _row_counts(store)
    with pytest.raises(LLMOpsError, match="changed after they were hashed"):
        register(store, blob, "changed", sha256="0" * 64)
    assert client.search_model_versions("name = 'changed'") == []
    assert _running_runs(client) == [] and _row_counts(store) == before
    assert not any((store_env.store_dir / "artifacts").rglob("model.gguf"))

    v = register(store, blob, "changed")
    assert v.sha256 == sha256_path(blob)
    stored = list((store_env.store_dir / "artifacts").rglob("model.gguf"))
    assert len(stored) == 1 and stored[0].read_bytes() == blob.read_bytes()
    again = register(store, blob, "changed")  # the same bytes: one stored copy
    assert again.version == "2" and len(list((store_env.store_dir / "artifacts").rglob("model.gguf"))) == 1


def test_link_registers_one_file_and_verify_sees_it_changed_in_place(store_env, tmp_path, cli) -> None:
    """``--link``: the store's bytes are the file itself (no second copy), found through MLflow's
    own client; rewriting the file in place is then a changed version, which verify reports."""
    import os

    from llmops.core.hashing import sha256_path

    blob = tmp_path / "model.bin"
    blob.write_bytes(os.urandom(3 << 20))
    r = cli("--json", "models", "register", str(blob), "--name", "linked", "--link")
    assert r.code == 0, r.err
    stored = [p for p in (store_env.store_dir / "artifacts").rglob("model.bin")]
    assert len(stored) == 1 and os.path.samefile(stored[0], blob)
    assert r.json()["sha256"] == sha256_path(blob)
    mv = _client(store_env).get_model_version("linked", "1")
    assert mv.tags["sha256"] == r.json()["sha256"]
    assert cli("verify", "models:/linked/1").code == 0
    with open(blob, "r+b") as f:  # an in-place rewrite (what llama-quantize does to its output)
        f.write(b"\0" * 16)
    assert cli("verify", "models:/linked/1").code == 1


def test_register_by_direct_io_stores_the_hashed_bytes(store_env, tmp_path, cli, monkeypatch) -> None:
    """A large file is copied into the store by direct I/O (here: every file, in 1 MiB windows):
    the stored bytes are the file's, MLflow's client sees its hash, and verify agrees."""
    import os

    import llmops.core.hashing as hashing
    from llmops.core.hashing import sha256_path

    monkeypatch.setattr(hashing, "DIRECT_MIN", 0)
    monkeypatch.setattr(hashing, "MAP_WINDOW", 1 << 20)
    blob = tmp_path / "model.bin"
    blob.write_bytes(os.urandom((3 << 20) + 777))
    r = cli("--json", "models", "register", str(blob), "--name", "direct")
    assert r.code == 0, r.err
    stored = [p for p in (store_env.store_dir / "artifacts").rglob("model.bin")]
    assert len(stored) == 1 and not os.path.samefile(stored[0], blob)
    assert stored[0].read_bytes() == blob.read_bytes()
    assert _client(store_env).get_model_version("direct", "1").tags["sha256"] == sha256_path(blob)
    assert cli("verify", "models:/direct/1").code == 0


def test_link_across_filesystems_copies(store_env, tmp_path) -> None:
    """Where no hard link can be made (here: a file on another filesystem), the bytes are copied."""
    import os
    import shutil
    import tempfile

    from llmops.core.hashing import copy_path_hashing, sha256_path

    other = Path(tempfile.mkdtemp(dir="/dev/shm")) if Path("/dev/shm").is_dir() else None
    if other is None or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem here")
    try:
        src = other / "model.bin"
        src.write_bytes(os.urandom(1 << 20))
        digest = copy_path_hashing(src, tmp_path / "copy.bin", link=True)
        assert digest == sha256_path(src) and not os.path.samefile(src, tmp_path / "copy.bin")
    finally:
        shutil.rmtree(other, ignore_errors=True)
