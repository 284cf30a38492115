"""The torch runner: a Hugging Face checkpoint in transformers, float32 on CPU (or CUDA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmops.benchmarks.runners import HFTokenizerMixin


class TorchLogitsMixin:
    """Full-sequence logits from a transformers causal LM in ``self.model`` (torch and GPTQ runners)."""

    device: str = "cpu"

    def _init_torch(self, threads: int | None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch

    def logits(self, tokens: np.ndarray, first: int = 0, last: int | None = None, *, view: bool = False) -> np.ndarray:
        torch = self.torch
        n = len(tokens)
        last = n if last is None else last
        with torch.inference_mode():
            ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None].to(self.device)
            # logits_to_keep=k: the output projection runs on the last k positions only
            out = self.model(input_ids=ids, use_cache=False, logits_to_keep=n - first).logits[0]
        return out[: last - first].float().cpu().numpy()


class TorchRunner(TorchLogitsMixin, HFTokenizerMixin):
    """A Hugging Face checkpoint (folder, or bare weights file with config.json beside it) on CPU in float32."""

    def __init__(self, path: str, n_ctx: int = 512, threads: int | None = None, vocab_only: bool = False,
                 device: str = "cpu") -> None:
        self._init_torch(threads)
        self._load_tokenizer(path)
        if vocab_only:
            self.vocab_size = len(self.tokenizer)
            return
        self.model = load_torch_model(path)
        self.vocab_size = int(self.model.config.vocab_size)


def load_torch_model(path: str) -> Any:
    """The checkpoint as a float32 transformers model; refuses one with missing weights.

    transformers fills a weight the checkpoint lacks with random values and only warns:
    benchmarking that would report the figures of a random model under the checkpoint's
    name, so any missing weight (other than an output head tied to the embedding) is an error."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmops.core.errors import LLMOpsError

    p = Path(path)
    if p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin"))):
        model, info = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, output_loading_info=True)
        missing = list(info.get("missing_keys") or [])
    else:
        # bare weights or *.pth: build from config.json and load through the safe loader
        from llmops.core.checkpoint import open_checkpoint

        ckpt = open_checkpoint(p)
        if (ckpt.root / "config.json").is_file():
            config = AutoConfig.from_pretrained(ckpt.root)
        else:  # a layout whose config is derived (Meta's params.json): the view's config
            cfg = {k: v for k, v in ckpt.config.items() if k not in ("architectures", "torch_dtype")}
            config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        sd = {n: torch.from_numpy(np.array(ckpt.float32(n))) for n in ckpt.names()}
        missing = list(model.load_state_dict(sd, strict=False).missing_keys)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise LLMOpsError(f"{path}: the checkpoint lacks {len(missing)} weight(s) the model needs ({shown}); "
                          "refusing to benchmark randomly initialised weights")
    return model.eval()
