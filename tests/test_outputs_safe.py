"""Outputs appear whole or not at all, and inputs from the wild cannot reach outside their folder
or run their own code: atomic commit, failed verification, shard names, remote code, missing weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from llmops.core.errors import LLMOpsError


# -- the atomic-output mechanism -----------------------------------------------------------------


def test_commit_flushes_and_replaces_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmops.core import atomic

    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    with atomic.staged_file(dest) as staged:
        staged.tmp.write_bytes(b"new")
        assert dest.read_bytes() == b"old"  # nothing is visible before the commit
    assert staged.commit() == dest
    assert dest.read_bytes() == b"new"
    assert len(synced) >= 2  # the file, then the folder holding its new name
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_discard_keeps_the_previous_folder(tmp_path: Path) -> None:
    from llmops.core import atomic

    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "a.txt").write_text("previous")
    with atomic.staged_folder(dest) as (staged, work):
        (staged.tmp / "a.txt").write_text("new")
        (work / "scratch.bin").write_bytes(b"x")
    staged.discard()
    assert (dest / "a.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_an_error_while_staged_leaves_nothing(tmp_path: Path) -> None:
    from llmops.core import atomic

    with pytest.raises(KeyboardInterrupt), atomic.staged_folder(tmp_path / "m") as (staged, _):
        (staged.tmp / "half").write_text("x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# -- a failed verification never destroys an earlier output ---------------------------------------


def _failing_verify(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
    raise LLMOpsError("verification failed: injected")


def test_failed_verify_keeps_the_previous_gguf(tiny_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmops.app import converting

    out = tmp_path / "m.gguf"
    first = converting.convert(tiny_models("llama"), "gguf-f32", out, verify=False)
    before = out.read_bytes()
    monkeypatch.setattr(converting, "verify_record", _failing_verify)
    with pytest.raises(LLMOpsError, match="injected"):
        converting.convert(tiny_models("llama"), "gguf-q8_0", out, verify=True, eval_text="unused")
    assert out.read_bytes() == before and first.output == out
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_failed_verify_keeps_the_previous_onnx_folder(tiny_models, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from llmops.app import converting
    from llmops.core.hashing import sha256_path

    out = tmp_path / "onnx"
    converting.convert(tiny_models("llama"), "onnx-int4", out, verify=False, threads=2)
    before = sha256_path(out)
    monkeypatch.setattr(converting, "verify_record", _failing_verify)
    with pytest.raises(LLMOpsError, match="injected"):
        converting.convert(tiny_models("llama"), "onnx-int8", out, verify=True, eval_text="unused", threads=2)
    assert sha256_path(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]


# -- inputs that try to reach outside their folder or run code ------------------------------------


def _sharded_copy(src: Path, dest: Path, shard_name: str) -> Path:
    shutil.copytree(src, dest)
    (dest / "model.safetensors").rename(dest / "model-00001-of-00001.safetensors")
    from llmops.core.tensorfiles import read_safetensors_header

    names = [t.name for t in read_safetensors_header(dest / "model-00001-of-00001.safetensors")]
    index = {"metadata": {}, "weight_map": {n: shard_name for n in names}}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", ".."])
def test_shard_names_outside_the_folder_are_refused(tiny_models, tmp_path: Path, shard: str) -> None:
    from llmops.core.checkpoint import open_checkpoint

    (tmp_path / "outside.safetensors").write_bytes((tiny_models("llama") / "model.safetensors").read_bytes())
    ckpt = _sharded_copy(tiny_models("llama"), tmp_path / "ckpt", shard)
    with pytest.raises(LLMOpsError, match="refusing shard name"):
        open_checkpoint(ckpt)


def test_an_honest_index_still_opens(tiny_models, tmp_path: Path) -> None:
    from llmops.core.checkpoint import open_checkpoint

    ckpt = _sharded_copy(tiny_models("llama"), tmp_path / "ckpt", "model-00001-of-00001.safetensors")
    assert len(open_checkpoint(ckpt)) > 0


def test_onnx_export_never_runs_code_from_auto_map(tiny_models, tmp_path: Path) -> None:
    """A config.json whose auto_map points at Python shipped beside the weights: transformers
    would import it with trust_remote_code; the export must not."""
    from llmops.app.converting import convert

    src = tmp_path / "planted"
    shutil.copytree(tiny_models("llama"), src)
    marker = tmp_path / "code-ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig as EvilConfig\n"
    (src / "evil.py").write_text(code)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    (src / "config.json").write_text(json.dumps(cfg))
    rec = convert(src, "onnx-int4", tmp_path / "out", verify=False, threads=2)
    assert (rec.output / "model.onnx").is_file()
    assert not marker.exists()
    # the option is passed explicitly, whatever the builder's default
    assert rec.parameters["builder_options"].get("hf_remote") is None


def test_remote_code_options_are_refused(tiny_models, tmp_path: Path) -> None:
    from llmops.app.converting import convert

    with pytest.raises(LLMOpsError, match="never runs code"):
        convert(tiny_models("llama"), "onnx-int4", tmp_path / "o", verify=False,
                options={"extra_options": {"hf_remote": True}})
    assert not (tmp_path / "o").exists()


def test_torch_runner_refuses_missing_weights(tiny_models, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    from llmops.benchmarks.runner_torch import load_torch_model

    src = tmp_path / "partial"
    shutil.copytree(tiny_models("llama"), src)
    tensors = load_file(str(src / "model.safetensors"))
    dropped = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    del tensors[dropped]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LLMOpsError, match="lacks 1 weight"):
        load_torch_model(str(src))
    assert load_torch_model(str(tiny_models("llama"))) is not None  # the complete one loads
