"""The registry on a real MLflow over real SQL (SQLite and PostgreSQL)."""

from __future__ import annotations


import pytest
from sqlalchemy import func, inspect, select


def _count(store, table) -> int:  # noqa: ANN001
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(table))


def test_register_show_and_mlflow_finds_it(store_env, cli, tiny_models) -> None:
    src = tiny_models("llama")
    r = cli("--json", "models", "register", src, "--name", "smol-tiny", "--tag", "team=research")
    assert r.code == 0, r.err
    reg = r.json()
    assert reg["uri"] == "models:/smol-tiny/1"

    shown = cli("models", "show", "models:/smol-tiny/1", "--json").json()
    tags = shown["tags"]
    for key in ("format", "quant", "bits_per_weight", "sha256", "size_bytes", "source"):
        assert key in tags, key
    assert tags["format"] == "safetensors" and tags["quant"] == "F32" and tags["bits_per_weight"] == "32"
    assert tags["team"] == "research"
    assert tags["source"] == str(src.resolve())
    assert int(tags["size_bytes"]) == sum(f.stat().st_size for f in src.rglob("*") if f.is_file())

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store_env.db_url, registry_uri=store_env.db_url)
    mv = client.get_model_version("smol-tiny", "1")
    assert mv.tags["sha256"] == reg["sha256"]
    run = client.get_run(mv.run_id)
    assert run.data.params["sha256"] == reg["sha256"]
    stored = [a.path for a in client.list_artifacts(mv.run_id, "model")]
    assert "model/model.safetensors" in stored and "model/config.json" in stored
    pictures = [a.path for a in client.list_artifacts(mv.run_id, "lineage")]
    assert "lineage/lineage.png" in pictures and "lineage/lineage.mmd" in pictures


def test_same_bytes_are_one_artifact_and_one_copy(store_env, cli, tmp_path) -> None:
    blob = tmp_path / "weights.bin"
    blob.write_bytes(b"\x01\x02" * 50_000)
    a = cli("--json", "models", "register", blob, "--name", "first").json()
    b = cli("--json", "models", "register", blob, "--name", "second").json()
    assert a["sha256"] == b["sha256"]
    assert a["stored_uri"] == b["stored_uri"]
    copies = [p for p in (store_env.store_dir / "artifacts").rglob("weights.bin")]
    assert len(copies) == 1

    from llmops.registry.tables import Artifact, Version

    store = store_env.store()
    assert _count(store, Artifact) == 1
    assert _count(store, Version) == 2


def test_register_twice_same_name_makes_version_2(store_env, cli, tmp_path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"a" * 1000)
    assert cli("models", "register", f, "--name", "m").code == 0
    f.write_bytes(b"b" * 1000)
    assert cli("models", "register", f, "--name", "m").code == 0
    rows = cli("--json", "models", "list").json()
    assert rows == [dict(rows[0], name="m", versions=2, latest_version="2")]
    latest = cli("--json", "models", "show", "models:/m/latest").json()
    assert latest["version"] == "2"


def test_lineage_up_and_down(store_env, cli, tiny_models, tmp_path) -> None:
    parent = tiny_models("llama")
    child = tmp_path / "child.bin"
    child.write_bytes(b"converted" * 100)
    assert cli("models", "register", parent, "--name", "base").code == 0
    r = cli("--json", "models", "register", child, "--name", "derived", "--from", "models:/base/1")
    assert r.code == 0, r.err

    up = cli("--json", "lineage", "models:/derived/1", "--up").json()
    labels = {lab for n in up["nodes"] for lab in n["labels"]}
    assert labels == {"models:/base/1", "models:/derived/1"}
    assert [e["relation"] for e in up["edges"]] == ["converted_from"]

    down = cli("lineage", "models:/base/1", "--down", "--format", "mermaid")
    assert down.code == 0 and "-->|converted_from|" in down.out

    tree = cli("lineage", "models:/derived/1")
    assert "converted_from: models:/base/1" in tree.out


def test_lineage_walks_deep_chains(store_env) -> None:
    """The recursive CTE follows 12 generations on both databases."""
    from llmops.registry import lineage
    from llmops.registry.tables import Artifact, LineageEdge

    store = store_env.store()
    with store.session() as s:
        arts = [Artifact(kind="model", name=f"g{i}", uri=f"file:///g{i}", sha256=f"{i:064x}", size_bytes=1, meta={})
                for i in range(13)]
        s.add_all(arts)
        s.flush()
        for a, b in zip(arts, arts[1:]):
            s.add(LineageEdge(parent_id=a.id, child_id=b.id, relation="converted_from", parameters={}))
        last, first = arts[-1].id, arts[0].id
    with store.session() as s:
        up = lineage.walk(s, last, "up")
        down = lineage.walk(s, first, "down")
    assert len(up) == 12 and max(e.depth for e in up) == 12
    assert len(down) == 12 and down[-1].child == last


def test_verify_detects_tampered_bytes(store_env, cli, tmp_path) -> None:
    f = tmp_path / "model.gguf.bin"
    f.write_bytes(bytes(range(256)) * 100)
    reg = cli("--json", "models", "register", f, "--name", "tamper").json()
    ok = cli("--json", "verify", "models:/tamper/1")
    assert ok.code == 0 and ok.json()["ok"] is True

    from llmops.registry.artifacts import local_path

    stored = local_path(reg["stored_uri"])
    data = bytearray(stored.read_bytes())
    data[100] ^= 0xFF
    stored.write_bytes(bytes(data))
    bad = cli("--json", "verify", "models:/tamper/1")
    assert bad.code == 1
    assert bad.json()["ok"] is False
    assert "do not match" in bad.err and len(bad.err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "", "x" * 200, "with space"])
def test_bad_names_are_refused_and_leave_nothing(store_env, cli, tmp_path, name) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"w" * 10)
    r = cli("models", "register", f, "--name", name)
    assert r.code == 2
    assert "invalid model name" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (store_env.store_dir / "artifacts").exists() or not any((store_env.store_dir / "artifacts").rglob("w.bin"))


def test_failed_registration_leaves_no_version_no_rows_no_bytes(store_env, cli, tmp_path, monkeypatch) -> None:
    from llmops.registry import registration
    from llmops.registry.tables import Artifact, Version

    f = tmp_path / "w.bin"
    f.write_bytes(b"payload" * 1000)
    assert cli("models", "register", f, "--name", "ok-model").code == 0  # the store exists and is healthy

    def broken(*_a, **_k):  # noqa: ANN002, ANN003
        raise RuntimeError("disk full")

    monkeypatch.setattr(registration, "_parent_artifact", broken)
    g = tmp_path / "g.bin"
    g.write_bytes(b"other" * 1000)
    r = cli("models", "register", g, "--name", "broken-model", "--from", str(f))
    assert r.code == 1 and "disk full" in r.err

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store_env.db_url, registry_uri=store_env.db_url)
    assert [m.name for m in client.search_registered_models()] == ["ok-model"]
    from mlflow.entities import ViewType

    exps = [e.experiment_id for e in client.search_experiments()]
    active = client.search_runs(exps, run_view_type=ViewType.ACTIVE_ONLY)
    assert [r.data.tags.get("llmops.model") for r in active] == ["ok-model"]  # the failed run is gone
    assert all(r.info.status == "FINISHED" for r in active)
    store = store_env.store()
    assert _count(store, Artifact) == 1 and _count(store, Version) == 1
    assert not any((store_env.store_dir / "artifacts").rglob("g.bin"))


def test_missing_reference_and_path_errors(store_env, cli, tmp_path) -> None:
    r = cli("models", "show", "models:/nope/1")
    assert r.code == 1 and "not found" in r.err
    r = cli("models", "show", "not-a-ref")
    assert r.code == 2 and "invalid reference" in r.err
    r = cli("models", "register", tmp_path / "missing", "--name", "x")
    assert r.code == 2 and "no such file" in r.err
    f = tmp_path / "w.bin"
    f.write_bytes(b"1")
    r = cli("models", "register", f, "--name", "x", "--from", "models:/ghost/3")
    assert r.code == 1 and "not found" in r.err
    assert cli("--json", "models", "list").json() == []


def test_db_current_names_our_revision_beside_mlflows(store_env, cli) -> None:
    r = cli("--json", "db", "current")
    assert r.code == 0, r.err
    d = r.json()
    assert d["revision"] == d["head"] and d["revision"]
    tables = set(inspect(store_env.store().engine).get_table_names())
    assert {"alembic_version", "llmops_alembic_version", "registered_models", "llmops_artifacts"} <= tables
    assert cli("db", "upgrade").code == 0


def test_sqlite_store_runs_in_wal_mode(tmp_path, monkeypatch, cli) -> None:
    monkeypatch.setenv("LLMOPS_STORE", str(tmp_path / "s"))
    monkeypatch.delenv("LLMOPS_DATABASE_URL", raising=False)
    assert cli("db", "upgrade").code == 0
    import sqlite3

    con = sqlite3.connect(tmp_path / "s" / "llmops.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_refs_parse() -> None:
    from llmops.core.errors import UsageError
    from llmops.registry.refs import parse_ref

    assert parse_ref("models:/a/3").version == "3"
    assert parse_ref("models:/a@production").alias == "production"
    assert parse_ref("datasets:/wiki/1").kind == "dataset"
    for bad in ("models:/a", "models:/../1", "models:/a/b/c", "model:/a/1", "models:/a/x1"):
        with pytest.raises(UsageError):
            parse_ref(bad)


def test_redact_hides_credentials() -> None:
    from llmops.core.settings import redact

    assert redact("postgresql+psycopg://user:secret@db:5432/x") == "postgresql+psycopg://***@db:5432/x"
    assert "secret" not in redact("http://admin:secret@host/")
    assert redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
