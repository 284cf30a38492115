"""Logits of an ONNX decoder folder (the model builder's layout) through plain onnxruntime.

Perplexity and KL-divergence need the logits of *every* position of a window, and
onnxruntime-genai's generator hands out only the last one; so the runner feeds the
whole window in one ``InferenceSession.run`` from an empty KV cache: ``input_ids``
[1, n], ``attention_mask`` [1, n] of ones, ``position_ids`` 0..n-1 where the graph has
that input, and every ``past_key_values.*`` as an empty [1, kv_heads, 0, head_size]
tensor of the graph's own dtype. That is exactly what the generator does for a prompt
(its first step), so the numbers describe the artifact users run.

Tokens come from the Hugging Face tokenizer files the builder copies into the folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from llmops.benchmarks.runners import HFTokenizerMixin, score_choices_by_logits
from llmops.core.errors import LLMOpsError
from llmops.core.genai_config import check_file, check_folder, decoder_graph

_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


def model_file(folder: Path, genai: dict[str, Any] | None = None) -> Path:
    """The decoder graph named in genai_config.json (``model.onnx`` by default), inside the folder.

    ``genai`` is the folder's config as :func:`llmops.core.genai_config.check_folder` returned
    it (read and checked here when not given)."""
    if genai is None:
        genai = check_folder(folder, required=False)
    named = decoder_graph(folder, genai)
    if named is not None and named.is_file():
        return named
    if (folder / "model.onnx").is_file():
        return check_file(folder, "model.onnx")
    graphs = sorted(folder.glob("*.onnx"))
    if len(graphs) == 1:
        return check_file(folder, graphs[0].name)
    raise LLMOpsError(f"{folder}: no model.onnx (expected the folder the ONNX converter writes)")


class OnnxRunner(HFTokenizerMixin):
    """An ONNX decoder folder run by onnxruntime on the CPU (or CUDA with ``device="cuda"``)."""

    def __init__(self, path: str, n_ctx: int = 512, threads: int | None = None, vocab_only: bool = False,
                 device: str = "cpu") -> None:
        folder = Path(path)
        if folder.is_file() and folder.suffix == ".onnx":
            folder = folder.parent
        if not folder.is_dir():
            raise LLMOpsError(f"{path}: no such ONNX model folder")
        self.folder = folder
        self.n_ctx = n_ctx
        # one check for every ONNX load: this runtime ignores the session settings that load
        # code, but a folder that asks for them is refused here as it is by onnxruntime-genai
        genai = check_folder(folder, required=False)
        self._load_tokenizer(folder)
        # the builder writes model_max_length = context length; evaluation tokenizes a whole text
        # first and cuts windows itself, so the "sequence too long" warning would be noise
        self.tokenizer.model_max_length = int(1e12)
        model = genai.get("model", {})
        decoder = model.get("decoder", {})
        # the KV inputs' head dimensions are symbolic in some graphs ('kv_cache_dim'); genai_config has them
        self.kv_heads = decoder.get("num_key_value_heads")
        self.head_size = decoder.get("head_size")
        vocab = model.get("vocab_size")
        context = model.get("context_length")
        if context and n_ctx > int(context):
            raise LLMOpsError(f"{folder}: a context of {n_ctx} tokens exceeds the model's {context}")
        self.context_length = int(context) if context else None
        if vocab_only:
            self.vocab_size = int(vocab) if vocab else len(self.tokenizer)
            return
        self.session = self._session(model_file(folder, genai), threads, device)
        self.inputs = self.session.get_inputs()
        out = {o.name: o for o in self.session.get_outputs()}
        if "logits" not in out:
            raise LLMOpsError(f"{folder}: the graph has no 'logits' output")
        dims = out["logits"].shape
        self.vocab_size = int(dims[-1]) if isinstance(dims[-1], int) else int(vocab or len(self.tokenizer))
        # ask only for the logits: the present KV tensors are never read
        self.output_names = ["logits"]
        known = ("input_ids", "attention_mask", "position_ids")
        for i in self.inputs:
            if i.name not in known and not i.name.startswith("past_key_values."):
                raise LLMOpsError(f"{folder}: graph input {i.name!r} is not one this runner knows how to feed")

    @staticmethod
    def _session(graph: Path, threads: int | None, device: str) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: onnxruntime's warnings would land in the CLI's stderr
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise LLMOpsError("onnxruntime has no CUDA execution provider here; install llmops[gpu] "
                                  "(onnxruntime-gpu) or use --device cpu")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise LLMOpsError(f"unknown device {device!r} for the ONNX runner; choose cpu or cuda")
        try:
            return ort.InferenceSession(str(graph), sess_options=so, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LLMOpsError(f"onnxruntime cannot load {graph}: {first[:300]}") from None

    def feeds(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's inputs for one sequence evaluated from an empty cache."""
        n = len(tokens)
        feeds: dict[str, np.ndarray] = {}
        for i in self.inputs:
            dtype = _ORT_DTYPES.get(i.type)
            if dtype is None:
                raise LLMOpsError(f"graph input {i.name!r} has unsupported type {i.type}")
            if i.name == "input_ids":
                feeds[i.name] = np.asarray(tokens, dtype=dtype).reshape(1, n)
            elif i.name == "attention_mask":
                feeds[i.name] = np.ones((1, n), dtype=dtype)
            elif i.name == "position_ids":
                feeds[i.name] = np.arange(n, dtype=dtype).reshape(1, n)
            else:  # past_key_values.N.key / .value: [batch, kv_heads, past_sequence_length, head_size]
                if len(i.shape) != 4:
                    raise LLMOpsError(f"graph input {i.name!r} has shape {i.shape}; expected 4 dimensions")
                heads, size = i.shape[1], i.shape[3]
                heads = heads if isinstance(heads, int) else self.kv_heads
                size = size if isinstance(size, int) else self.head_size
                if not heads or not size:
                    raise LLMOpsError(f"graph input {i.name!r} has shape {i.shape} and genai_config.json does not "
                                      "give num_key_value_heads/head_size")
                shape = [1, int(heads), 0, int(size)]
                feeds[i.name] = np.zeros(shape, dtype=dtype)
        return feeds

    def logits(self, tokens: np.ndarray, first: int = 0, last: int | None = None, *, view: bool = False) -> np.ndarray:
        # the builder's graph projects every position; there is no input to skip some
        out = self.session.run(self.output_names, self.feeds(np.asarray(tokens)))[0]
        return np.asarray(out[0, first:last], dtype=np.float32)

    def score_choices(self, context: np.ndarray, continuations: list[np.ndarray]) -> list[tuple[float, bool]]:
        # each choice whole from an empty cache, as the generator starts every prompt
        return score_choices_by_logits(self, context, continuations)
