"""GGUF conversion on tiny random models: llama.cpp loads every output and agrees with transformers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmops.benchmarks.runner_llamacpp import LlamaCppRunner
from llmops.app.converting import convert
from llmops.converters.api import parse_target
from llmops.core.checkpoint import open_checkpoint
from llmops.converters.gguf.convert import convert_to_gguf
from llmops.converters.gguf.quantize import llama_model_quantize
from llmops.core.errors import LLMOpsError, UsageError

ARCHS = ["llama", "qwen2", "qwen3", "gemma2", "phi3", "mixtral", "qwen2_moe", "qwen3_moe"]
PROMPT = "The quick brown fox jumps over the lazy dog. Perplexity measures how well a model predicts text."
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

# llama.cpp keys a vocabulary quirk on general.name (taken from the folder name): a name
# containing "phi3" makes it look up "</s>", which the tiny tokenizer does not have.
DIR_NAMES = {"phi3": "tiny-phi-mini"}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            from llmops.app.tiny_models import tiny_model

            base = tmp_path_factory.mktemp("tiny")
            dest = base / DIR_NAMES.get(arch, f"tiny-{arch}")
            made[arch] = _tiny_gemma3(dest) if arch == "gemma3" else tiny_model(arch, dest)
        return made[arch]

    return get


def _tiny_gemma3(dest: Path) -> Path:
    """Gemma 3 text model (not among llmops.app.tiny_models), built the same way."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llmops.app.tiny_models import build_tokenizer

    dest.mkdir(parents=True)
    build_tokenizer(dest)
    cfg = AutoConfig.for_model(
        "gemma3_text", hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rms_norm_eps=1e-5, sliding_window=256,
        query_pre_attn_scalar=64, vocab_size=len(AutoTokenizer.from_pretrained(dest)), bos_token_id=0,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(dest)
    return dest


def _hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _ids(model_dir: Path) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(PROMPT).ids


@pytest.mark.parametrize("arch", [*ARCHS, "gemma3"])
def test_f32_matches_transformers(tiny, tmp_path: Path, arch: str) -> None:
    src = tiny(arch)
    res = convert_to_gguf(open_checkpoint(src), "F32", tmp_path / "m.gguf")
    assert res.path.is_file() and res.one_pass
    ids = _ids(src)
    runner = LlamaCppRunner(str(res.path), n_ctx=128, threads=2, kv_f32=True)
    # llama.cpp's own tokenizer reads the exported vocabulary: same ids as Hugging Face's
    assert runner.tokenize(PROMPT).tolist() == ids
    got = runner.logits(np.asarray(ids))
    want = _hf_logits(src, ids)
    scale = float(np.abs(want).max())
    # Tolerance: float32 throughout (weights and KV cache); differences are accumulation order
    # only, so the largest deviation must stay below 2e-4 of the logit scale (max |logit|).
    assert np.abs(got - want).max() < 2e-4 * scale, (np.abs(got - want).max(), scale)
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_loads_and_runs(tiny, tmp_path: Path, arch: str, quant: str) -> None:
    src = tiny(arch)
    res = convert_to_gguf(open_checkpoint(src), quant, tmp_path)
    assert res.path.parent == tmp_path and res.path.name.endswith(f"-{quant}.gguf")
    # some tensors are in the requested block format (not merely F16/BF16 beside the F32 norms)
    assert {"Q8_0": "Q8_0", "Q4_K_M": "Q4_K"}[quant] in set(res.tensor_types.values()), res.tensor_types
    ids = _ids(src)
    got = LlamaCppRunner(str(res.path), n_ctx=128, threads=2).logits(np.asarray(ids))
    want = _hf_logits(src, ids)
    assert np.isfinite(got).all()
    # random Gaussian weights are the worst case for 4-bit blocks; trained weights do far better.
    # A mixture of experts amplifies rounding: where two experts' router scores are close, the
    # quantized model can pick the other one, so its bound is looser.
    corr = np.corrcoef(got.ravel(), want.ravel())[0, 1]
    moe = arch in ("mixtral", "qwen2_moe", "qwen3_moe")
    assert corr > ((0.995 if moe else 0.999) if quant == "Q8_0" else (0.85 if moe else 0.9)), corr


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_one_pass_equals_f16_then_llama_quantize(tiny, tmp_path: Path, arch: str, quant: str) -> None:
    """One pass gives the tensors of "convert to F16, then llama-quantize", byte for byte."""
    import gguf

    from llmops.converters.gguf.targets import QUANTS

    ckpt = open_checkpoint(tiny(arch))
    ours = convert_to_gguf(ckpt, quant, tmp_path / "ours.gguf")
    assert ours.one_pass
    f16 = convert_to_gguf(ckpt, "F16", tmp_path / "f16.gguf")
    llama_model_quantize(str(f16.path), str(tmp_path / "ref.gguf"), QUANTS[quant].ftype)
    a = {t.name: t for t in gguf.GGUFReader(ours.path).tensors}
    b = {t.name: t for t in gguf.GGUFReader(tmp_path / "ref.gguf").tensors}
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert bytes(a[name].data.tobytes()) == bytes(b[name].data.tobytes()), name


def test_two_pass_fallback_matches_one_pass(tiny, tmp_path: Path) -> None:
    import gguf

    ckpt = open_checkpoint(tiny("llama"))
    one = convert_to_gguf(ckpt, "Q4_K_M", tmp_path / "one.gguf")
    two = convert_to_gguf(ckpt, "Q4_K_M", tmp_path / "two.gguf", force_two_pass=True)
    assert not two.one_pass
    a = {t.name: t.data.tobytes() for t in gguf.GGUFReader(one.path).tensors}
    b = {t.name: t.data.tobytes() for t in gguf.GGUFReader(two.path).tensors}
    assert a == b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.gguf", "two.gguf"]  # F16 temp removed


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_small_chunks_write_the_same_file(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          arch: str) -> None:
    """Tensors streamed a few rows at a time (Q and K in blocks of whole heads, permuted block by
    block) give the bytes of tensors read whole."""
    import llmops.converters.gguf.convert as conv

    ckpt = open_checkpoint(tiny(arch))
    n_head = int(ckpt.config["num_attention_heads"])
    q = next(n for n in ckpt.names() if n.endswith("q_proj.weight"))
    rows, cols = ckpt.info(q).shape
    whole = convert_to_gguf(ckpt, "Q4_K_M", tmp_path / "whole.gguf")
    monkeypatch.setattr(conv, "CHUNK_BYTES", cols * 4 * (rows // n_head))  # one head's rows a chunk
    seen: list[tuple[str, int]] = []
    chunks = conv._tensor_chunks

    def spy(ckpt_, family, src, allow):  # noqa: ANN001, ANN202
        for x in chunks(ckpt_, family, src, allow):
            seen.append((src, x.shape[0] if x.ndim else 0))
            yield x

    monkeypatch.setattr(conv, "_tensor_chunks", spy)
    small = convert_to_gguf(ckpt, "Q4_K_M", tmp_path / "small.gguf")
    assert max(n for src, n in seen if src == q) == rows // n_head  # Q did arrive a head at a time
    assert whole.path.read_bytes() == small.path.read_bytes()


def test_gpt2_is_rejected_without_output(tiny, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LLMOpsError) as e:
        convert(tiny("gpt2"), "gguf-f16", out, verify=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg and "Qwen2ForCausalLM" in msg
    assert list(out.iterdir()) == []


def test_nan_weights_refused(tiny, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "nan-model"
    shutil.copytree(tiny("llama"), src)
    sd = load_file(src / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"][3, 5] = np.nan
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LLMOpsError, match="NaN/Inf") as e:
        convert(src, "gguf-q8_0", out, verify=False)
    assert "down_proj" in str(e.value) and "\n" not in str(e.value)
    assert list(out.iterdir()) == []
    rec = convert(src, "gguf-f32", out, verify=False, allow_nonfinite=True)
    assert rec.output.is_file()


def test_unwritable_output(tiny, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(LLMOpsError, match="cannot write"):
        convert(tiny("llama"), "gguf-f16", blocker / "sub" / "m.gguf", verify=False)


def test_keyboard_interrupt_leaves_nothing(tiny, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    seen: list[str] = []

    def progress(msg: str) -> None:
        seen.append(msg)
        if len(seen) == 6:  # a few tensors into the file
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny("llama"), "gguf-q4", out / "m.gguf", verify=False, progress=progress)
    assert list(out.iterdir()) == []


def test_default_name_and_record(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    monkeypatch.chdir(tmp_path)
    rec = convert(tiny("qwen2"), "gguf-q8", verify=False)
    assert rec.output.parent == tmp_path
    assert re.fullmatch(r"[A-Za-z0-9.\-]+-\d+(\.\d+)?[KMB]-Q8_0\.gguf", rec.output.name), rec.output.name
    assert rec.format == "gguf" and rec.quant == "Q8_0"
    from llmops.core.hashing import sha256_file

    assert rec.size_bytes == rec.output.stat().st_size and rec.sha256 == sha256_file(rec.output)
    assert rec.peak_rss_bytes and rec.peak_rss_bytes > 0 and rec.seconds > 0
    assert 8 < rec.bits_per_weight < 33
    assert rec.parameters["parameter_count"] > 0
    assert {"llmops", "gguf", "llama_cpp", "torch", "transformers"} <= rec.tool_versions.keys()
    assert rec.verification is None


def test_convert_with_verification(tiny, tmp_path: Path) -> None:
    if not WIKITEXT.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"needs the shared wikitext-2 copy at {WIKITEXT}")
        pytest.skip("needs the shared wikitext-2 copy")
    text = WIKITEXT.read_text(encoding="utf-8")[:200_000]
    rec = convert(tiny("llama"), "gguf-q8_0", tmp_path, eval_text=text, threads=2)
    v = rec.verification
    assert v is not None and set(v) == {"kld", "top1_agreement", "ppl_source", "ppl_output"}
    # Q8_0 is lossy: a KL-divergence of exactly 0 means the output was compared with the source itself
    assert 0 < v["kld"] < 0.01 and v["top1_agreement"] > 0.9
    assert v["ppl_output"] != v["ppl_source"]
    assert abs(v["ppl_output"] / v["ppl_source"] - 1) < 0.02


def test_parse_target() -> None:
    assert parse_target("gguf-q4").quant == "Q4_K_M"
    assert parse_target("gguf-q5").quant == "Q5_K_M"
    assert parse_target("gguf-q8").quant == "Q8_0"
    assert parse_target("GGUF-F16").quant == "F16"
    for t in ("gguf-f32", "gguf-bf16", "gguf-q4_0", "gguf-q6_k", "gguf-q4_k_m"):
        assert parse_target(t).format == "gguf"
    with pytest.raises(UsageError) as e:
        parse_target("gguf-q3")
    assert "gguf-q4_k_m" in str(e.value) and "gguf-q8" in str(e.value)


def test_bf16_and_f16_outputs(tiny, tmp_path: Path) -> None:
    import gguf

    ckpt = open_checkpoint(tiny("qwen3"))
    for quant, dtype in (("BF16", "BF16"), ("F16", "F16")):
        res = convert_to_gguf(ckpt, quant, tmp_path / f"{quant}.gguf")
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(res.path).tensors}
        assert types["blk.0.attn_q.weight"] == dtype
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd


def test_sentencepiece_vocab(tiny, tmp_path: Path) -> None:
    """A SentencePiece tokenizer (tokenizer.model) is exported as llama.cpp's "llama" vocabulary."""
    import json

    import sentencepiece as spm

    src = tmp_path / "spm-llama"
    shutil.copytree(tiny("llama"), src)
    (src / "tokenizer.json").unlink()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((PROMPT + " Models are converted, benchmarked and registered. 0123456789\n") * 200)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(src / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        minloglevel=2,
    )
    (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    (src / "config.json").write_text(json.dumps(cfg))

    res = convert_to_gguf(open_checkpoint(src), "F32", tmp_path / "spm.gguf")
    assert res.vocab["model"] == "llama" and res.vocab["add_bos"]
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    runner = LlamaCppRunner(str(res.path), n_ctx=128, threads=2)
    text = "The lazy dog converts 42 models."
    assert runner.tokenize(text).tolist() == [1, *sp.encode(text)]
    assert np.isfinite(runner.logits(runner.tokenize(text))).all()


@pytest.mark.parametrize("quant", ["F16", "Q4_K_M"])
def test_header_scan_equals_gguf_readers(tiny_models, tmp_path: Path, quant: str) -> None:
    """What registration reads of a GGUF (file type, tensor table) equals gguf-py's reader, whose
    slow parse it replaces; a truncated header is a one-line error, not a wrong answer."""
    import gguf

    from llmops.core.artifact_info import describe, scan_gguf
    from llmops.core.errors import LLMOpsError
    from llmops.converters.gguf.convert import convert_to_gguf
    from llmops.core.checkpoint import open_checkpoint

    out = convert_to_gguf(open_checkpoint(tiny_models("llama")), quant, tmp_path / "m.gguf").path
    values, tensors = scan_gguf(out, ("general.file_type", "general.architecture", "llama.block_count"))
    r = gguf.GGUFReader(out)
    assert values["general.architecture"] == "llama" and values["llama.block_count"] == r.fields[
        "llama.block_count"].parts[-1][0]
    assert values["general.file_type"] == r.fields["general.file_type"].parts[-1][0]
    assert tensors == [(t.name, int(t.n_elements), int(t.tensor_type)) for t in r.tensors]
    info = describe(out)
    assert info.quant == quant and info.bits_per_weight == round(
        8 * sum(int(t.n_bytes) for t in r.tensors) / sum(int(t.n_elements) for t in r.tensors), 4)
    for keep in (5000, out.stat().st_size - 1):  # inside the header; the last tensor's data
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(out.read_bytes()[:keep])
        with pytest.raises(LLMOpsError, match="not a readable GGUF file"):
            describe(cut)
