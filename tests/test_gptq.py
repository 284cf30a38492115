"""GPTQ conversion and the GPTQ runner, on tiny random models (real GPTQModel, seconds each) and SmolLM2 (slow)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmops.core.errors import LLMOpsError

# Scale of the per-group quantization step, as stored in the output's ``scales``.
# RTN rounds each weight to the nearest step: |w - dq| <= scale / 2 (the scale is
# stored in fp16, hence the small slack). GPTQ rounds weights *after* adding the
# error feedback of the columns quantized before them, so a single weight may move
# by more than half a step (about 2.5 steps at most on these models), while the
# average error stays near RTN's (a quarter of a step).
RTN_MAX_STEPS = 0.5 + 0.01
GPTQ_MAX_STEPS = 4.0
GPTQ_MEAN_STEPS = 0.4


def _corpus_file(dest: Path) -> Path:
    """Calibration text the tiny tokenizers were trained on (independent of the eval text)."""
    from llmops.app.tiny_models import _CORPUS

    dest.write_text(_CORPUS * 40, encoding="utf-8")
    return dest


def _opts(calib: Path, **extra: Any) -> dict[str, Any]:
    return {"calibration_file": str(calib), "calibration_samples": 8, "calibration_tokens": 64, **extra}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".work", ".old")))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gptq")


@pytest.fixture(scope="module")
def calib(work: Path) -> Path:
    return _corpus_file(work / "calibration.txt")


@pytest.fixture(scope="module")
def converted(work: Path, calib: Path, tiny_models: Callable[[str], Path]) -> Callable[..., Any]:
    """Each (arch, target, method) converted once per module (each conversion starts a quantization
    child interpreter, the main cost of these tests); ``eval_text`` also runs api.convert's verification."""
    from llmops.app.converting import convert

    done: dict[tuple[str, str, str], Any] = {}

    def get(arch: str, target: str = "gptq-4bit", method: str = "gptq", eval_text: str | None = None) -> Any:
        key = (arch, target, method)
        if key not in done:
            lines: list[str] = []
            out = work / f"{arch}-{target}-{method}"
            rec = convert(tiny_models(arch), target, out, verify=eval_text is not None, eval_text=eval_text,
                          options=_opts(calib, method=method), progress=lines.append)
            done[key] = (rec, lines)
        return done[key]

    return get


@pytest.fixture(scope="module")
def llama_8bit_verified(converted: Callable[..., Any], eval_text_path: Path) -> Any:
    # evaluation needs 2 x 512 tokens of the part it scores; 20k characters give the tiny tokenizer ~5k
    text = eval_text_path.read_text(encoding="utf-8")[:20000]
    return converted("llama", "gptq-8bit", eval_text=text)


# -- targets ---------------------------------------------------------------------------------------


def test_targets_parse() -> None:
    from llmops.converters.api import parse_target, valid_targets

    spec = parse_target("gptq-4bit")
    assert (spec.format, spec.quant, spec.options["bits"]) == ("gptq", "4bit", 4)
    spec = parse_target("GPTQ-8bit")
    assert (spec.format, spec.quant, spec.options["bits"]) == ("gptq", "8bit", 8)
    assert {"gptq-4bit", "gptq-8bit"} <= set(valid_targets())


def test_group_size_choice() -> None:
    from llmops.converters.gptq.plan import choose_group_size
    from llmops.core.errors import UsageError

    said: list[str] = []
    assert choose_group_size(None, {"q": 256, "down": 512}, said.append) == 128
    assert said == []
    # SmolLM2: 576-wide attention/MLP inputs, 1536-wide down_proj
    assert choose_group_size(128, {"q_proj": 576, "down_proj": 1536}, said.append) == 64
    assert "using 64" in said[-1] and "576" in said[-1]
    assert choose_group_size(-1, {"q_proj": 576}, said.append) == -1
    with pytest.raises(LLMOpsError, match="no GPTQ group size"):
        choose_group_size(128, {"q": 80}, said.append)
    with pytest.raises(UsageError):
        choose_group_size(100, {"q": 256}, said.append)


# -- calibration -----------------------------------------------------------------------------------


def test_default_calibration_is_eval_text_tail(eval_text_path: Path, tiny_models: Callable[[str], Path]) -> None:
    from transformers import AutoTokenizer

    from llmops.converters.gptq.calibration import build_calibration
    from llmops.core.evaltext import calibration_split, load_eval_text
    from llmops.core.hashing import sha256_file

    tok = AutoTokenizer.from_pretrained(tiny_models("llama"))
    cal = build_calibration(tok, {"eval_text_file": str(eval_text_path), "calibration_samples": 4,
                                  "calibration_tokens": 32}, lambda _m: None)
    text = load_eval_text(eval_text_path).text
    rec = cal.record()
    assert rec["source"] == "eval-text tail"
    assert rec["char_offset"] == calibration_split(text) > 0
    assert rec["char_offset"] < rec["char_end"] <= len(text)
    assert rec["sha256"] == sha256_file(eval_text_path)
    assert (rec["samples"], rec["tokens_per_sample"]) == (4, 32)
    # exactly the recorded characters produce the calibration tokens
    ids = tok(text[rec["char_offset"]:rec["char_end"]], add_special_tokens=False)["input_ids"]
    assert [t for s in cal.samples for t in s] == ids[:4 * 32]


def test_short_calibration_text_uses_fewer_samples(tmp_path: Path, tiny_models: Callable[[str], Path]) -> None:
    from transformers import AutoTokenizer

    from llmops.converters.gptq.calibration import build_calibration

    tok = AutoTokenizer.from_pretrained(tiny_models("llama"))
    f = tmp_path / "short.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    said: list[str] = []
    cal = build_calibration(tok, {"calibration_file": str(f), "calibration_samples": 1000, "calibration_tokens": 32},
                            said.append)
    assert 0 < len(cal.samples) < 1000 and "instead of 1000" in said[-1]
    with pytest.raises(LLMOpsError, match="only"):
        build_calibration(tok, {"calibration_file": str(f), "calibration_tokens": 100_000}, said.append)


# -- conversion ------------------------------------------------------------------------------------


def test_4bit_record_and_layout(converted: Callable[..., Any], calib: Path,
                                tiny_models: Callable[[str], Path]) -> None:
    from safetensors import safe_open

    from llmops.core.artifact_info import describe
    from llmops.core.hashing import sha256_file, sha256_path, size_of

    rec, lines = converted("qwen3")
    out = rec.output
    assert (rec.format, rec.quant) == ("gptq", "4bit")
    assert rec.sha256 == sha256_path(out) and rec.size_bytes == size_of(out)
    p = rec.parameters
    # the quantized layers: 4 bits + fp16 scale and 4-bit zero per 128 weights + an int32 g_idx per input row
    assert 4.15 < p["quantized_bits_per_weight"] < 4.4
    # bits per weight, the one definition for every format: every stored tensor over the source's parameters
    from safetensors.numpy import load_file

    from llmops.core.checkpoint import open_checkpoint

    stored = sum(a.nbytes for f in out.glob("*.safetensors") for a in load_file(str(f)).values())
    params = open_checkpoint(tiny_models("qwen3")).parameter_count()
    assert rec.bits_per_weight == round(stored * 8 / params, 4)
    assert rec.bits_per_weight > p["quantized_bits_per_weight"]  # fp16 embeddings and norms count too
    assert (p["bits"], p["group_size"], p["requested_group_size"], p["act_order"], p["sym"]) == (4, 128, 128,
                                                                                                  False, False)
    assert p["architecture"] == "Qwen3ForCausalLM" and p["damp"] > 0 and p["quantized_modules"] == 14
    # the default recipe: scale search in the 2.4-norm, and the sensitivity pass, which finds no
    # outlier among two layers of random weights (every module quantized, so both rates agree)
    assert p["mse"] == 2.4 and p["keep_outliers"] is True and p["float16_modules"] == []
    assert p["linear_bits_per_weight"] == p["quantized_bits_per_weight"]
    end = p["calibration"]["char_end"]
    assert p["calibration"] == {"path": str(calib.resolve()), "sha256": sha256_file(calib), "char_offset": 0,
                                "char_end": end, "samples": 8, "tokens_per_sample": 64, "source": "file"}
    # char_end is where the 8 x 64 calibration tokens end: exactly those characters give the first 512
    # tokens of the whole file, and one character fewer gives a different (shorter or changed) sequence
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models("qwen3"))
    text = calib.read_text(encoding="utf-8")
    first = tok(text, add_special_tokens=False)["input_ids"][:8 * 64]
    assert len(first) == 8 * 64 and 0 < end < len(text)
    assert tok(text[:end], add_special_tokens=False)["input_ids"] == first
    assert tok(text[:end - 1], add_special_tokens=False)["input_ids"] != first
    assert {"gptqmodel", "optimum", "torch", "transformers"} <= set(rec.tool_versions)
    assert rec.tool_versions["gptqmodel"].startswith("7.6")
    # one progress line per decoder layer
    assert sum(ln.startswith("layer ") for ln in lines) == 2
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"], qc["bits"], qc["group_size"]) == ("gptq", "gptq", 4, 128)
    assert "offload_to_disk_path" not in json.dumps(qc)
    assert describe(out).format == "gptq"
    assert cfg["dtype"] == "float16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        dtypes = {str(f.get_slice(k).get_dtype()) for k in keys}
    assert dtypes == {"F16", "I32"}  # float16 scales/embeddings/norms, int32 packed weights and g_idx
    for layer in range(2):
        for mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            for leaf in ("qweight", "qzeros", "scales", "g_idx"):
                assert f"model.layers.{layer}.{mod}.{leaf}" in keys
    src = tiny_models("qwen3")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert _leftovers(out.parent) == []


def _max_and_mean_steps(src: Path, out: Path) -> tuple[float, float, float]:
    """|w - dequantized w| in units of each weight's own quantization step (its group's scale): the largest,
    the mean; and the mean absolute error."""
    import torch
    from safetensors.torch import load_file

    from llmops.benchmarks.runner_gptq import dequantized_state_dict

    source, packed, dq = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors")), \
        dequantized_state_dict(out)
    worst, means, abs_means = 0.0, [], []
    for key in packed:
        if not key.endswith(".scales"):
            continue
        prefix = key.removesuffix(".scales")
        step = packed[key].float()[packed[prefix + ".g_idx"].long()].t()  # [out, in]
        diff = (source[prefix + ".weight"].float() - dq[prefix + ".weight"]).abs()
        err = diff / step
        assert torch.isfinite(err).all()
        worst = max(worst, float(err.max()))
        means.append(float(err.mean()))
        abs_means.append(float(diff.mean()))
    assert means
    return worst, float(np.mean(means)), float(np.mean(abs_means))


def test_gptq_weights_within_quantization_step(converted: Callable[..., Any],
                                               tiny_models: Callable[[str], Path]) -> None:
    rec, _ = converted("qwen3")
    worst, mean, _ = _max_and_mean_steps(tiny_models("qwen3"), rec.output)
    assert worst <= GPTQ_MAX_STEPS
    assert 0.15 < mean <= GPTQ_MEAN_STEPS


@pytest.mark.slow
def test_rtn_weights_within_half_a_step(converted: Callable[..., Any], tiny_models: Callable[[str], Path]) -> None:
    """Round-to-nearest into the same format: the strict bound checks packing and dequantization exactly."""
    rec, _ = converted("llama", "gptq-4bit", "rtn")
    assert rec.parameters["method"] == "rtn" and rec.parameters["calibration"] is None
    worst, mean, _ = _max_and_mean_steps(tiny_models("llama"), rec.output)
    assert worst <= RTN_MAX_STEPS
    assert 0.2 < mean < 0.3  # uniform rounding error averages a quarter of a step


def test_8bit(llama_8bit_verified: Any, tiny_models: Callable[[str], Path]) -> None:
    rec, _ = llama_8bit_verified
    assert (rec.quant, rec.parameters["bits"]) == ("8bit", 8)
    assert 8.15 < rec.parameters["quantized_bits_per_weight"] < 8.5
    assert rec.bits_per_weight > rec.parameters["quantized_bits_per_weight"]  # embeddings and norms count too
    worst, mean, abs8 = _max_and_mean_steps(tiny_models("llama"), rec.output)
    assert worst <= GPTQ_MAX_STEPS and mean <= GPTQ_MEAN_STEPS
    # 255 levels instead of 15: the error is about 17 times finer than 4-bit's (~15% of the mean |w|)
    from safetensors.torch import load_file

    w = load_file(str(tiny_models("llama") / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    assert abs8 < 0.02 * float(w.abs().mean())


def test_transformers_loads_output_and_agrees_with_runner(converted: Callable[..., Any]) -> None:
    """transformers' own GPTQ integration (GPTQModel's CPU kernel) vs the runner's dequantized float32 model.

    The kernel dequantizes to fp16 and multiplies in fp16 whatever ``dtype`` says, so the two agree to fp16
    precision (about 1% of the logit range after two layers), not bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmops.benchmarks.runner_gptq import GPTQRunner

    rec, _ = converted("qwen3")
    hf = AutoModelForCausalLM.from_pretrained(rec.output, device_map="cpu", dtype=torch.float32).eval()
    runner = GPTQRunner(str(rec.output), n_ctx=64)
    tokens = runner.tokenize("The quick brown fox jumps over the lazy dog. Perplexity measures how well")
    assert runner.vocab_size == hf.config.vocab_size
    with torch.inference_mode():
        ref = hf(input_ids=torch.from_numpy(tokens.astype(np.int64))[None]).logits[0].float().numpy()
    got = runner.logits(tokens)
    assert got.shape == ref.shape == (len(tokens), runner.vocab_size) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def _one_layer_llama(folder: Path, **shape: int) -> tuple[Any, Any]:
    """(config, model) of a seeded one-layer Llama of the given widths, its tokenizer written to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmops.app.tiny_models import build_tokenizer

    folder.mkdir()
    build_tokenizer(folder)
    config = LlamaConfig(num_hidden_layers=1, vocab_size=512, max_position_embeddings=256, **shape)
    torch.manual_seed(0)
    return config, LlamaForCausalLM(config)


def test_group_size_fallback_and_pickle_source(tmp_path: Path, calib: Path) -> None:
    """A 192-wide model (192 % 128 != 0) from a weights-only .pth: group size 64 is chosen and recorded."""
    import torch

    from llmops.app.converting import convert

    src = tmp_path / "narrow"
    config, model = _one_layer_llama(src, hidden_size=192, intermediate_size=384, num_attention_heads=3,
                                     num_key_value_heads=1, head_dim=64)
    config.save_pretrained(src)
    torch.save(model.state_dict(), src / "model.pth")
    lines: list[str] = []
    rec = convert(src, "gptq-4bit", tmp_path / "out", verify=False, options=_opts(calib), progress=lines.append)
    assert rec.parameters["group_size"] == 64 and rec.parameters["requested_group_size"] == 128
    assert any("using 64" in ln for ln in lines)
    assert json.loads((rec.output / "config.json").read_text())["quantization_config"]["group_size"] == 64
    assert _leftovers(tmp_path) == []


def test_no_valid_group_size_fails_before_writing(tmp_path: Path, calib: Path) -> None:
    from llmops.app.converting import convert

    src = tmp_path / "odd"
    _, model = _one_layer_llama(src, hidden_size=80, intermediate_size=160, num_attention_heads=5,
                                num_key_value_heads=5, head_dim=16)
    model.save_pretrained(src)
    with pytest.raises(LLMOpsError, match="no GPTQ group size") as exc:
        convert(src, "gptq-4bit", tmp_path / "out", verify=False, options=_opts(calib))
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_verification(llama_8bit_verified: Any) -> None:
    """api.convert's generic verification picks the GPTQ runner from the folder's config and compares with
    the source: 8-bit on a random model gives KL-divergence < 0.01 nats and top-1 agreement > 0.9."""
    rec, lines = llama_8bit_verified
    v = rec.verification
    assert v is not None and rec.parameters["verification"]["chunks"] == 4
    assert any("with gptq" in ln for ln in lines)
    # 8-bit is still lossy: a KL-divergence of exactly 0 means the output was compared with the source itself
    assert 0 < v["kld"] < 0.01 and v["top1_agreement"] > 0.9
    assert v["ppl_output"] != v["ppl_source"]
    assert abs(np.log(v["ppl_output"] / v["ppl_source"])) < 0.05


# -- failures --------------------------------------------------------------------------------------


def test_unsupported_architecture(tmp_path: Path, calib: Path, tiny_models: Callable[[str], Path]) -> None:
    from llmops.app.converting import convert

    src = tmp_path / "foo"
    shutil.copytree(tiny_models("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="foo", architectures=["FooForCausalLM"])
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LLMOpsError, match="FooForCausalLM.*not supported") as exc:
        convert(src, "gptq-4bit", tmp_path / "out", verify=False, options=_opts(calib))
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_interrupt_during_quantization_leaves_nothing(tmp_path: Path, calib: Path, monkeypatch: pytest.MonkeyPatch,
                                                      tiny_models: Callable[[str], Path]) -> None:
    from llmops.app.converting import convert

    monkeypatch.chdir(tmp_path)

    def progress(msg: str) -> None:
        if msg.startswith("layer 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny_models("llama"), "gptq-4bit", None, verify=False, options=_opts(calib), progress=progress)
    # nothing beside the destination, and none of GPTQModel's ./logs in the working folder
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_output_naming(tmp_path: Path, converted: Callable[..., Any]) -> None:
    from llmops.converters.gptq.convert import default_output_name, resolve_destination

    name = default_output_name("smol", 4, 64)
    assert name == "smol-GPTQ-4bit-g64" and default_output_name("m", 8, -1) == "m-GPTQ-8bit-gchannel"
    assert resolve_destination(tmp_path / "new", name) == tmp_path / "new"
    (tmp_path / "plain").mkdir()
    assert resolve_destination(tmp_path / "plain", name) == tmp_path / "plain" / name
    rec, _ = converted("qwen3")
    assert resolve_destination(rec.output, name) == rec.output  # a previous GPTQ output is replaced
    (tmp_path / "f").write_text("x")
    with pytest.raises(LLMOpsError, match="is a file"):
        resolve_destination(tmp_path / "f", name)


# -- modules kept in float16 -------------------------------------------------------------------------


def _scores(values: dict[str, float], params: int = 100) -> list[Any]:
    from llmops.converters.gptq.sensitivity import ModuleScore

    return [ModuleScore(n, v, params) for n, v in values.items()]


def test_outliers_are_picked_against_their_own_kind() -> None:
    from llmops.converters.gptq.sensitivity import pick_outliers

    down = {f"model.layers.{i}.mlp.down_proj": 1.0 for i in range(10)}
    down["model.layers.7.mlp.down_proj"] = 60.0
    down["model.layers.3.mlp.down_proj"] = 40.0  # 40x its kind's median: below the factor of 50
    # a kind whose every module scores high is no outlier: each is compared with its own kind
    q = {f"model.layers.{i}.self_attn.q_proj": 1000.0 for i in range(10)}
    picked = pick_outliers(_scores({**down, **q}), factor=50, max_fraction=0.5)
    assert [s.name for s in picked] == ["model.layers.7.mlp.down_proj"]
    # the weight budget caps what is kept, the worst first
    many = {f"model.layers.{i}.mlp.down_proj": 1.0 for i in range(20)}
    many.update({f"model.layers.{i}.mlp.down_proj": 100.0 * (i + 1) for i in range(3)})
    assert [s.name for s in pick_outliers(_scores(many), factor=50, max_fraction=2 / 20)] == [
        "model.layers.2.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    # fewer than three layers: no median to stand out from
    assert pick_outliers(_scores({"model.layers.0.mlp.down_proj": 1.0, "model.layers.1.mlp.down_proj": 1e6})) == []


def test_skip_entries_match_only_their_module() -> None:
    import re

    from llmops.converters.gptq.sensitivity import dynamic_skips, modules_in_block_to_quantize

    (pattern,) = dynamic_skips(["model.layers.1.mlp.down_proj"])
    assert pattern.startswith("-:")
    rx = re.compile(pattern[2:])  # GPTQModel matches from the start of the module name
    assert rx.match("model.layers.1.mlp.down_proj") and rx.match("layers.1.mlp.down_proj")
    assert not rx.match("model.layers.11.mlp.down_proj") and not rx.match("model.layers.1.mlp.up_proj")
    groups = modules_in_block_to_quantize(["self_attn.q_proj", "mlp.down_proj"], 12, "layers",
                                          ["model.layers.1.mlp.down_proj"])
    assert groups[0] == ["self_attn.q_proj"]
    assert "layers.1.mlp.down_proj" not in groups[1] and len(groups[1]) == 11
    # optimum quantizes a module whose name ends with an entry: layer 11 is not mistaken for layer 1
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(12)]
    quantized = [n for n in names if any(n.endswith(e) for e in groups[1])]
    assert quantized == [n for n in names if n != "model.layers.1.mlp.down_proj"]


def test_rounding_error_is_zero_on_the_grid_and_weighted_by_activations() -> None:
    import torch

    from llmops.converters.gptq.sensitivity import rounding_error

    on_grid = torch.arange(16.0).repeat(2)[None].repeat(4, 1)  # asymmetric 4-bit: step 1, zero 0
    assert rounding_error(on_grid, torch.ones(32), 4, 32, sym=False) < 1e-20
    assert rounding_error(on_grid + 0.5, torch.ones(32), 4, 32, sym=False) > 0
    w = torch.randn(8, 64)
    e = torch.zeros(64)
    assert rounding_error(w, e, 4, 32, sym=True) == 0.0  # no activation reaches the columns: no output error
    e[:32] = 1.0
    first = rounding_error(w, e, 4, 32, sym=True)
    e[:32] = 4.0
    assert abs(rounding_error(w, e, 4, 32, sym=True) - 4 * first) < 1e-9 * first
    assert rounding_error(w, torch.ones(64), 8, 32, sym=True) < rounding_error(w, torch.ones(64), 4, 32, sym=True) / 100


def test_outlier_module_stays_float16_and_transformers_loads_it(tmp_path: Path, calib: Path) -> None:
    """A six-layer Llama whose layer-1 down_proj weights are 30x the others': the sensitivity pass
    keeps that module unquantized, GPTQModel leaves it so, and transformers loads the folder with a
    plain linear layer there and GPTQ kernels everywhere else, agreeing with the runner."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from llmops.app.converting import convert
    from llmops.app.tiny_models import tiny_model
    from llmops.benchmarks.runner_gptq import GPTQRunner

    src = tiny_model("llama", tmp_path / "outlier", overrides={"num_hidden_layers": 6})
    weights = load_file(str(src / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    weights[name + ".weight"] = weights[name + ".weight"] * 30
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})

    rec = convert(src, "gptq-4bit", tmp_path / "out", verify=False, options=_opts(calib))
    p = rec.parameters
    assert p["keep_outliers"] is True and p["float16_modules"] == [name]
    assert p["quantized_modules"] == 6 * 7 - 1
    assert p["linear_bits_per_weight"] > p["quantized_bits_per_weight"]
    out = load_file(str(rec.output / "model.safetensors"))
    assert name + ".qweight" not in out
    assert torch.equal(out[name + ".weight"], weights[name + ".weight"].to(torch.float16))
    qc = json.loads((rec.output / "config.json").read_text())["quantization_config"]
    assert not any(e.endswith("layers.1.mlp.down_proj") for g in qc["modules_in_block_to_quantize"] for e in g)
    assert any(k.startswith("-:") for k in qc["dynamic"])

    hf = AutoModelForCausalLM.from_pretrained(rec.output, device_map="cpu", dtype=torch.float32).eval()
    mods = dict(hf.named_modules())
    assert type(mods[name]) is torch.nn.Linear
    assert type(mods["model.layers.1.mlp.up_proj"]) is not torch.nn.Linear  # a GPTQ kernel
    runner = GPTQRunner(str(rec.output), n_ctx=64)
    tokens = runner.tokenize("The quick brown fox jumps over the lazy dog. Perplexity measures how well")
    with torch.inference_mode():
        ref = hf(input_ids=torch.from_numpy(tokens.astype(np.int64))[None]).logits[0].float().numpy()
    got = runner.logits(tokens)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()

    # off: every module quantized
    off = convert(src, "gptq-4bit", tmp_path / "off", verify=False, options=_opts(calib, keep_outliers=False))
    assert off.parameters["float16_modules"] == [] and off.parameters["quantized_modules"] == 6 * 7
    assert off.parameters["keep_outliers"] is False


# -- SmolLM2 ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gptq_beats_rtn(tmp_path: Path, eval_text_path: Path) -> None:
    """GPTQ 4-bit has lower wikitext-2 perplexity (16 chunks of 512) than round-to-nearest 4-bit written in the
    same format with the same group size (64: SmolLM2's 576-wide layers rule out 128)."""
    from llmops.benchmarks.accuracy import evaluate
    from llmops.app.converting import convert
    from llmops.app.fixtures import smollm2_checkpoint

    src = smollm2_checkpoint()
    text = eval_text_path.read_text(encoding="utf-8")
    common = {"eval_text_file": str(eval_text_path)}
    gptq = convert(src, "gptq-4bit", tmp_path / "gptq", verify=False, options=common)
    rtn = convert(src, "gptq-4bit", tmp_path / "rtn", verify=False, options={**common, "method": "rtn"})
    assert gptq.parameters["group_size"] == rtn.parameters["group_size"] == 64
    ppl_gptq = evaluate(gptq.output, text, chunks=16)["ppl_output"]
    ppl_rtn = evaluate(rtn.output, text, chunks=16)["ppl_output"]
    print(f"SmolLM2 4-bit g64 wikitext-2 PPL (16 chunks): GPTQ {ppl_gptq:.3f}, RTN {ppl_rtn:.3f}")
    assert ppl_gptq < ppl_rtn


def test_recipe_options_are_checked(tiny_models: Callable[[str], Path], tmp_path: Path, cli) -> None:
    """--mse out of range, or a GPTQ option on another target: one line, exit 2, nothing written."""
    src = tiny_models("llama")
    out = tmp_path / "out"
    out.mkdir()
    r = cli("convert", src, "--to", "gptq-4bit", "--mse", "11", "-o", out, "--no-verify")
    assert r.code == 2 and "--mse" in r.err, r.err
    r = cli("convert", src, "--to", "gguf-q4", "--no-keep-outliers", "-o", out, "--no-verify")
    assert r.code == 2 and "--keep-outliers" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    with pytest.raises(LLMOpsError, match="mse"):
        from llmops.converters.gptq.convert import _mse_option

        _mse_option({"mse": "high"})
    r = cli("convert", src, "--to", "gptq-4bit", "--foem", "2", "-o", out, "--no-verify")
    assert r.code == 2 and "--foem" in r.err, r.err
    r = cli("convert", src, "--to", "gguf-q4", "--gptaq", "0.25", "-o", out, "--no-verify")
    assert r.code == 2 and "--gptaq" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    with pytest.raises(LLMOpsError, match="foem must be a number from 0"):
        from llmops.converters.gptq.convert import _number_option

        _number_option({"foem": True}, "foem", 0.0, 1, "off")
    assert list(out.iterdir()) == []
