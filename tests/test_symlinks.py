"""Symbolic links in what is registered: the bytes they point to are stored and hashed, and a link
that leads nowhere is refused with nothing left behind. Through the real CLI, on SQLite and
PostgreSQL stores."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest


def _bytes(seed: str, n: int) -> bytes:
    """``n`` reproducible bytes."""
    out = bytearray()
    block = seed.encode()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def _safetensors(n_floats: int, seed: str) -> bytes:
    """A small valid safetensors file (one F32 tensor) with reproducible contents."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + _bytes(seed, 4 * n_floats)


FILES = {  # names whose order differs between path components and plain strings ("a/b" vs "a.txt")
    "config.json": b'{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}',
    "model.safetensors": _safetensors(50_000, "weights"),
    "tokenizer.json": _bytes("tok", 3_000),
    "extra/a.txt": _bytes("a", 10),
    "extra.txt": _bytes("b", 20),
}
# sha256 of FILES as a folder of plain files, as llmops has always hashed it: a registered folder
# whose files are links hashes the same, and folders without links hash as they did.
FILES_SHA256 = "5b22e701b38f89270f428d3c6b1063347f69e82f21c89b912a99ba35f624c010"


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _registered(cli, ref: str) -> dict:  # noqa: ANN001 - the cli fixture
    r = cli("--json", "models", "show", ref)
    assert r.code == 0, r.err
    return r.json()


def _check_stored_folder(cli, store_env, ref: str, expected: dict[str, bytes]) -> None:  # noqa: ANN001
    """``llmops verify`` passes, and the store holds every file as real bytes equal to the target's."""
    r = cli("--json", "verify", ref)
    assert r.code == 0, r.err
    assert r.json()["ok"] is True
    v = _registered(cli, ref)
    stored = Path(v["stored_uri"].removeprefix("file://"))
    assert stored.is_dir() and not stored.is_symlink()
    for rel, data in expected.items():
        assert not (stored / rel).is_symlink(), rel
        assert (stored / rel).read_bytes() == data, rel
    assert v["size_bytes"] == sum(len(d) for d in expected.values())


def test_a_weight_file_linked_from_outside_the_folder_is_registered(cli, store_env, tmp_path) -> None:
    """The folder's ``model.safetensors`` is a link to a file elsewhere: its bytes are registered
    (they were silently left out, a checkpoint without weights that ``verify`` called ok)."""
    ckpt, elsewhere = tmp_path / "ckpt", tmp_path / "weights-elsewhere"
    _write(ckpt, {k: v for k, v in FILES.items() if k != "model.safetensors"})
    _write(elsewhere, {"w.safetensors": FILES["model.safetensors"]})
    (ckpt / "model.safetensors").symlink_to(os.path.relpath(elsewhere / "w.safetensors", ckpt))

    r = cli("--json", "models", "register", ckpt, "--name", "linked")
    assert r.code == 0, r.err
    assert r.json()["sha256"] == FILES_SHA256
    _check_stored_folder(cli, store_env, "models:/linked/1", FILES)


def _hf_cache(root: Path, files: dict[str, bytes], rev: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """A Hugging Face hub cache entry: ``blobs/<sha256>`` and a snapshot of links into them."""
    repo = root / "models--org--tiny"
    snap = repo / "snapshots" / rev
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


def test_a_hugging_face_cache_snapshot_of_links_only(cli, store_env, tmp_path) -> None:
    """Every file of the snapshot is a link into ``../../blobs``: registered as the files, named
    as in the snapshot; through a link to the snapshot folder too (one version: the same bytes)."""
    snap = _hf_cache(tmp_path / "hub", FILES)
    assert all(p.is_symlink() for p in snap.rglob("*") if not p.is_dir())

    r = cli("--json", "models", "register", snap, "--name", "snap")
    assert r.code == 0, r.err
    assert r.json()["sha256"] == FILES_SHA256
    _check_stored_folder(cli, store_env, "models:/snap/1", FILES)

    latest = tmp_path / "latest"
    latest.symlink_to(snap, target_is_directory=True)
    r = cli("--json", "models", "register", latest, "--name", "snap-via-link")
    assert r.code == 0, r.err
    assert r.json()["sha256"] == FILES_SHA256
    _check_stored_folder(cli, store_env, "models:/snap-via-link/1", FILES)


def test_a_source_that_is_a_link_to_a_file(cli, store_env, tmp_path) -> None:
    """``models register LINK`` of a file: stored under the link's name, as real bytes (with
    ``--link``, a hard link to the file itself, never to the symbolic link)."""
    snap = _hf_cache(tmp_path / "hub", {"model.safetensors": FILES["model.safetensors"]})
    link = snap / "model.safetensors"
    for name, extra in (("file-copy", ()), ("file-link", ("--link",))):
        r = cli("--json", "models", "register", link, "--name", name, *extra)
        assert r.code == 0, r.err
        assert r.json()["sha256"] == hashlib.sha256(FILES["model.safetensors"]).hexdigest()
        assert cli("verify", f"models:/{name}/1").code == 0
    stored = Path(_registered(cli, "models:/file-link/1")["stored_uri"].removeprefix("file://"))
    assert stored.name == "model.safetensors" and not stored.is_symlink()
    assert stored.read_bytes() == FILES["model.safetensors"]


@pytest.mark.parametrize("store_env", ["sqlite"], indirect=True)
def test_a_dataset_folder_counts_the_files_of_its_linked_folders(cli, store_env, tmp_path) -> None:
    """A dataset folder whose shards sit in a linked folder: its record count is the files
    registration stores, the linked ones included."""
    shards = tmp_path / "elsewhere" / "shards"
    shards.mkdir(parents=True)
    for i in range(3):
        (shards / f"part-{i}.jsonl").write_text(f'{{"i": {i}}}\n')
    data = tmp_path / "data"
    data.mkdir()
    (data / "README.md").write_text("three shards\n")
    (data / "train").symlink_to(shards, target_is_directory=True)
    r = cli("--json", "datasets", "add", "linked", data)
    assert r.code == 0, r.err
    assert r.json()["format"] == "folder" and r.json()["records"] == 4, r.json()


def _dangling(ckpt: Path) -> Path:
    link = ckpt / "model.safetensors"
    link.symlink_to(ckpt.parent / "deleted.safetensors")
    return link


def _loop(ckpt: Path) -> Path:
    (ckpt / "b.bin").symlink_to("a.bin")
    (ckpt / "a.bin").symlink_to("b.bin")
    return ckpt / "a.bin"


def _folder_cycle(ckpt: Path) -> Path:
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "w.bin").write_bytes(b"w")
    (ckpt / "sub" / "again").symlink_to("..", target_is_directory=True)
    return ckpt / "sub" / "again"


@pytest.mark.parametrize("make", [_dangling, _loop, _folder_cycle], ids=["dangling", "loop", "folder-cycle"])
def test_a_link_that_leads_nowhere_is_refused_leaving_nothing(cli, store_env, tmp_path, make) -> None:  # noqa: ANN001
    ckpt = tmp_path / "ckpt"
    _write(ckpt, {"config.json": FILES["config.json"]})
    bad = make(ckpt)

    r = cli("models", "register", ckpt, "--name", "broken")
    assert r.code != 0
    errors = [line for line in r.err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and str(bad) in errors[0] and "symbolic link" in errors[0], r.err
    assert "Traceback" not in r.err
    artifacts = store_env.store_dir / "artifacts"
    assert not artifacts.exists() or list(artifacts.rglob("*")) == []  # no copy, no staging folder
    listed = cli("--json", "models", "list")
    assert listed.code == 0 and listed.json() == [], listed.out

