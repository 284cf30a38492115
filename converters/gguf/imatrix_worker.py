"""The importance-matrix child: the source model in torch, forward hooks, sums of x².

Run by ``imatrix.compute`` through the core's child protocol (``llmops.core.child``): torch
and transformers load native code and a model-sized amount of memory, which a child keeps
out of the converter's process (a crash or an OOM kill is a one-line error there).

What it computes is what llama.cpp's ``llama-imatrix`` collects (``IMatrixCollector``):

* the text is tokenized once (BOS first when the tokenizer adds one) and cut into chunks of
  ``n_ctx`` tokens, each evaluated from an empty cache, BOS in place of its first token when
  the tokenizer adds BOS; fewer than two chunks' worth of tokens is an error, as there;
* for every weight matrix of the decoder layers (``blk.*``, so not the output head) the sum
  over every token of the chunk of x² of the activations entering it, per input column, and
  the number of tokens counted;
* stacked experts are counted per expert: only the tokens routed to an expert count for it,
  and its ``ffn_down`` sees that expert's own activations.

The sums are accumulated in float64 and stored as float32 in llama.cpp's GGUF format.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def run(job: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from llmops.converters.gguf.imatrix import ImatrixData, write_gguf

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    n_ctx = int(job["n_ctx"])
    tokenizer, model = _load(job["source"])
    text = Path(job["text_file"]).read_text(encoding="utf-8")
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    bos = tokenizer.bos_token_id
    add_bos = bos is not None and len(ids) > 0 and ids[0] == bos  # the tokenizer added BOS
    if len(ids) < 2 * n_ctx:
        raise ValueError(f"the calibration text tokenizes to {len(ids)} tokens; an importance matrix needs at least "
                         f"{2 * n_ctx} (two chunks of {n_ctx})")
    n_chunk = len(ids) // n_ctx if not job.get("chunks") else min(int(job["chunks"]), len(ids) // n_ctx)
    acc = Collector(job["targets"])
    hooks = acc.attach(model)
    if not hooks:
        raise ValueError("no weight of the model matches the GGUF tensors an importance matrix covers")
    say(f"importance matrix: {n_chunk} chunks of {n_ctx} tokens, {len(acc.names)} weights")
    batch = 4
    try:
        with torch.inference_mode():
            for first in range(0, n_chunk, batch):
                rows = []
                for c in range(first, min(first + batch, n_chunk)):
                    chunk = ids[c * n_ctx:(c + 1) * n_ctx]
                    if add_bos:
                        chunk = [bos, *chunk[1:]]
                    rows.append(chunk)
                model(input_ids=torch.tensor(rows, dtype=torch.long), use_cache=False, logits_to_keep=1)
                say(f"importance matrix: chunk {min(first + batch, n_chunk)}/{n_chunk}")
    finally:
        for h in hooks:
            h.remove()
    sums, counts = acc.result()
    missing = sorted(n for n in set(job["targets"].values()) - set(sums) if n.startswith("blk."))
    if missing:
        say(f"importance matrix: no activations for {len(missing)} weights (e.g. {missing[0]})")
    data = ImatrixData(sums, counts, [job.get("dataset") or job["text_file"]], n_chunk, n_ctx)
    write_gguf(Path(job["output"]), data)
    char_end = int(offsets[n_chunk * n_ctx - 1][1])  # one past the last character whose tokens were used
    return {"chunks": n_chunk, "entries": len(sums), "char_end": char_end}


def _load(source: str) -> tuple[Any, Any]:
    """The tokenizer and the float32 model (a Hugging Face folder, or weights with config.json)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llmops.core.checkpoint import open_checkpoint

    ckpt = open_checkpoint(source)
    tokenizer = AutoTokenizer.from_pretrained(ckpt.root)
    p = Path(source)
    if p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin"))):
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    else:
        if (ckpt.root / "config.json").is_file():
            config = AutoConfig.from_pretrained(ckpt.root)
        else:
            cfg = {k: v for k, v in ckpt.config.items() if k not in ("architectures", "torch_dtype")}
            config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict({n: torch.from_numpy(np.array(ckpt.float32(n))) for n in ckpt.names()}, strict=False)
    return tokenizer, model.eval()


class Collector:
    """Sums of x² and token counts per GGUF weight name, fed by forward hooks."""

    def __init__(self, targets: dict[str, str]) -> None:
        self.targets = targets  # checkpoint weight name -> GGUF name
        self.names: set[str] = set()
        self.sums: dict[str, Any] = {}  # torch float64 [matrices, columns]
        self.counts: dict[str, Any] = {}  # torch int64 [matrices]

    def attach(self, model: Any) -> list[Any]:
        import torch

        hooks = []
        for mname, module in model.named_modules():
            gguf_name = self.targets.get(f"{mname}.weight")
            if isinstance(module, torch.nn.Linear) and gguf_name and gguf_name.startswith("blk."):
                self.names.add(gguf_name)
                hooks.append(module.register_forward_pre_hook(self._dense(gguf_name)))
            elif _is_experts(module):
                names = self._expert_names(mname)
                if names:
                    self.names.update(names.values())
                    hooks.append(module.register_forward_pre_hook(self._experts(module, names)))
        return hooks

    def _expert_names(self, mname: str) -> dict[str, str] | None:
        """GGUF names of a fused experts module's stacks (``blk.N.ffn_{gate,up,down}_exps.weight``),
        when the converter writes them."""
        m = _LAYER.search(mname)
        if not m:
            return None
        wanted = {w: f"blk.{m.group(1)}.ffn_{w}_exps.weight" for w in ("gate", "up", "down")}
        have = set(self.targets.values())
        return wanted if all(v in have for v in wanted.values()) else None

    def _init(self, name: str, n_mat: int, cols: int) -> None:
        import torch

        if name not in self.sums:
            self.sums[name] = torch.zeros((n_mat, cols), dtype=torch.float64)
            self.counts[name] = torch.zeros(n_mat, dtype=torch.int64)

    def _add(self, name: str, x: Any, mat: int = 0, n_mat: int = 1) -> None:
        x = x.reshape(-1, x.shape[-1])
        self._init(name, n_mat, x.shape[-1])
        self.sums[name][mat] += (x.double() ** 2).sum(0)
        self.counts[name][mat] += x.shape[0]

    def _dense(self, name: str) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            self._add(name, args[0])

        return hook

    def _experts(self, module: Any, names: dict[str, str]) -> Callable[..., None]:
        import torch

        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            hidden, top_k_index = args[0], args[1]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            n_exp = module.gate_up_proj.shape[0]
            # every expert has an entry, a never-routed one with a count of 0 (llama.cpp then uses 1s)
            self._init(names["gate"], n_exp, hidden.shape[-1])
            self._init(names["up"], n_exp, hidden.shape[-1])
            self._init(names["down"], n_exp, module.down_proj.shape[-1])
            for e in range(n_exp):
                token_idx = (top_k_index.reshape(hidden.shape[0], -1) == e).any(-1).nonzero().flatten()
                if token_idx.numel() == 0:
                    continue
                x = hidden[token_idx]
                self._add(names["gate"], x, e, n_exp)
                self._add(names["up"], x, e, n_exp)
                gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
                self._add(names["down"], module.act_fn(gate) * up, e, n_exp)

        return hook

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        sums = {n: s.float().numpy() for n, s in self.sums.items()}
        counts = {n: c.numpy().astype(np.float32) for n, c in self.counts.items()}
        return sums, counts


def _is_experts(module: Any) -> bool:
    """transformers' fused experts (MixtralExperts, Qwen2MoeExperts, ...): 3-D gate_up and down."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return getattr(gu, "ndim", 0) == 3 and getattr(down, "ndim", 0) == 3 and hasattr(module, "act_fn")
