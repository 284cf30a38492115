"""Meta's original checkpoint layout (and torchtune's Meta-format output) seen as Hugging Face:
the same weights give byte-identical GGUFs whichever layout they come in, one shard or several."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmops.core.errors import LLMOpsError

N_HEADS, N_KV = 4, 2  # the tiny llama's attention (llmops.app.tiny_models)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _to_meta_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half Q/K rows -> Meta's interleaved pairs (the inverse of
    transformers' permute in convert_llama_weights_to_hf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def meta_checkpoint(hf: Path, dest: Path, shards: int = 1, emb_dim: int = 1, dtype: str = "float32") -> Path:
    """Write the tiny Hugging Face llama at ``hf`` in Meta's layout, cut into ``shards`` the way
    Meta's model-parallel code cuts it (the embedding along ``emb_dim``)."""
    import torch
    from safetensors.numpy import load_file

    sd = load_file(str(hf / "model.safetensors"))
    cfg = json.loads((hf / "config.json").read_text())
    meta: dict[str, np.ndarray] = {"tok_embeddings.weight": sd["model.embed_tokens.weight"],
                                   "norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        m = f"layers.{i}."
        meta[m + "attention.wq.weight"] = _to_meta_rows(sd[p + "self_attn.q_proj.weight"], N_HEADS)
        meta[m + "attention.wk.weight"] = _to_meta_rows(sd[p + "self_attn.k_proj.weight"], N_KV)
        meta[m + "attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        meta[m + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        meta[m + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        meta[m + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        meta[m + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        meta[m + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        meta[m + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    meta["rope.freqs"] = np.ones(32, dtype=np.float32)  # a cache Meta saves; it must be ignored
    dest.mkdir(parents=True)
    tdt = getattr(torch, dtype)
    for s in range(shards):
        part = {}
        for name, w in meta.items():
            kind = name.split(".")[-2]
            axis = emb_dim if kind == "tok_embeddings" else _SPLIT.get(kind)
            if shards > 1 and axis is not None and name != "rope.freqs":
                w = np.array_split(w, shards, axis=axis)[s]
            part[name] = torch.from_numpy(np.ascontiguousarray(w)).to(tdt)
        torch.save(part, dest / f"consolidated.{s:02d}.pth")
    inter = cfg["intermediate_size"]
    params = {"dim": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"], "n_heads": N_HEADS,
              "n_kv_heads": N_KV, "vocab_size": cfg["vocab_size"], "multiple_of": 256,
              # Meta's width formula, 2/3 * 4 * dim scaled and rounded up to multiple_of, gives 512
              "ffn_dim_multiplier": inter / int(8 * cfg["hidden_size"] / 3), "norm_eps": cfg["rms_norm_eps"],
              "rope_theta": (cfg.get("rope_parameters") or cfg)["rope_theta"], "max_seq_len": cfg["max_position_embeddings"]}
    (dest / "params.json").write_text(json.dumps(params))
    for name in TOKENIZER_FILES:
        if (hf / name).is_file():
            shutil.copyfile(hf / name, dest / name)
    return dest


def _hf_copy(hf: Path, dest: Path, dtype: str = "float32") -> Path:
    """The same weights in Hugging Face layout (in ``dtype``), in a folder of the same name."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf, dest)
    if dtype != "float32":
        sd = {k: v.to(getattr(torch, dtype)) for k, v in load_file(str(hf / "model.safetensors")).items()}
        save_file(sd, str(dest / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((dest / "config.json").read_text())
        cfg["torch_dtype"] = dtype
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize(("shards", "emb_dim", "dtype", "target"), [
    (1, 1, "float32", "gguf-f32"),
    (2, 1, "float32", "gguf-f16"),  # Llama 1/2: the embedding cut along its columns
    (2, 0, "bfloat16", "gguf-bf16"),  # Llama 3: cut along the vocabulary; bf16 as real checkpoints are
    (2, 0, "bfloat16", "gguf-q4_k_m"),
])
def test_meta_layout_converts_to_the_same_bytes(tiny_models, tmp_path: Path, shards: int, emb_dim: int,
                                                dtype: str, target: str) -> None:
    from llmops.app.converting import convert

    hf = _hf_copy(tiny_models("llama"), tmp_path / "hf" / "tiny", dtype)
    meta = meta_checkpoint(tiny_models("llama"), tmp_path / "meta" / "tiny", shards, emb_dim, dtype)
    a = convert(hf, target, tmp_path / "a.gguf", verify=False)
    b = convert(meta, target, tmp_path / "b.gguf", verify=False)
    assert b.parameters["architecture"] == "LlamaForCausalLM"
    assert a.output.read_bytes() == b.output.read_bytes()


def test_meta_view_matches_the_hf_tensors(tiny_models, tmp_path: Path) -> None:
    from llmops.core.checkpoint import open_checkpoint

    hf = open_checkpoint(tiny_models("llama"))
    meta = open_checkpoint(meta_checkpoint(tiny_models("llama"), tmp_path / "m", shards=2))
    assert sorted(meta.names()) == sorted(hf.names())
    assert meta.config["intermediate_size"] == hf.config["intermediate_size"]
    q = "model.layers.1.self_attn.q_proj.weight"
    assert np.array_equal(meta.float32(q), hf.float32(q))
    assert np.array_equal(meta.float32(q, (3, 70)), hf.float32(q, (3, 70)))  # a row range across heads
    down = "model.layers.0.mlp.down_proj.weight"
    assert np.array_equal(meta.float32(down, (10, 20)), hf.float32(down, (10, 20)))


def test_meta_torch_runner_logits_equal_hf(tiny_models, tmp_path: Path) -> None:
    from llmops.benchmarks.runner_torch import load_torch_model

    meta = meta_checkpoint(tiny_models("llama"), tmp_path / "m", shards=2)
    ids = np.arange(1, 40, dtype=np.int64)[None]
    import torch

    with torch.inference_mode():
        got = load_torch_model(str(meta))(torch.from_numpy(ids)).logits
        want = load_torch_model(str(tiny_models("llama")))(torch.from_numpy(ids)).logits
    assert torch.equal(got, want)


def _broken(tmp_path: Path, tiny_models, edit) -> Path:  # noqa: ANN001
    meta = meta_checkpoint(tiny_models("llama"), tmp_path / "m", shards=2)
    edit(meta)
    return meta


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: (m / "params.json").write_text('{"dim": "256", "n_layers": 2, "n_heads": 4}'), "'dim' must be"),
    (lambda m: (m / "params.json").write_text("{not json"), "not readable JSON"),
    (lambda m: (m / "consolidated.01.pth").write_bytes((m / "consolidated.01.pth").read_bytes()[:5000]),
     "consolidated.01.pth"),
])
def test_broken_meta_checkpoints_are_one_line_errors(tiny_models, tmp_path: Path, edit, message: str) -> None:
    from llmops.app.converting import convert

    meta = _broken(tmp_path, tiny_models, edit)
    with pytest.raises(LLMOpsError, match=message):
        convert(meta, "gguf-f16", tmp_path / "out.gguf", verify=False)
    assert not (tmp_path / "out.gguf").exists()


def test_shards_that_disagree_in_shape(tiny_models, tmp_path: Path) -> None:
    import torch

    from llmops.core.checkpoint import open_checkpoint

    meta = meta_checkpoint(tiny_models("llama"), tmp_path / "m", shards=2)
    sd = torch.load(meta / "consolidated.01.pth", weights_only=True)
    sd["layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"][:, :-8].clone()
    torch.save(sd, meta / "consolidated.01.pth")
    with pytest.raises(LLMOpsError, match="disagree in the shape of layers.0.attention.wq.weight"):
        open_checkpoint(meta)
    sd["layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"][:-8, :]
    torch.save(sd, meta / "consolidated.01.pth")  # fewer rows: the merged shape contradicts params.json
    with pytest.raises(LLMOpsError, match=r"q_proj.weight has shape \[248, 248\]|disagree"):
        open_checkpoint(meta)


def test_a_meta_pickle_that_would_run_code_is_refused(tiny_models, tmp_path: Path) -> None:
    import pickle

    from llmops.core.checkpoint import open_checkpoint

    meta = meta_checkpoint(tiny_models("llama"), tmp_path / "m", shards=1)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (open, (str(marker), "w"))

    (meta / "consolidated.00.pth").write_bytes(pickle.dumps({"tok_embeddings.weight": Evil()}))
    with pytest.raises(LLMOpsError, match="refusing"):
        open_checkpoint(meta)
    assert not marker.exists()


# -- litgpt: lit_model.pth + model_config.yaml -----------------------------------------------------


def litgpt_checkpoint(hf: Path, dest: Path, *, legacy: bool = False) -> Path:
    """The tiny Hugging Face llama as litgpt saves it: fused QKV ([q; k; v], or per query group
    [q x q_per_kv, k, v] for the older ``attn.attn``), ``transformer.h.N`` names, a yaml config."""
    import torch
    import yaml
    from safetensors.numpy import load_file

    sd = load_file(str(hf / "model.safetensors"))
    cfg = json.loads((hf / "config.json").read_text())
    hd = cfg["hidden_size"] // N_HEADS
    lit: dict[str, np.ndarray] = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
                                  "transformer.ln_f.weight": sd["model.norm.weight"], "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p, m = f"model.layers.{i}.", f"transformer.h.{i}."
        q, k, v = (sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        if legacy:
            per = N_HEADS // N_KV
            groups = [np.concatenate([q[g * per * hd:(g + 1) * per * hd], k[g * hd:(g + 1) * hd],
                                      v[g * hd:(g + 1) * hd]]) for g in range(N_KV)]
            lit[m + "attn.attn.weight"] = np.concatenate(groups)
        else:
            lit[m + "attn.qkv.weight"] = np.concatenate([q, k, v])
        lit[m + "attn.proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        lit[m + "mlp.fc_1.weight"] = sd[p + "mlp.gate_proj.weight"]
        lit[m + "mlp.fc_2.weight"] = sd[p + "mlp.up_proj.weight"]
        lit[m + "mlp.proj.weight"] = sd[p + "mlp.down_proj.weight"]
        lit[m + "norm_1.weight"] = sd[p + "input_layernorm.weight"]
        lit[m + "norm_2.weight"] = sd[p + "post_attention_layernorm.weight"]
    dest.mkdir(parents=True)
    torch.save({k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in lit.items()}, dest / "lit_model.pth")
    (dest / "model_config.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "block_size": cfg["max_position_embeddings"], "vocab_size": cfg["vocab_size"],
        "padded_vocab_size": cfg["vocab_size"], "n_layer": cfg["num_hidden_layers"], "n_head": N_HEADS,
        "n_query_groups": N_KV, "n_embd": cfg["hidden_size"], "head_size": hd, "rotary_percentage": 1.0,
        "parallel_residual": False, "bias": False, "norm_class_name": "RMSNorm", "mlp_class_name": "LLaMAMLP",
        "intermediate_size": cfg["intermediate_size"], "norm_eps": cfg["rms_norm_eps"],
        "rope_base": int((cfg.get("rope_parameters") or cfg)["rope_theta"])}))
    for name in TOKENIZER_FILES:
        if (hf / name).is_file():
            shutil.copyfile(hf / name, dest / name)
    return dest


@pytest.mark.parametrize("legacy", [False, True])
def test_litgpt_converts_to_the_same_bytes(tiny_models, tmp_path: Path, legacy: bool) -> None:
    from llmops.app.converting import convert

    hf = _hf_copy(tiny_models("llama"), tmp_path / "hf" / "tiny")
    lit = litgpt_checkpoint(tiny_models("llama"), tmp_path / "lit" / "tiny", legacy=legacy)
    a = convert(hf, "gguf-q8_0", tmp_path / "a.gguf", verify=False)
    b = convert(lit, "gguf-q8_0", tmp_path / "b.gguf", verify=False)
    assert a.output.read_bytes() == b.output.read_bytes()


def test_litgpt_of_another_family_is_refused(tiny_models, tmp_path: Path) -> None:
    from llmops.core.checkpoint import open_checkpoint

    lit = litgpt_checkpoint(tiny_models("llama"), tmp_path / "lit")
    cfg = (lit / "model_config.yaml").read_text().replace("parallel_residual: false", "parallel_residual: true")
    (lit / "model_config.yaml").write_text(cfg)
    with pytest.raises(LLMOpsError, match="parallel_residual=True is not supported"):
        open_checkpoint(lit)
