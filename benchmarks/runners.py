"""The runner interface: one runner per backend turns token ids into next-token logits.

Backends are named in :data:`BACKENDS` and imported only when used. Every runner runs
in a child interpreter (``jobs.py``), so a native crash or an OOM kill is one line.
"""

from __future__ import annotations

import json

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from llmops.core import plugins


@dataclass(frozen=True)
class RunnerSpec:
    backend: str  # a key of BACKENDS: "llama.cpp", "torch", "onnx", "gptq"
    path: str  # a .gguf file, an ONNX/GPTQ folder, or a checkpoint folder/file for torch
    n_ctx: int = 512
    threads: int | None = None
    device: str = "cpu"


class LogitsRunner(Protocol):
    """What every backend provides. Constructed as ``cls(path, n_ctx=, threads=, vocab_only=, device=)``;
    with ``vocab_only`` only the tokenizer needs to load."""

    vocab_size: int
    add_bos: bool
    bos_id: int
    eos_id: int  # -1: none
    context_length: int | None  # the context the model was trained for, where the artifact says

    def tokenize(self, text: str, add_special: bool = True) -> np.ndarray:
        """The ids the artifact's own tokenizer gives ``text`` (BOS first only if it adds one and
        ``add_special``)."""
        ...

    def token_text(self, token: int) -> str:
        """One token's text (special tokens as their text)."""
        ...

    def logits(self, tokens: np.ndarray, first: int = 0, last: int | None = None, *, view: bool = False) -> np.ndarray:
        """[last - first, vocab] float32 logits at positions ``first..last-1`` of one sequence
        evaluated from an empty cache (all positions by default). Perplexity scores only the
        second half of each window, so a runner that can skip the output projection for the
        other positions should. ``view``: the caller is done with the array before its next call,
        so a runner may hand out its own buffer instead of a copy."""
        ...

    def score_choices(self, context: np.ndarray, continuations: list[np.ndarray]) -> list[tuple[float, bool]]:
        """(log-probability, greedy) of each continuation after one shared context: the sum of
        the log-softmax of each continuation token, and whether every one of them is the argmax
        (what lm-eval's loglikelihood requests ask). The choices of a multiple-choice question
        share their context, so a runner evaluates it once where its runtime keeps a KV cache;
        :func:`score_choices_by_logits` is the plain way over :meth:`logits`."""
        ...


# backend -> "module:Class"; modules are imported only when that backend runs.
BACKENDS: dict[str, str] = {
    "llama.cpp": "llmops.benchmarks.runner_llamacpp:LlamaCppRunner",
    "torch": "llmops.benchmarks.runner_torch:TorchRunner",
    "onnx": "llmops.benchmarks.runner_onnx:OnnxRunner",
    "gptq": "llmops.benchmarks.runner_gptq:GPTQRunner",
}


def backend_for(path: str | Path) -> str:
    """Which runner reads this artifact (from its headers, not its name)."""
    from llmops.core.artifact_info import describe, is_gguf

    if is_gguf(path):  # the magic is enough; parsing a GGUF's metadata takes seconds
        return "llama.cpp"
    fmt = describe(path).format
    return {"gguf": "llama.cpp", "onnx": "onnx", "gptq": "gptq"}.get(fmt, "torch")


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, accumulated in float64 (a 49k vocabulary's sum loses digits in float32)."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def continuation_score(logprobs: np.ndarray, continuation: np.ndarray) -> tuple[float, bool]:
    """(sum of the continuation's log-probabilities, every token the argmax) from the
    ``[len(continuation), vocab]`` log-probabilities that predict it."""
    cont = np.asarray(continuation, dtype=np.int64)
    picked = logprobs[np.arange(len(cont)), cont]
    return float(picked.sum()), bool((logprobs.argmax(axis=-1) == cont).all())


def score_choices_by_logits(runner: LogitsRunner, context: np.ndarray,
                            continuations: list[np.ndarray]) -> list[tuple[float, bool]]:
    """:meth:`LogitsRunner.score_choices` through ``logits``: context and continuation (but its
    last token) evaluated whole for every choice, the rows from the context's last position on."""
    context = np.asarray(context, dtype=np.int32)
    n = len(context)
    out = []
    for cont in continuations:
        cont = np.asarray(cont, dtype=np.int32)
        rows = runner.logits(np.concatenate([context, cont[:-1]]), n - 1)
        out.append(continuation_score(log_softmax_rows(rows), cont))
    return out


class HFTokenizerMixin:
    """Tokenization with the checkpoint's own Hugging Face tokenizer (torch, ONNX and GPTQ folders)."""

    def _load_tokenizer(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        p = Path(path)
        root = p if p.is_dir() else p.parent
        self.tokenizer = _meta_tiktoken(root) or AutoTokenizer.from_pretrained(root)
        probe = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        self.add_bos = bool(bos is not None and probe and probe[0] == bos)
        self.bos_id = int(bos) if bos is not None else -1
        self.eos_id = int(eos) if eos is not None else -1

    def tokenize(self, text: str, add_special: bool = True) -> np.ndarray:
        ids = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
        return np.asarray(ids, dtype=np.int32)

    def token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([int(token)]))


def _meta_tiktoken(root: Path) -> Any:
    """A Meta-layout folder whose only tokenizer is Llama 3's tiktoken ``tokenizer.model``: the
    Hugging Face tokenizer transformers would make of it (the one the GGUF export writes), since
    AutoTokenizer finds no files to load; None for every other folder."""
    import tempfile

    from llmops.core.layouts import is_meta_layout, tokenizer_model_kind

    model = root / "tokenizer.model"
    if ((root / "tokenizer.json").is_file() or (root / "tokenizer_config.json").is_file() or not model.is_file()
            or not is_meta_layout(root) or tokenizer_model_kind(model) != "tiktoken"):
        return None
    from transformers import PreTrainedTokenizerFast

    from llmops.core.checkpoint import open_checkpoint
    from llmops.core.tiktoken_vocab import write_hf_tokenizer

    with tempfile.TemporaryDirectory(prefix="llmops-tiktoken-") as tmp:
        write_hf_tokenizer(model, Path(tmp), open_checkpoint(root).config)
        return PreTrainedTokenizerFast(tokenizer_file=str(Path(tmp) / "tokenizer.json"),
                                       **json.loads((Path(tmp) / "tokenizer_config.json").read_text()))


def make_runner(spec: RunnerSpec, vocab_only: bool = False) -> LogitsRunner:
    factory = plugins.load(BACKENDS, spec.backend, unknown="unknown runner backend {key!r}; known: {known}",
                           unavailable="the {key} runner is not available in this version ({reason})")
    kwargs: dict[str, Any] = {"n_ctx": spec.n_ctx, "threads": spec.threads, "vocab_only": vocab_only}
    if spec.device != "cpu":
        kwargs["device"] = spec.device
    return factory(spec.path, **kwargs)

