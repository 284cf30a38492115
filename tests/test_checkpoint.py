"""The shared checkpoint loader: layouts, validation, and refusing unsafe or broken input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmops.app.converting import convert
from llmops.core.checkpoint import open_checkpoint, validate_config
from llmops.core.errors import LLMOpsError


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmops.app.tiny_models import tiny_model

    return tiny_model("llama", tmp_path_factory.mktemp("ckpt") / "tiny-llama")


@pytest.fixture(scope="module")
def state(tiny_llama: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(tiny_llama / "model.safetensors")


def _copy_meta(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    return dst


def _check_same(ckpt_path: Path, state: dict[str, np.ndarray]) -> None:
    ck = open_checkpoint(ckpt_path)
    assert sorted(ck.names()) == sorted(state)
    for name, want in state.items():
        np.testing.assert_array_equal(ck.float32(name), want)


def test_folder_and_rows(tiny_llama: Path, state: dict[str, np.ndarray]) -> None:
    ck = open_checkpoint(tiny_llama)
    assert ck.kind == "safetensors" and ck.architecture == "LlamaForCausalLM"
    _check_same(tiny_llama, state)
    w = state["model.embed_tokens.weight"]
    np.testing.assert_array_equal(ck.float32("model.embed_tokens.weight", rows=(7, 19)), w[7:19])
    assert ck.parameter_count() == sum(v.size for v in state.values())


def test_sharded_safetensors(tiny_llama: Path, state: dict[str, np.ndarray], tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    d = _copy_meta(tiny_llama, tmp_path / "sharded")
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in parts.items():
        save_file({k: state[k] for k in keys}, d / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _check_same(d, state)
    # a shard named in the index but missing is a clear error
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LLMOpsError, match="missing"):
        open_checkpoint(d)


def test_bfloat16_safetensors(tiny_llama: Path, state: dict[str, np.ndarray], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    d = _copy_meta(tiny_llama, tmp_path / "bf16")
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state.items()}, d / "model.safetensors")
    ck = open_checkpoint(d)
    for k, v in state.items():
        want = torch.from_numpy(v).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(ck.float32(k), want)


def test_bare_files_and_pickles(tiny_llama: Path, state: dict[str, np.ndarray], tmp_path: Path) -> None:
    import torch

    d = _copy_meta(tiny_llama, tmp_path / "bare")
    shutil.copy(tiny_llama / "model.safetensors", d / "weights.safetensors")
    _check_same(d / "weights.safetensors", state)
    sd = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    torch.save(sd, d / "consolidated.pth")
    _check_same(d / "consolidated.pth", state)
    torch.save({"model": sd, "step": 3}, d / "wrapped.pth")
    _check_same(d / "wrapped.pth", state)
    hf = _copy_meta(tiny_llama, tmp_path / "hf-bin")
    torch.save(sd, hf / "pytorch_model.bin")
    ck = open_checkpoint(hf)
    assert ck.kind == "pickle"
    _check_same(hf, state)


def test_pth_converts_like_safetensors(tiny_llama: Path, state: dict[str, np.ndarray], tmp_path: Path) -> None:
    import torch

    d = _copy_meta(tiny_llama, tmp_path / "pth")
    torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, d / "model.pth")
    a = convert(d / "model.pth", "gguf-f16", tmp_path / "a.gguf", verify=False)
    b = convert(tiny_llama, "gguf-f16", tmp_path / "b.gguf", verify=False)
    import gguf

    ta = {t.name: t.data.tobytes() for t in gguf.GGUFReader(a.output).tensors}
    tb = {t.name: t.data.tobytes() for t in gguf.GGUFReader(b.output).tensors}
    assert ta == tb


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_never_runs(tiny_llama: Path, tmp_path: Path) -> None:
    import pickle

    import torch

    d = _copy_meta(tiny_llama, tmp_path / "evil")
    marker = tmp_path / "PWNED"
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "x": _Evil(marker)}, d / "model.pth")
    with pytest.raises(LLMOpsError) as e:
        open_checkpoint(d / "model.pth")
    assert "\n" not in str(e.value) and "refusing" in str(e.value)
    with pytest.raises(LLMOpsError):
        convert(d / "model.pth", "gguf-f16", tmp_path / "out.gguf", verify=False)
    # a legacy (non-zip) pickle too
    with open(d / "legacy.pth", "wb") as f:
        pickle.dump({"w": _Evil(marker)}, f)
    with pytest.raises(LLMOpsError):
        open_checkpoint(d / "legacy.pth")
    assert not marker.exists()
    assert not (tmp_path / "out.gguf").exists()


def test_truncated_safetensors(tiny_llama: Path, tmp_path: Path) -> None:
    d = _copy_meta(tiny_llama, tmp_path / "trunc")
    data = (tiny_llama / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(LLMOpsError, match="truncated") as e:
        open_checkpoint(d)
    assert "\n" not in str(e.value)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LLMOpsError):
        convert(d, "gguf-f16", out, verify=False)
    assert list(out.iterdir()) == []


def test_header_size_beyond_file(tiny_llama: Path, tmp_path: Path) -> None:
    d = _copy_meta(tiny_llama, tmp_path / "hdr")
    data = bytearray((tiny_llama / "model.safetensors").read_bytes())
    data[:8] = (len(data) * 2).to_bytes(8, "little")
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(LLMOpsError, match="header claims"):
        open_checkpoint(d)
    (d / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(LLMOpsError, match="truncated"):
        open_checkpoint(d)


def test_inconsistent_header_entry(tiny_llama: Path, tmp_path: Path) -> None:
    d = _copy_meta(tiny_llama, tmp_path / "bad-entry")
    data = (tiny_llama / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] * 2, *header[name]["shape"][1:]]
    raw = json.dumps(header).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    (d / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(LLMOpsError, match=name.replace(".", r"\.")):
        open_checkpoint(d)


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("hidden_size", None, "'hidden_size' is missing"),
        ("num_hidden_layers", "2", "'num_hidden_layers' must be an integer"),
        ("vocab_size", 0, "'vocab_size' must be positive"),
        ("num_attention_heads", True, "'num_attention_heads' must be an integer"),
    ],
)
def test_config_validation(tiny_llama: Path, tmp_path: Path, field: str, value: object, pattern: str) -> None:
    d = tmp_path / "cfg"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    if value is None:
        del cfg[field]
    else:
        cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LLMOpsError, match=pattern) as e:
        open_checkpoint(d)
    assert "\n" not in str(e.value)


def test_missing_config_and_weights(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMOpsError, match="no weights"):
        open_checkpoint(tmp_path / "empty")
    with pytest.raises(LLMOpsError, match="no such"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(LLMOpsError, match="config.json"):
        validate_config({"hidden_size": 8}, "config.json")
