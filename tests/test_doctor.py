"""``llmops doctor`` and ``llmops gc``: every kind of inconsistency doctor knows, planted in a real
store and found; gc repairs the debris and never removes a byte a version records. The defects
the fault campaign found are pinned in ``test_gc_safety``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

LLMOPS = str(Path(sys.executable).with_name("llmops"))
SQLITE = pytest.mark.parametrize("store_env", ["sqlite"], indirect=True)  # PostgreSQL: the planting test runs on both


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache and a working folder of this test's own: doctor and gc look in the cache and (for
    staged outputs) the current folder, and the user's are shared."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("LLMOPS_CACHE", str(home / "cache"))
    monkeypatch.chdir(home)


def _kinds(result) -> list[str]:  # noqa: ANN001 - conftest.CliResult
    return sorted(f["kind"] for f in result.json()["findings"])


def _sql(url: str, statement: str, **params: object) -> list:
    eng = create_engine(url)
    try:
        with eng.begin() as c:
            res = c.execute(text(statement), params)
            return res.all() if res.returns_rows else []
    finally:
        eng.dispose()


def _blob(tmp_path: Path, name: str, size: int = 50_000) -> Path:
    f = tmp_path / name
    f.write_bytes(os.urandom(size))
    return f


# -- every kind doctor knows, planted and found --------------------------------------------------------
def _dead() -> str:
    """The owner token of a process that cannot be alive: this host, another boot."""
    from llmops.core import owners

    return f"{owners.host()}/00000000/1/1"


def _fk_off(url: str) -> str:
    return "PRAGMA foreign_keys = OFF" if url.startswith("sqlite") else "SET session_replication_role = replica"


def _plant_rows(url: str, *statements: str) -> None:
    """Rows written with the database's own checks off (as a half-applied repair or a hand edit
    could leave them)."""
    eng = create_engine(url)
    try:
        with eng.begin() as c:
            c.execute(text(_fk_off(url)))
            for st in statements:
                c.execute(text(st))
    finally:
        eng.dispose()


def _record_twice(store, artifact_id: int, job_key: str) -> None:  # noqa: ANN001
    """One fleet job's results under two bench runs (as two drivers racing past the job's check)."""
    from llmops.registry.results import Measurement, record
    from llmops.registry.tables import BenchmarkResult, Run

    hw = {"cpu_model": "Test CPU", "cores": 2, "isa_flags": ["avx2"]}
    with store.session() as s:
        for metric in ("ppl", "kld"):
            run = Run(kind="bench", command="bench", status="finished")
            s.add(run)
            s.flush()
            rows = record(s, artifact_id=artifact_id, hardware=hw, backend="llama.cpp", device="cpu",
                          measurements=[Measurement(metric, 1.0)], run=run)
            for r in rows:
                r.job_key = job_key
        s.flush()
        assert len(s.query(BenchmarkResult).filter(BenchmarkResult.job_key == job_key).all()) == 2


def test_every_inconsistency_is_found_and_the_debris_repaired(store_env, cli, tmp_path) -> None:
    from mlflow.entities import LoggedModelOutput  # noqa: F401 - the client's own types

    from llmops.core import owners
    from llmops.registry import logged_models
    from llmops.registry.artifacts import local_path
    from llmops.registry.intake import INCOMING
    from llmops.registry.mlflow_rows import MADE_BY, MADE_TAG, OWNER_TAG

    url, dead = store_env.db_url, _dead()
    files = [_blob(tmp_path, f"v{i}.bin") for i in range(6)]
    for name, f in (("a", files[0]), ("a", files[1]), ("b", files[2]), ("c", files[3]), ("d", files[4])):
        assert cli("models", "register", f, "--name", name).code == 0
    assert cli("promote", "a", "1").code == 0
    assert cli("datasets", "add", "ds", _blob(tmp_path, "ds.txt", 2000)).code == 0
    store = store_env.store()
    client = store.open().mlflow
    stored = {n: local_path(v) for n, v in _sql(url, "SELECT v.name, a.uri FROM llmops_versions v JOIN "
                                                     "llmops_artifacts a ON a.id = v.artifact_id WHERE v.kind = 'model'")}
    assert cli("--json", "doctor").json()["ok"]

    # what a person must look at
    stored["b"].unlink()                                                       # missing-bytes
    with open(stored["c"], "ab") as fh:                                          # size-mismatch
        fh.write(b"more")
    client.set_model_version_tag("d", "1", "sha256", "0" * 64)                  # record-mismatch
    client.delete_model_version("a", "2")                                       # missing-mlflow (a/2)
    # debris of writers that died
    exp = store.experiment_id
    run = client.create_run(exp, tags={"llmops.command": "register", "llmops.model": "a", OWNER_TAG: dead})
    client.create_model_version("a", f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                tags={"llmops.run_id": run.info.run_id})       # half-made-version (a/3), stale-run
    gone = client.create_run(exp, tags={"llmops.command": "datasets add", "llmops.dataset": "ds", OWNER_TAG: dead})
    client.set_terminated(gone.info.run_id, "FINISHED")                          # run-without-rows
    burned = client.create_run(exp, tags={"llmops.command": "register", "llmops.model": "e", OWNER_TAG: dead})
    client.create_registered_model("e", tags={MADE_TAG: MADE_BY})
    client.create_model_version("e", "x", run_id=burned.info.run_id, tags={"llmops.run_id": burned.info.run_id})
    client.delete_model_version("e", "1")                                       # burned-version, empty-model
    client.set_terminated(burned.info.run_id, "FAILED")
    client.delete_run(burned.info.run_id)
    client.register_prompt("p", "Say {{x}}", tags={OWNER_TAG: dead})           # half-made-prompt
    lm = logged_models.create(client, exp, name="d", version="9", run_id=None, version_tags={})
    client.set_logged_model_tags(lm, {OWNER_TAG: dead})                        # orphan-logged-model
    c_model = client.get_model_version("c", "1").tags["llmops.logged_model_id"]
    _sql(url, "UPDATE logged_models SET status = 1 WHERE model_id = :m", m=c_model)  # pending-logged-model,
    client.set_logged_model_tags(c_model, {OWNER_TAG: dead})                   # its registration's process gone
    client.delete_logged_model(client.get_model_version("d", "1").tags["llmops.logged_model_id"])  # missing-logged-model
    client.set_registered_model_alias("b", "production", "1")                   # alias-off-audit (b)
    art = store.settings.artifact_root
    (art / "stray.bin").write_bytes(b"x" * 100)                                 # orphan-bytes
    (art / f"{INCOMING}dead").mkdir()                                           # staged-leftover
    (art / f"{INCOMING}dead" / "half.bin").write_bytes(b"half")
    live, fd = owners.create_held_folder(art, INCOMING)                         # held by this process: in flight
    a1 = _sql(url, "SELECT artifact_id FROM llmops_versions WHERE name = 'a' AND version = '1'")[0][0]
    _plant_rows(url, f"INSERT INTO llmops_lineage (parent_id, child_id, relation, parameters, created_at) "
                     f"VALUES (999999, {a1}, 'converted_from', '{{}}', CURRENT_TIMESTAMP)")  # dangling-row
    _record_twice(store, a1, "job-1")                                           # duplicate-results
    try:
        found = cli("--json", "doctor")
        assert found.code == 1
        kinds = _kinds(found)
        assert set(kinds) == {"missing-bytes", "size-mismatch", "record-mismatch", "missing-mlflow",
                              "half-made-version", "stale-run", "run-without-rows", "burned-version", "empty-model",
                              "half-made-prompt", "orphan-logged-model", "pending-logged-model",
                              "missing-logged-model", "alias-off-audit", "orphan-bytes", "staged-leftover",
                              "dangling-row", "duplicate-results"}, kinds
        assert not any(live.name in f["subject"] for f in found.json()["findings"])  # in flight: not debris
        text_out = cli("doctor").out
        assert len(text_out.strip().splitlines()) == len(kinds)  # one line per violation

        g = cli("--json", "gc")
        assert g.code == 1  # what needs a person is left
        assert sorted(f["kind"] for f in g.json()["left"]) == ["missing-bytes", "missing-mlflow", "record-mismatch",
                                                                "size-mismatch"]
        assert live.is_dir() and not (art / f"{INCOMING}dead").exists() and not (art / "stray.bin").exists()
        assert all(p.exists() for n, p in stored.items() if n != "b")  # no recorded byte removed
        assert str(client.get_model_version_by_alias("a", "production").version) == "1"
        with pytest.raises(Exception):
            client.get_model_version_by_alias("b", "production")
        assert cli("--json", "models", "register", files[5], "--name", "a").json()["version"] == "3"  # purged: given again
        assert client.search_registered_models("name = 'e'") == []
        assert client.get_logged_model(c_model).status.to_int() == 2
        assert _kinds(cli("--json", "doctor")) == ["missing-bytes", "missing-mlflow", "record-mismatch",
                                                   "size-mismatch"]
        assert len(_sql(url, "SELECT id FROM llmops_benchmark_results WHERE job_key = 'job-1'")) == 1
    finally:
        owners.release(fd)


@SQLITE
def test_deep_rehashes_what_the_size_check_cannot_see(store_env, cli, tmp_path) -> None:
    from llmops.registry.artifacts import local_path

    assert cli("models", "register", _blob(tmp_path, "w.bin"), "--name", "h").code == 0
    path = local_path(_sql(store_env.db_url, "SELECT uri FROM llmops_artifacts")[0][0])
    with open(path, "r+b") as fh:  # the same size, other bytes
        fh.write(b"\0" * 16)
    assert cli("doctor").code == 0
    deep = cli("--json", "doctor", "--deep")
    assert deep.code == 1 and _kinds(deep) == ["hash-mismatch"]
    assert cli("gc").code == 0 and path.exists()  # not debris: gc leaves it alone (and re-hashes nothing)
    assert _kinds(cli("--json", "doctor", "--deep")) == ["hash-mismatch"]


def test_leftovers_in_the_cache_and_beside_outputs(cli, tmp_path, monkeypatch) -> None:
    """What a killed `serve`, evaluation, logits writer or conversion leaves outside the store:
    found, removed (a folder a commit moved aside goes back in its place), never while a live
    llmops process may own it."""
    cache, outs = tmp_path / "cache", tmp_path / "outs"
    monkeypatch.setenv("LLMOPS_CACHE", str(cache))
    monkeypatch.setenv("LLMOPS_STORE", str(tmp_path / "store"))
    for p in (cache / "serve" / ".download-x1", cache / "scratch" / "llmops-y2", outs):
        p.mkdir(parents=True)
    (cache / "serve" / ".download-x1" / "m.gguf").write_bytes(b"half")
    (cache / "logits").mkdir()
    (cache / "logits" / "logits-ab.tmp999999999").write_bytes(b"0")
    (outs / ".m.gguf.a1b2c3d4e5.partial").write_bytes(b"partial")
    (outs / ".onnx-out.replaced-999999999").mkdir()
    (outs / ".onnx-out.replaced-999999999" / "model.onnx").write_bytes(b"the earlier output")

    # a live llmops process on this cache (argv[0] "llmops"): its serve and scratch folders may be its own
    holder = subprocess.Popen(["bash", "-c", "exec -a llmops sleep 600"], env={**os.environ, "LLMOPS_CACHE": str(cache)})
    try:
        from faultenv import wait_for

        wait_for(lambda: Path(f"/proc/{holder.pid}/cmdline").read_bytes().startswith(b"llmops"), 30, "the holder")
        found = cli("--json", "doctor", "--outputs", outs)
        subjects = sorted(Path(f["subject"]).name for f in found.json()["findings"])
        assert subjects == [".m.gguf.a1b2c3d4e5.partial", ".onnx-out.replaced-999999999", "logits-ab.tmp999999999"]
    finally:
        holder.kill()
        holder.wait()
    found = cli("--json", "doctor", "--outputs", outs)
    assert sorted(Path(f["subject"]).name for f in found.json()["findings"]) == [
        ".download-x1", ".m.gguf.a1b2c3d4e5.partial", ".onnx-out.replaced-999999999", "llmops-y2",
        "logits-ab.tmp999999999"]
    assert cli("gc", "--dry-run", "--outputs", outs).code == 0 and (outs / ".m.gguf.a1b2c3d4e5.partial").exists()
    assert cli("gc", "--outputs", outs).code == 0
    assert cli("doctor", "--outputs", outs).code == 0
    assert sorted(p.name for p in outs.iterdir()) == ["onnx-out"]  # put back: its commit never finished
    assert (outs / "onnx-out" / "model.onnx").read_bytes() == b"the earlier output"
    assert list((cache / "serve").iterdir()) == [] and list((cache / "scratch").iterdir()) == []


def test_a_folder_output_replacing_a_link_leaves_no_link_behind(tmp_path) -> None:
    """Committing a folder output over a symbolic link to a folder replaces the link, leaves the
    folder it pointed to alone, and leaves no `.NAME.replaced-PID` link beside the output (the
    link could not be removed as a folder, and stayed)."""
    from llmops.core.atomic import staged_folder

    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    dest = tmp_path / "out"
    dest.symlink_to(target)
    with staged_folder(dest) as (staged, _work):
        (staged.tmp / "model.onnx").write_bytes(b"new")
        staged.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]
    assert (dest / "model.onnx").read_bytes() == b"new" and not dest.is_symlink()
    assert (target / "keep.txt").read_text() == "keep"


def test_a_staged_output_is_held_while_its_writer_lives(tmp_path) -> None:
    """A staged copy is debris only once its process is gone: one held by a live process is not
    reported, the same kind of copy left by a process killed with SIGKILL is, and goes."""
    from llmops.core.atomic import clean_leftover, leftovers

    code = ("import sys, time; from pathlib import Path; from llmops.core.atomic import staged_file, staged_folder\n"
            f"f = staged_file(Path({str(tmp_path / 'm.gguf')!r})); f.__enter__()\n"
            f"d = staged_folder(Path({str(tmp_path / 'onnx')!r})); d.__enter__()\n"
            "print('staged', flush=True); time.sleep(600)\n")
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "staged"
        assert len(list(tmp_path.iterdir())) == 2 and leftovers(tmp_path) == []
    finally:
        writer.kill()
        writer.wait()
    found = leftovers(tmp_path)
    assert sorted(x.dest.name for x in found) == ["m.gguf", "onnx"]
    assert all(clean_leftover(x) for x in found) and list(tmp_path.iterdir()) == []
