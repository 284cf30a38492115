"""The GPTQ runner: a GPTQ folder's logits, on CPU through dequantized weights, on CUDA through GPTQModel.

On the CPU, GPTQModel's int4 kernels are far slower than a float32 matmul for
the batch shapes evaluation uses (16 perplexity chunks of SmolLM2 took 19 minutes
through them on 2 cores), and they compute with the same dequantized values
anyway. So the CPU path dequantizes every packed layer once, with GPTQModel's own
safetensors dequantizer (``gptqmodel.utils.model_dequant.convert_gptq_file``: the
library's reading of qweight/qzeros/scales/g_idx, including the GPTQ v1 zero-point
offset and act-order group indices), and runs a plain transformers model in
float32. The numbers measured are those of the quantized weights; only the speed
differs from a kernel-based deployment, which the latency benchmark says.

On CUDA the folder is loaded through GPTQModel, which picks its fastest kernel
(marlin, exllama, ...) for the device: that is what a GPU user would deploy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmops.benchmarks.runners import HFTokenizerMixin

from llmops.benchmarks.runner_torch import TorchLogitsMixin, config_context
from llmops.core.errors import LLMOpsError


def _quantization_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LLMOpsError(f"{path}: no readable config.json ({e})") from None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != "gptq":
        raise LLMOpsError(f"{path}: not a GPTQ folder (config.json has no GPTQ quantization_config)")
    return qc


def dequantized_state_dict(path: str | Path) -> dict[str, Any]:
    """Every tensor of a GPTQ folder in float32, packed layers turned back into ``.weight`` matrices."""
    import torch

    from llmops.core.gptqmodel_env import import_gptqmodel

    p = Path(path)
    qc = _quantization_config(p)
    import_gptqmodel()
    from gptqmodel.utils.model_dequant import convert_gptq_file, list_safetensor_files

    files, _ = list_safetensor_files(p)
    if not files:
        raise LLMOpsError(f"{p}: no safetensors files")
    sd: dict[str, Any] = {}
    for name in files:
        try:
            sd.update(convert_gptq_file(p / name, torch.float32, qc, "cpu"))
        except (KeyError, ValueError, RuntimeError) as e:
            raise LLMOpsError(f"{p / name}: cannot dequantize ({str(e).splitlines()[0][:200]})") from None
    return sd


def load_dequantized_model(path: str | Path) -> Any:
    """A float32 transformers model holding the dequantized weights of a GPTQ folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path)
    sd = dequantized_state_dict(p)
    config = AutoConfig.from_pretrained(p)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False) or
                getattr(getattr(config, "get_text_config", lambda: config)(), "tie_word_embeddings", False))
    if tied:
        model.tie_weights()
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise LLMOpsError(f"{p}: the dequantized weights do not fit {type(model).__name__} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


class GPTQRunner(TorchLogitsMixin, HFTokenizerMixin):
    """A GPTQ folder behind the ``LogitsRunner`` protocol; ``.model`` is the torch module that runs it."""

    def __init__(self, path: str, n_ctx: int = 512, threads: int | None = None, vocab_only: bool = False,
                 device: str = "cpu") -> None:
        self._init_torch(threads)
        self.path = Path(path)
        self.device = "cuda" if device == "cuda" else "cpu"
        _quantization_config(self.path)
        self._load_tokenizer(self.path)
        if vocab_only:
            self.vocab_size = len(self.tokenizer)
            return
        self.model = load_dequantized_model(self.path) if self.device == "cpu" else _load_cuda(self.path)
        self.vocab_size = int(self.model.config.vocab_size)
        self.context_length = config_context(self.model.config)


def _load_cuda(path: Path) -> Any:
    import torch

    from llmops.core.gptqmodel_env import import_gptqmodel

    if not torch.cuda.is_available():
        raise LLMOpsError("--device cuda: no CUDA device is available to this process")
    import_gptqmodel()
    from gptqmodel import GPTQModel

    try:
        qmodel = GPTQModel.load(str(path), device="cuda")
    except (ValueError, RuntimeError, OSError) as e:
        raise LLMOpsError(f"GPTQModel cannot load {path} on CUDA: {str(e).splitlines()[0][:200]}") from None
    return qmodel.model.eval()
