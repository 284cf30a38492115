"""litgpt checkpoints (``lit_model.pth`` + ``model_config.yaml``) seen as Hugging Face Llama
checkpoints; see ``llmops.core.layouts`` for what a layout view is."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from llmops.core.errors import LLMOpsError
from llmops.core.layouts import Reader, read_mapping
from llmops.core.tensorfiles import TensorInfo, _torch_dtype_name, _torch_to_numpy, load_weights_pickle


def is_litgpt_layout(folder: Path) -> bool:
    return (folder / "lit_model.pth").is_file() and (folder / "model_config.yaml").is_file() and not (
        folder / "config.json").is_file()


def litgpt_params(folder: Path) -> dict[str, Any]:
    import yaml

    path = folder / "model_config.yaml"
    cfg = read_mapping(path, "YAML", yaml.safe_load, (yaml.YAMLError,),
                       ("n_embd", "n_layer", "n_head", "intermediate_size"))
    # what a Hugging Face LlamaForCausalLM can hold; other litgpt families are refused by name
    wanted = {"mlp_class_name": "LLaMAMLP", "norm_class_name": "RMSNorm", "parallel_residual": False,
              "bias": False, "rotary_percentage": 1.0}
    for key, value in wanted.items():
        if key in cfg and cfg[key] != value:
            raise LLMOpsError(f"{path}: {key}={cfg[key]!r} is not supported (litgpt checkpoints of the Llama family "
                              f"only: {', '.join(f'{k}={v!r}' for k, v in wanted.items())})")
    return cfg


class LitGPTLayout:
    """A litgpt checkpoint (``lit_model.pth``) as Hugging Face Llama tensors, read lazily.

    litgpt fuses Q, K and V into ``attn.qkv`` ([all q; all k; all v] rows, as its
    ``convert_lit_checkpoint.py`` splits them); checkpoints of older litgpt versions name it
    ``attn.attn`` and interleave it per query group ([q x q_per_kv, k, v] for each group).
    Its Q and K rows are already in Hugging Face's rotate-half order."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.params = p = litgpt_params(folder)
        self.files = [folder / "lit_model.pth"]
        self._sd: dict[str, Any] | None = None
        sd = self._state()
        n_head = p["n_head"]
        n_kv = int(p.get("n_query_groups") or n_head)
        hd = int(p.get("head_size") or p["n_embd"] // n_head)
        self.infos: dict[str, TensorInfo] = {}
        self.readers: dict[str, Reader] = {}
        names = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
                 "lm_head.weight": "lm_head.weight"}
        per_layer = {"norm_1.weight": "input_layernorm.weight", "norm_2.weight": "post_attention_layernorm.weight",
                     "attn.proj.weight": "self_attn.o_proj.weight", "mlp.fc_1.weight": "mlp.gate_proj.weight",
                     "mlp.fc_2.weight": "mlp.up_proj.weight", "mlp.proj.weight": "mlp.down_proj.weight"}
        layer = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
        for src, t in sd.items():
            m = layer.match(src)
            if src in names:
                self._add(names[src], src, t, None)
            elif m and m.group(2) in per_layer:
                self._add(f"model.layers.{m.group(1)}.{per_layer[m.group(2)]}", src, t, None)
            elif m and m.group(2) in ("attn.qkv.weight", "attn.attn.weight"):
                rows = (n_head + 2 * n_kv) * hd
                if tuple(t.shape)[0] != rows:
                    raise LLMOpsError(f"{self.files[0]}: {src} has {t.shape[0]} rows, model_config.yaml implies {rows}")
                for part, index in _qkv_rows(n_head, n_kv, hd, interleaved=m.group(2) == "attn.attn.weight").items():
                    self._add(f"model.layers.{m.group(1)}.self_attn.{part}_proj.weight", src, t, index)
            else:
                raise LLMOpsError(f"{self.files[0]}: tensor {src!r} is not part of litgpt's Llama layout")
        self.infos = dict(sorted(self.infos.items()))
        if "model.embed_tokens.weight" not in self.infos:
            raise LLMOpsError(f"{self.files[0]}: no transformer.wte.weight")
        emb = self.infos["model.embed_tokens.weight"]
        self.config: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": p["n_embd"],
            "intermediate_size": p["intermediate_size"], "num_hidden_layers": p["n_layer"],
            "num_attention_heads": n_head, "head_dim": hd, "num_key_value_heads": n_kv,
            "vocab_size": emb.shape[0], "rms_norm_eps": float(p.get("norm_eps", 1e-5)),
            "rope_theta": float(p.get("rope_base", 10000)), "max_position_embeddings": int(p.get("block_size", 4096)),
            "hidden_act": "silu", "tie_word_embeddings": "lm_head.weight" not in self.infos,
            "torch_dtype": {"BF16": "bfloat16", "F16": "float16"}.get(emb.dtype, "float32"),
        }

    def _state(self) -> dict[str, Any]:
        if self._sd is None:
            self._sd = load_weights_pickle(self.files[0])
        return self._sd

    def _add(self, hf: str, src: str, t: Any, index: np.ndarray | None) -> None:
        shape = tuple(t.shape) if index is None else (len(index), *tuple(t.shape)[1:])
        self.infos[hf] = TensorInfo(hf, _torch_dtype_name(t), shape, self.files[0])

        def read(rows: tuple[int, int] | None) -> np.ndarray:
            arr = _torch_to_numpy(self._state()[src])
            if index is None:
                return arr if rows is None else arr[rows[0]:rows[1]]
            return arr[index if rows is None else index[rows[0]:rows[1]]]

        self.readers[hf] = read

    def close(self) -> None:
        self._sd = None


def _qkv_rows(n_head: int, n_kv: int, hd: int, *, interleaved: bool) -> dict[str, np.ndarray]:
    """Rows of the fused QKV matrix that hold each of Q, K and V, in order."""
    if not interleaved:
        q, k = n_head * hd, n_kv * hd
        return {"q": np.arange(0, q), "k": np.arange(q, q + k), "v": np.arange(q + k, q + 2 * k)}
    per = n_head // n_kv  # q heads per query group, then one k and one v head
    group = (per + 2) * hd
    qs = [g * group + np.arange(per * hd) for g in range(n_kv)]
    ks = [g * group + per * hd + np.arange(hd) for g in range(n_kv)]
    vs = [g * group + (per + 1) * hd + np.arange(hd) for g in range(n_kv)]
    return {"q": np.concatenate(qs), "k": np.concatenate(ks), "v": np.concatenate(vs)}
