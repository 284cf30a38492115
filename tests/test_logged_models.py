"""Every registered version has an MLflow LoggedModel (SQLite and PostgreSQL), found through
MLflow's own client: with the version's identity as parameters, linked to the version both ways,
its figures logged with the dataset they were measured on, and none left by a failed
registration; versions registered before LoggedModels get one from `llmops models backfill`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

HW = {"cpu_model": "Test CPU", "cores": 2, "isa_flags": ["avx2"], "ram_bytes": 1 << 34}
VERIFY_PPL = {"kind": "verify", "family": "accuracy", "ctx": 512, "chunks": 4, "scored": "second_half",
              "backend": "llama.cpp", "threads": 2, "device": "cpu"}


def _client(store_env):  # noqa: ANN001, ANN202 - a client of our own, not the store's
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store_env.db_url, registry_uri=store_env.db_url)


def _alive(client, store) -> list:  # noqa: ANN001
    return list(client.search_logged_models([store.experiment_id]))


def _register_evaluated(store, tmp_path: Path, name: str = "lm", payload: bytes = b"q4" * 2000):  # noqa: ANN001, ANN202
    """A version registered as ``convert --verify`` does: a parent, an eval dataset, a figure."""
    from llmops.registry import datasets
    from llmops.registry.evaluations import Evaluation
    from llmops.registry.registration import register
    from llmops.registry.results import Measurement
    from llmops.registry.versions import ParentSpec

    text = tmp_path / "eval.txt"
    text.write_text("some evaluation text\n" * 50)
    info = datasets.add(store, "eval", text)
    parent = tmp_path / "parent.bin"
    parent.write_bytes(b"parent" * 100)
    blob = tmp_path / f"{name}.gguf.bin"
    blob.write_bytes(payload)
    evaluation = Evaluation(measurements=[Measurement("ppl", 12.5, None, VERIFY_PPL)], hardware=HW,
                            backend="llama.cpp", device="cpu", dataset=info)
    v = register(store, blob, name, fmt="gguf", quant="Q4_K_M", bits_per_weight=4.85, tags={"team": "ui"},
                 parents=[ParentSpec(str(parent))], evaluations=[evaluation], dataset_inputs=[(info, "evaluation")],
                 metrics={"ppl_output": 12.5})
    return v, info


def test_a_registered_version_has_its_logged_model(store_env, tmp_path) -> None:
    from llmops.registry.logged_models import VERSION_TAG

    store = store_env.store()
    v, info = _register_evaluated(store, tmp_path)
    client = _client(store_env)
    models = _alive(client, store)
    assert len(models) == 1
    lm = models[0]
    mv = client.get_model_version("lm", v.version)
    # linked both ways: the version names its LoggedModel, the LoggedModel its version
    assert mv.tags[VERSION_TAG] == lm.model_id
    assert json.loads(lm.tags["mlflow.modelVersions"]) == [{"name": "lm", "version": v.version}]
    assert lm.tags["llmops.registered_model"] == f"models:/lm/{v.version}"
    from mlflow.entities import LoggedModelStatus

    assert lm.name == f"lm-v{v.version}" and lm.model_type == "gguf" and lm.status == LoggedModelStatus.READY
    assert lm.experiment_id == store.experiment_id and lm.source_run_id == v.run_id
    assert {k: lm.params[k] for k in ("format", "quant", "sha256", "size_bytes", "bits_per_weight")} == {
        "format": "gguf", "quant": "Q4_K_M", "sha256": v.sha256, "size_bytes": str(v.size_bytes),
        "bits_per_weight": "4.85"}
    assert lm.params["source"].endswith("parent.bin") and lm.tags["team"] == "ui"
    # the verification figure, with the dataset it was measured on and its protocol
    (m,) = [m for m in lm.metrics if m.key == "verify.ppl"]
    assert m.value == 12.5 and (m.dataset_name, m.dataset_digest) == ("eval", info.sha256[:12])
    assert m.run_id == v.run_id
    assert lm.tags["llmops.protocol.verify.ppl"].startswith("verify ppl, 4 chunks x 512")
    # the registration's run lists it under "Logged models" (its outputs)
    run = client.get_run(v.run_id)
    assert [o.model_id for o in run.outputs.model_outputs] == [lm.model_id]
    assert run.inputs.dataset_inputs[0].dataset.digest == m.dataset_digest  # the UI links the two
    found = list(client.search_logged_models([store.experiment_id], filter_string="params.format = 'gguf'"))
    assert [x.model_id for x in found] == [lm.model_id]


def test_a_served_version_uses_its_registrations_logged_model(store_env, tmp_path) -> None:
    from llmops.registry import traces

    store = store_env.store()
    v, _ = _register_evaluated(store, tmp_path)
    lm_id = store.mlflow.get_model_version("lm", v.version).tags[traces.LOGGED_MODEL_TAG]
    assert traces.logged_model_for(store, "lm", v.version) == lm_id
    assert len(_alive(_client(store_env), store)) == 1


@pytest.mark.parametrize("step", ["results", "finalize"])
def test_a_failed_registration_leaves_no_logged_model(store_env, tmp_path, monkeypatch, step) -> None:
    from llmops.registry import results

    store = store_env.store()
    store.open()
    client = store.mlflow

    def boom(*_a, **_k):  # noqa: ANN002, ANN003
        raise RuntimeError("injected failure")

    if step == "results":  # in our transaction, after the LoggedModel and the version exist
        monkeypatch.setattr(results, "record", boom)
    else:  # after our rows are committed
        monkeypatch.setattr(client, "finalize_logged_model", boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        _register_evaluated(store, tmp_path, "failing")
    monkeypatch.undo()
    check = _client(store_env)
    assert check.search_model_versions("name = 'failing'") == []
    assert _alive(check, store) == []
    v, _ = _register_evaluated(store, tmp_path, "failing")  # and without the fault, it lands whole
    assert [m.tags["llmops.version"] for m in _alive(check, store)] == [v.version]


def test_backfill_gives_old_versions_a_logged_model_once(store_env, cli, tmp_path) -> None:
    from llmops.registry.logged_models import VERSION_TAG

    store = store_env.store()
    old, info = _register_evaluated(store, tmp_path, "old")
    new, _ = _register_evaluated(store, tmp_path, "new", b"new" * 1000)
    client = _client(store_env)
    # ``old`` as a store written before LoggedModels left it: no tag, no LoggedModel
    old_lm = client.get_model_version("old", old.version).tags[VERSION_TAG]
    client.delete_model_version_tag("old", old.version, VERSION_TAG)
    client.delete_logged_model(old_lm)
    new_lm = client.get_model_version("new", new.version).tags[VERSION_TAG]

    dry = cli("--json", "models", "backfill", "--dry-run")
    assert dry.code == 0, dry.err
    assert [(r["uri"], r["created"]) for r in dry.json()] == [("models:/new/1", False), ("models:/old/1", True)]
    assert [m.model_id for m in _alive(client, store)] == [new_lm]

    r = cli("--json", "models", "backfill")
    assert r.code == 0, r.err
    rows = {row["uri"]: row for row in r.json()}
    assert rows["models:/new/1"] == {"uri": "models:/new/1", "model_id": new_lm, "created": False, "metrics": 0,
                                     "error": None}
    made = rows["models:/old/1"]
    assert made["created"] and made["metrics"] == 1
    mv = client.get_model_version("old", old.version)
    assert mv.tags[VERSION_TAG] == made["model_id"] != old_lm
    lm = client.get_logged_model(made["model_id"])
    assert lm.params["sha256"] == old.sha256 and lm.source_run_id == old.run_id
    assert json.loads(lm.tags["mlflow.modelVersions"]) == [{"name": "old", "version": old.version}]
    # the recorded result, with its dataset, from the llmops tables
    assert [(m.key, m.value, m.dataset_name, m.dataset_digest) for m in lm.metrics] == [
        ("verify.ppl", 12.5, "eval", info.sha256[:12])]

    again = cli("--json", "models", "backfill")
    assert again.code == 0 and not any(row["created"] for row in again.json())
    assert sorted(m.model_id for m in _alive(client, store)) == sorted([new_lm, made["model_id"]])
    text = cli("models", "backfill")
    assert text.code == 0 and "0 created, 2 already linked" in text.out
