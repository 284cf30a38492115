"""The defects the fault campaign found, each pinned by a test of its own: rows that cannot be
removed keep their bytes, a failed registration gives its number again and leaves nothing
behind, a lock whose database session dies does not undo a finished registration, and gc beside
running writers removes nothing they still need."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import create_engine, text
from test_doctor import LLMOPS, SQLITE, _blob, _kinds, _own_cache, _sql  # noqa: F401 - _own_cache: autouse


# -- defects the campaign found ----------------------------------------------------------------------
def _child(code: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Python ``code`` in a process of its own (which has ended by the time this returns: what it
    left is a dead process's), with this test's store settings."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


FAIL_AFTER_COMMIT = """
import sys
from pathlib import Path
from sqlalchemy import event
from sqlalchemy.engine import Engine
from llmops.registry.store import Store
from llmops.registry.registration import register

store = Store().open()
def io_error(*_a, **_k):
    raise OSError(5, "Input/output error")
def refuse_deletes(_conn, _cursor, statement, *_a):
    if statement.lstrip().upper().startswith("DELETE FROM LLMOPS_"):
        raise OSError(5, "Input/output error")
store.mlflow.finalize_logged_model = io_error          # the first failure, after the rows' commit
event.listen(Engine, "before_cursor_execute", refuse_deletes)   # and removing the rows fails too
try:
    register(store, Path(sys.argv[-1] if len(sys.argv) > 1 else "BLOB"), "kept")
except OSError:
    sys.exit(3)
"""


@SQLITE
def test_rows_that_cannot_be_removed_keep_their_bytes(store_env, cli, tmp_path) -> None:
    """A failure after the registration's rows are committed removes the rows and undoes the MLflow
    side; when the rows cannot be removed either (the disk or the database failing), the version
    stays whole: its bytes are not deleted from under rows that record them (the campaign's EIO
    on the store found bytes removed, rows left). gc then finishes what was left undone."""
    from llmops.registry.artifacts import local_path

    blob = _blob(tmp_path, "w.bin")
    r = _child(FAIL_AFTER_COMMIT.replace("BLOB", str(blob)))
    assert r.returncode == 3, r.stderr[-2000:]
    rows = _sql(store_env.db_url, "SELECT a.uri FROM llmops_versions v JOIN llmops_artifacts a "
                                  "ON a.id = v.artifact_id WHERE v.name = 'kept'")
    assert rows, "the rows were removed after all"
    assert local_path(rows[0][0]).exists(), "bytes removed from under the rows that record them"
    # what is left unfinished (its LoggedModel PENDING, its run RUNNING) gc finishes
    assert _kinds(cli("--json", "doctor")) == ["pending-logged-model", "stale-run"]
    assert cli("gc").code == 0
    assert cli("doctor").code == 0
    assert cli("verify", "models:/kept/1").code == 0


@SQLITE
def test_a_failed_registration_gives_its_number_again(store_env, cli, tmp_path, monkeypatch) -> None:
    """A registration that fails after MLflow numbered its version leaves no gap: the next one gets
    that number (MLflow's delete keeps a number for good; the half-made version is purged)."""
    from llmops.registry import results

    assert cli("models", "register", _blob(tmp_path, "a.bin"), "--name", "g").code == 0

    def boom(*_a, **_k):  # noqa: ANN002, ANN003
        raise RuntimeError("results table unavailable")

    from llmops.registry.evaluations import Evaluation
    from llmops.registry.registration import register
    from llmops.registry.results import Measurement

    ev = Evaluation([Measurement("ppl", 1.0, None, {"kind": "verify", "family": "accuracy"})],
                    {"cpu_model": "x", "cores": 1}, "llama.cpp", "cpu")
    real = results.record
    monkeypatch.setattr(results, "record", boom)
    with pytest.raises(RuntimeError):
        register(store_env.store(), _blob(tmp_path, "b.bin"), "g", evaluations=[ev])
    monkeypatch.setattr(results, "record", real)
    again = cli("--json", "models", "register", _blob(tmp_path, "c.bin"), "--name", "g")
    assert again.code == 0 and again.json()["version"] == "2"
    assert cli("doctor").code == 0


@SQLITE
def test_a_failed_prompts_add_leaves_no_prompt_version(store_env, cli) -> None:
    """Adding a prompt is all or nothing too: when llmops' rows cannot be written, the prompt
    version MLflow made is removed again, and the next add gets its number."""
    from sqlalchemy import event

    from llmops.registry.tables import Version

    def refuse(*_a, **_k):  # noqa: ANN002, ANN003
        raise RuntimeError("versions table unavailable")

    assert cli("prompts", "add", "q", "--template", "one {{x}}").code == 0
    event.listen(Version, "before_insert", refuse)
    try:
        r = cli("prompts", "add", "q", "--template", "two {{x}}")
    finally:
        event.remove(Version, "before_insert", refuse)
    assert r.code == 1 and "versions table unavailable" in r.err
    client = store_env.store().open().mlflow
    assert [str(v.version) for v in client.search_prompt_versions("q")] == ["1"]
    again = cli("--json", "prompts", "add", "q", "--template", "two {{x}}")
    assert again.code == 0 and again.json()["version"] == "2"
    assert cli("doctor").code == 0


@pytest.mark.postgres
def test_a_lock_whose_session_dies_does_not_undo_a_finished_registration(pg_url, tmp_path, monkeypatch, cli) -> None:
    """The advisory lock's session terminated while a registration holds it: PostgreSQL has
    released the lock with the session, the registration's work is done, and it stays done
    (releasing the lock raised, and the registration was undone after its commit: bytes
    deleted, MLflow's version purged, the rows left behind)."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    from llmops.registry import db

    monkeypatch.setenv("LLMOPS_DATABASE_URL", pg_url)
    monkeypatch.setenv("LLMOPS_STORE", str(tmp_path / "store"))
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")

    def kill_lock_holder(_session) -> None:  # noqa: ANN001 - after our rows' commit, under the lock
        with admin.connect() as c:
            c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                           "AND granted AND pid <> pg_backend_pid()"))

    event.listen(Session, "after_commit", kill_lock_holder)
    try:
        r = cli("--json", "models", "register", _blob(tmp_path, "w.bin"), "--name", "locked")
    finally:
        event.remove(Session, "after_commit", kill_lock_holder)
        admin.dispose()
    assert r.code == 0, r.err
    assert cli("verify", "models:/locked/1").code == 0
    assert cli("doctor").code == 0
    db.dispose_all()


@SQLITE
def test_gc_beside_running_writers(store_env, tmp_path) -> None:
    """gc repairs while registrations and a dataset version are being written: it takes their
    locks and leaves what they have in flight alone; afterwards every version is whole, numbered
    1..N, and doctor is clean."""
    from llmops.registry.doctor import check
    from llmops.registry.repair import gc

    env = dict(os.environ)
    commands = [[LLMOPS, "models", "register", _blob(tmp_path, f"w{i}.bin"), "--name", "busy"] for i in range(2)]
    commands.append([LLMOPS, "datasets", "add", "busy-ds", _blob(tmp_path, "d.txt", 3000)])
    writers = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for c in commands]
    try:
        store = store_env.store()
        rounds = 0
        while any(w.poll() is None for w in writers) or rounds < 2:
            actions, _left = gc(store)
            assert actions == [], actions  # nothing of theirs is debris
            rounds += 1
        for w in writers:
            _out, err = w.communicate(timeout=600)
            assert w.returncode == 0, err
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.communicate()
    versions = sorted(int(v) for (v,) in _sql(store_env.db_url, "SELECT version FROM llmops_versions "
                                                                "WHERE name = 'busy'"))
    assert versions == [1, 2]
    assert check(store).ok, check(store).findings
