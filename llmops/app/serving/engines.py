"""The runtimes behind ``llmops serve``: llama.cpp for GGUF files, onnxruntime-genai for ONNX folders.

Both take a prompt as token ids and yield text as it is generated; the chat template and the
tokenizer come from the artifact itself (the GGUF's ``tokenizer.chat_template`` through
llama-cpp-python's own ``Jinja2ChatFormatter``, the folder's template through
onnxruntime-genai's ``Tokenizer.apply_chat_template``), so the server's token counts are
the model's tokenizer's.

An engine is not thread-safe: the server calls one from a single worker thread.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llmops.core.errors import LLMOpsError


class NoChatTemplate(LLMOpsError):
    """The artifact carries no chat template: only /v1/completions can serve it."""


@dataclass
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass
class Prompt:
    """Token ids to generate from, with the stop sequences and stopping rule their template adds."""

    tokens: list[int]
    stop: list[str] = field(default_factory=list)
    stopping: Any = None


@dataclass
class Generation:
    """What one generation did, filled in while it runs."""

    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_at: float | None = None  # time.perf_counter() of the first sampled token
    cancelled: bool = False


class Engine(Protocol):
    backend: str
    n_ctx: int

    def chat_prompt(self, messages: list[dict[str, str]]) -> Prompt: ...

    def text_prompt(self, text: str) -> Prompt: ...

    def generate(self, prompt: Prompt, params: GenParams, cancel: threading.Event,
                 out: Generation) -> Iterator[str]: ...

    def close(self) -> None: ...


# -- llama.cpp --------------------------------------------------------------------------------
class LlamaCppEngine:
    """A GGUF file in llama-cpp-python's ``Llama``; generation is its ``create_completion(stream=True)``."""

    backend = "llama.cpp"

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, threads: int | None = None, device: str = "cpu") -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from llmops.benchmarks.runner_llamacpp import _model_params, extra_bufts_ok

        if device == "cuda" and not llama_cpp.llama_supports_gpu_offload():
            raise LLMOpsError("this llama-cpp-python was built without GPU offload: reinstall it with CUDA "
                              "(CMAKE_ARGS=-DGGML_CUDA=on) or serve with --device cpu")
        if device not in ("cpu", "cuda"):
            raise LLMOpsError(f"unknown device {device!r}: choose cpu or cuda")
        self._llama_cpp = llama_cpp
        train = _train_context(path)
        if train and n_ctx > train:
            n_ctx = train  # beyond its training context a model's output degrades; llama.cpp only warns
        kwargs: dict[str, Any] = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
        try:
            with _model_params(use_extra_bufts=extra_bufts_ok()):
                self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                                           n_gpu_layers=-1 if device == "cuda" else 0, verbose=False, **kwargs)
        except ValueError as e:
            raise LLMOpsError(f"llama.cpp cannot load {path}: {e}") from None
        self.n_ctx = self.llm.n_ctx()
        self._vocab = self.llm._model.vocab
        self._orig_generate = self.llm.generate
        template = self.llm.metadata.get("tokenizer.chat_template")
        self._formatter = None
        if template:
            eos_id, bos_id = self.llm.token_eos(), self.llm.token_bos()
            # as Llama.__init__ builds its "chat_template.default" handler from the same metadata
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self.llm._model.token_get_text(eos_id) if eos_id != -1 else "",
                bos_token=self.llm._model.token_get_text(bos_id) if bos_id != -1 else "",
                stop_token_ids=[eos_id],
            )

    def chat_prompt(self, messages: list[dict[str, str]]) -> Prompt:
        """As llama-cpp-python's chat handler does: render the template, tokenize with special tokens."""
        if self._formatter is None:
            raise NoChatTemplate("this model's GGUF has no chat template (tokenizer.chat_template): use /v1/completions")
        res = self._formatter(messages=messages)
        stop = [] if not res.stop else [res.stop] if isinstance(res.stop, str) else list(res.stop)
        tokens = self.llm.tokenize(res.prompt.encode("utf-8"), add_bos=not res.added_special, special=True)
        return Prompt(tokens, stop, res.stopping_criteria)

    def text_prompt(self, text: str) -> Prompt:
        # what create_completion does with a text prompt: BOS where the vocabulary wants one,
        # special-token text kept as text
        return Prompt(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def generate(self, prompt: Prompt, params: GenParams, cancel: threading.Event,
                 out: Generation) -> Iterator[str]:
        """Text pieces of ``create_completion(prompt_ids, stream=True)``.

        The stream carries no token counts, so ``Llama.generate`` is wrapped on this instance
        for the call: every token it samples passes through the wrapper, which counts them as
        create_completion does (an end-of-generation token is not a completion token), notes
        the first token's time, and stops the library's loop at a token boundary when the
        client has gone (``cancel``) or ``max_tokens`` is reached (the library's own check is
        skipped while a multi-byte character is incomplete)."""
        llm, vocab, orig, is_eog = self.llm, self._vocab, self._orig_generate, self._llama_cpp.llama_vocab_is_eog
        limit = params.max_tokens

        def counted(*args: Any, **kwargs: Any) -> Iterator[int]:
            inner = orig(*args, **kwargs)
            try:
                for tok in inner:
                    if out.first_token_at is None:
                        out.first_token_at = time.perf_counter()
                    if is_eog(vocab, tok):
                        yield tok
                        return
                    if cancel.is_set():
                        out.cancelled = True
                        return
                    out.completion_tokens += 1
                    yield tok
                    if out.completion_tokens >= limit:
                        out.finish_reason = "length"
                        return
            finally:
                inner.close()

        stop = list(params.stop) + [s for s in prompt.stop if s not in params.stop]
        llm.generate = counted
        try:
            stream = llm.create_completion(
                prompt=list(prompt.tokens), max_tokens=limit, temperature=params.temperature, top_p=params.top_p,
                stop=stop, seed=params.seed, presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty, stream=True,
                stopping_criteria=prompt.stopping,
            )
            for chunk in stream:
                choice = chunk["choices"][0]
                if choice.get("text"):
                    yield choice["text"]
                if choice.get("finish_reason") and out.finish_reason is None:
                    out.finish_reason = choice["finish_reason"]
        finally:
            llm.generate = orig
        if out.cancelled:
            out.finish_reason = "cancelled"

    def close(self) -> None:
        self.llm.close()


def _train_context(path: str | Path) -> int | None:
    """``{arch}.context_length`` of a GGUF, read by llama.cpp from the header alone (the model
    loaded vocabulary-only through llama-cpp-python's model wrapper: no weights, no context)."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:
        model = LlamaModel(path_model=str(path), params=params, verbose=False)
    except Exception:  # noqa: BLE001 - the full load reports what is wrong with the file
        return None
    try:
        meta = model.metadata()
        raw = meta.get(f"{meta.get('general.architecture', '')}.context_length")
        return int(raw) if raw and str(raw).isdigit() else None
    finally:
        model.close()


# -- onnxruntime-genai ------------------------------------------------------------------------
class _StopText:
    """Stop sequences over streamed text: onnxruntime-genai stops only on end-of-sequence ids, so
    text that may begin a stop sequence is held back until it cannot, and nothing from a stop
    sequence on is emitted (as OpenAI and llama.cpp do)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        self.buf += piece
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [self.buf.find(s) for s in self.stops if s in self.buf]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        cut = max(0, len(self.buf) - self.hold)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class OnnxGenaiEngine:
    """An ONNX decoder folder in onnxruntime-genai (``Model``, ``Tokenizer``, ``Generator``)."""

    backend = "onnxruntime-genai"

    def __init__(self, folder: str | Path, *, n_ctx: int | None = None, threads: int | None = None,
                 device: str = "cpu") -> None:
        import numpy as np
        import onnxruntime_genai as og

        from llmops.core.genai_config import check_folder

        folder = Path(folder)
        # before onnxruntime-genai reads it: the file can name native libraries and paths out of the folder
        genai = check_folder(folder)
        self._og, self._np = og, np
        config = og.Config(str(folder))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
        if device == "cuda":
            config.clear_providers()
            config.append_provider("cuda")
        elif device != "cpu":
            raise LLMOpsError(f"unknown device {device!r}: choose cpu or cuda")
        try:
            self.model = og.Model(config)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own error types
            raise LLMOpsError(f"onnxruntime-genai cannot load {folder}: {e}") from None
        self.tok = og.Tokenizer(self.model)
        ctx = int(genai.get("model", {}).get("context_length") or genai.get("search", {}).get("max_length") or 2048)
        self.n_ctx = min(int(n_ctx), ctx) if n_ctx else ctx
        eos = genai.get("model", {}).get("eos_token_id")
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        try:
            self.eos |= {int(t) for t in self.tok.eos_token_ids}
        except Exception:  # noqa: BLE001, S110 - older tokenizers lack the property; the config names them
            pass

    def chat_prompt(self, messages: list[dict[str, str]]) -> Prompt:
        try:
            text = self.tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001
            raise NoChatTemplate(f"this ONNX folder has no usable chat template ({e}): use /v1/completions") from None
        return Prompt([int(t) for t in self.tok.encode(text)])

    def text_prompt(self, text: str) -> Prompt:
        return Prompt([int(t) for t in self.tok.encode(text)])

    def generate(self, prompt: Prompt, params: GenParams, cancel: threading.Event,
                 out: Generation) -> Iterator[str]:
        og, np = self._og, self._np
        gp = og.GeneratorParams(self.model)
        opts: dict[str, Any] = {"max_length": len(prompt.tokens) + params.max_tokens, "do_sample": params.temperature > 0}
        if params.temperature > 0:
            opts.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.seed is not None:
            opts["random_seed"] = int(params.seed)
        gp.set_search_options(**opts)
        gen = og.Generator(self.model, gp)
        stops = _StopText(params.stop)
        try:
            gen.append_tokens(np.asarray(prompt.tokens, dtype=np.int32))
            stream = self.tok.create_stream()
            while not gen.is_done():
                if cancel.is_set():
                    out.cancelled = True
                    out.finish_reason = "cancelled"
                    return
                gen.generate_next_token()
                tok = int(gen.get_next_tokens()[0])
                if out.first_token_at is None:
                    out.first_token_at = time.perf_counter()
                if tok in self.eos:
                    out.finish_reason = "stop"
                    break
                out.completion_tokens += 1
                text, stopped = stops.feed(stream.decode(tok))
                if text:
                    yield text
                if stopped:
                    out.finish_reason = "stop"
                    return
                if out.completion_tokens >= params.max_tokens:
                    out.finish_reason = "length"
                    break
            rest = stops.flush()
            if rest:
                yield rest
            if out.finish_reason is None:
                out.finish_reason = "length"
        finally:
            del gen

    def close(self) -> None:
        self.tok = None
        self.model = None


def open_engine(path: str | Path, fmt: str | None, *, n_ctx: int, threads: int | None, device: str) -> Engine:
    """The engine for an artifact: GGUF file → llama.cpp, ONNX folder → onnxruntime-genai."""
    p = Path(path)
    if fmt is None or fmt in ("unknown", "file", "folder"):
        from llmops.core.artifact_info import describe

        fmt = describe(p).format
    if fmt == "gguf":
        if p.is_dir():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) != 1:
                raise LLMOpsError(f"{p} holds {len(ggufs)} GGUF files: serve one file")
            p = ggufs[0]
        return LlamaCppEngine(p, n_ctx=n_ctx, threads=threads, device=device)
    if fmt == "onnx":
        if p.is_file():
            p = p.parent
        return OnnxGenaiEngine(p, n_ctx=n_ctx, threads=threads, device=device)
    raise LLMOpsError(f"{path}: llmops serve runs GGUF files (llama.cpp) and ONNX folders (onnxruntime-genai), "
                      f"not {fmt}; convert it first (llmops convert ... --to gguf-q4 or onnx-int4)")
