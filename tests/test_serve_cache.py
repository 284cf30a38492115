"""What a server loads is what was verified: the serve cache behind a real MLflow tracking server
(failed downloads leave nothing, a corrupt entry is fetched again), ``--link``ed files served from
a private copy, and remote registration hashing the bytes it uploads. Real MLflow server, real
llama.cpp on a tiny GGUF."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

LLMOPS = str(Path(sys.executable).with_name("llmops"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Tracking:
    url: str
    store_dir: Path  # the server's store: its database and the artifacts it serves
    db_url: str


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> Iterator[Tracking]:  # noqa: ANN001
    """A shared MLflow tracking server serving artifacts (``llmops ui --serve-artifacts``) on a
    SQLite store; clients reach it by ``MLFLOW_TRACKING_URI`` and keep llmops' rows in the same
    database."""
    from llmops.app.server import stop, wait_until_up

    store_dir = tmp_path_factory.mktemp("tracking") / "server-store"
    env = {k: v for k, v in os.environ.items()
           if k not in ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env["LLMOPS_STORE"] = str(store_dir)
    port = _free_port()
    proc = subprocess.Popen([LLMOPS, "ui", "--serve-artifacts", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc, timeout=300)
        yield Tracking(url, store_dir, f"sqlite:///{store_dir / 'llmops.db'}")
    finally:
        stop(proc, timeout=30)


@pytest.fixture
def client_store(tracking, tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    """A client of the tracking server, with a cache of its own."""
    from llmops.core.settings import resolve
    from llmops.registry.store import Store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.url)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("LLMOPS_DATABASE_URL", tracking.db_url)
    monkeypatch.setenv("LLMOPS_STORE", str(tmp_path / "client-store"))
    monkeypatch.setenv("LLMOPS_CACHE", str(tmp_path / "cache"))
    return Store(resolve()).open()


@pytest.fixture(scope="module")
def gguf(tiny_models, tmp_path_factory) -> Path:  # noqa: ANN001
    from llmops.app.converting import convert

    out = tmp_path_factory.mktemp("serve-cache-models") / "tiny-q8_0.gguf"
    return Path(convert(tiny_models("llama"), "gguf-q8_0", out, verify=False).output)


def _loader(store):  # noqa: ANN001, ANN202
    from llmops.app.serving.deploy import Loader

    return Loader(store, device="cpu", threads=2, n_ctx=256, link_traces=False)


def _serve_dir() -> Path:
    from llmops.core.settings import cache_dir

    return cache_dir() / "serve"


# -- the serve cache behind a tracking server ----------------------------------------------------
def test_a_failed_download_leaves_nothing_and_waits_before_the_next_try(client_store, tracking, gguf, tmp_path) -> None:
    from llmops.app.serving.deploy import AliasWatcher, Router
    from llmops.registry.registration import register

    name = "cache-fail"
    assert register(client_store, gguf, name, fmt="gguf").version == "1"
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(os.urandom(4096))
    assert register(client_store, v2, name, fmt="gguf").version == "2"
    # version 2's bytes vanish from the server: its download fails
    (stored,) = [p for p in tracking.store_dir.joinpath("artifacts").rglob("v2.gguf")]
    stored.unlink()

    loader = _loader(client_store)
    router = Router(loader.deploy(name, "1", "prod"))
    try:
        client_store.mlflow.set_registered_model_alias(name, "prod", "2")
        logs: list[str] = []
        watcher = AliasWatcher(client_store, name, "prod", router, loader, poll_s=3600.0, log=logs.append)
        watcher.check()
        assert router.current.version == "1"
        failures = [m for m in logs if "not switching" in m]
        assert len(failures) == 1 and "next try in" in failures[0], logs
        assert list(_serve_dir().glob(".download-*")) == []  # the failed download left nothing
        assert not (_serve_dir() / _sha(v2.read_bytes())).exists()
        watcher.check()  # the next poll, at once: no second download
        assert len([m for m in logs if "not switching" in m]) == 1, logs
        assert list(_serve_dir().glob(".download-*")) == []
    finally:
        router.close()


def test_a_corrupt_cache_entry_is_fetched_again(client_store, gguf) -> None:
    from llmops.registry.registration import register

    name = "cache-corrupt"
    version = register(client_store, gguf, name, fmt="gguf").version
    loader = _loader(client_store)
    first = loader.deploy(name, version, None)
    first.close()
    entry = _serve_dir() / _sha(gguf.read_bytes()) / gguf.name
    assert first.path == entry and entry.read_bytes() == gguf.read_bytes()

    os.chmod(entry, 0o644)
    with open(entry, "r+b") as f:  # a byte of the cached copy goes bad
        f.seek(os.path.getsize(entry) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert entry.read_bytes() != gguf.read_bytes()

    again = loader.deploy(name, version, None)  # downloads it again, checks it, serves it
    try:
        assert again.path == entry and entry.read_bytes() == gguf.read_bytes()
        assert list(_serve_dir().glob(".download-*")) == []
        assert list(_serve_dir().glob(".removing-*")) == []
    finally:
        again.close()


# -- remote registration hashes what it uploads -------------------------------------------------------
def test_remote_registration_records_the_hash_of_the_uploaded_bytes(client_store, tracking, tmp_path) -> None:
    from mlflow import MlflowClient

    from llmops.core.errors import LLMOpsError
    from llmops.registry.registration import register
    from llmops.registry.versions import verify

    f = tmp_path / "weights.bin"
    before = os.urandom(1 << 20)
    f.write_bytes(before)
    claimed = _sha(before)  # what a converter hashed
    with open(f, "r+b") as fh:  # then the file changed in place, before it was registered
        fh.seek(1000)
        fh.write(b"\0changed\0")
    after = f.read_bytes()

    with pytest.raises(LLMOpsError, match="changed after they were hashed"):
        register(client_store, f, "remote-claimed", fmt="bin", sha256=claimed)
    mc = MlflowClient(tracking_uri=tracking.url, registry_uri=tracking.url)
    assert mc.search_model_versions("name='remote-claimed'") == []
    uploaded = [p for p in tracking.store_dir.joinpath("artifacts").rglob("*") if p.is_file()]
    assert not [p for p in uploaded if p.read_bytes() in (before, after)]  # nothing left on the server

    v = register(client_store, f, "remote-claimed", fmt="bin", sha256=_sha(after))
    assert v.sha256 == _sha(after)
    assert verify(client_store, v.uri)["ok"]


def test_remote_registration_of_a_folder_of_links(client_store, tracking, tmp_path) -> None:
    """A Hugging Face cache snapshot (links only) through the server: the links' targets go up,
    and the version verifies from the downloaded bytes."""
    from llmops.registry.registration import register
    from llmops.registry.versions import verify

    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    files = {"config.json": b'{"model_type": "llama"}', "sub/w.bin": os.urandom(50_000)}
    for rel, data in files.items():
        blob = blobs / _sha(data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).symlink_to(os.path.relpath(blob, (snap / rel).parent))
    v = register(client_store, snap, "remote-snapshot", fmt="folder")
    assert verify(client_store, v.uri)["ok"]
    (root,) = [p.parent for p in tracking.store_dir.joinpath("artifacts").rglob("config.json")]
    assert {rel: (root / rel).read_bytes() for rel in files} == files  # real bytes on the server


def test_an_artifact_store_without_http_gets_a_hashed_private_copy(tmp_path, monkeypatch) -> None:
    """Where MLflow's client writes the artifact store itself (not through the server's HTTP
    API), what it uploads is a private copy hashed as it was written: the hash returned is the
    folder's, links followed, and the store holds the bytes."""
    from llmops.core.hashing import sha256_path
    from llmops.registry.upload import upload_hashing

    monkeypatch.setenv("LLMOPS_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.bin").write_bytes(os.urandom(10_000))
    (tmp_path / "outside.bin").write_bytes(os.urandom(20_000))
    (src / "w.bin").symlink_to(tmp_path / "outside.bin")
    repo = tmp_path / "artifact-store"
    assert upload_hashing(repo.as_uri(), None, src, "model") == sha256_path(src)
    assert (repo / "model" / "w.bin").read_bytes() == (tmp_path / "outside.bin").read_bytes()
    assert not (repo / "model" / "w.bin").is_symlink()
    assert sha256_path(repo / "model") == sha256_path(src)
    assert list((tmp_path / "cache").rglob("*.bin")) == []  # the private copies are gone


# -- --link: an in-place edit of the owner's file does not reach the server ----------------------------
def test_an_in_place_edit_of_a_linked_file_is_not_loaded(cli, store_env, gguf, tmp_path, monkeypatch) -> None:
    from llmops.app.serving.deploy import Deployment
    from llmops.app.serving.engines import open_engine
    from llmops.core.hashing import sha256_path

    monkeypatch.setenv("LLMOPS_CACHE", str(tmp_path / "cache"))
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(gguf.read_bytes())
    r = cli("--json", "models", "register", mine, "--name", "linked", "--link")
    assert r.code == 0, r.err
    sha = r.json()["sha256"]
    if os.stat(mine).st_nlink < 2:
        pytest.skip("no hard link was made on this filesystem")

    loader = _loader(store_env.store())
    fetched = loader.fetch("linked", "1")  # checked against the registry
    with open(mine, "r+b") as f:  # the owner edits the linked file in place, before the load
        f.seek(os.path.getsize(mine) - 64)
        f.write(b"\xff" * 64)
    assert cli("verify", "models:/linked/1").code != 0  # the store shares the edited file

    engine = open_engine(fetched.path, fetched.fmt, n_ctx=256, threads=2, device="cpu")
    d = Deployment("linked", "1", None, engine, sha256=sha, fmt=fetched.fmt, path=fetched.path)
    try:
        d.probe()
        assert sha256_path(fetched.path) == sha  # what was loaded is what was verified
        assert os.stat(fetched.path).st_ino != os.stat(mine).st_ino
    finally:
        d.close()
    # the next load is checked again, and served from the verified copy
    again = loader.deploy("linked", "1", None)
    try:
        assert again.path == fetched.path and sha256_path(again.path) == sha
    finally:
        again.close()

