"""ONNX folders in onnxruntime-genai, one request at a time through its ``Generator``
(batched through its ``Engine``: :mod:`llmops.app.serving.onnx_batch`)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmops.app.serving.engines import (
    Generation,
    GenParams,
    NoChatTemplate,
    Observer,
    Prompt,
)
from llmops.app.serving.textout import LogprobTrace
from llmops.core.errors import LLMOpsError


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
                 device: str = "cpu", overlay: dict[str, Any] | None = None) -> None:
        import numpy as np
        import onnxruntime  # noqa: F401 - onnxruntime-genai finds its runtime through the loaded module
        import onnxruntime_genai as og

        from llmops.core.genai_config import check_folder

        folder = Path(folder)
        # before onnxruntime-genai reads it: the file can name native libraries and paths out of the folder
        genai = check_folder(folder)
        self.folder = folder
        self._og, self._np = og, np
        config = og.Config(str(folder))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
        if overlay:
            config.overlay(json.dumps(overlay))
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
        self.n_vocab = int(genai.get("model", {}).get("vocab_size") or 0)
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

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        self.tok.update_options(add_special_tokens="true" if add_special else "false")
        try:
            return [int(t) for t in self.tok.encode(text)]
        finally:
            self.tok.update_options(add_special_tokens="true")

    def piece(self, token: int) -> bytes:
        return self.tok.decode(self._np.asarray([int(token)], dtype=self._np.int32)).encode("utf-8")

    def tokenizer_info(self) -> dict[str, Any]:
        """From the folder's ``tokenizer_config.json`` (a name inside the folder, checked with it)."""
        try:
            cfg = json.loads((self.folder / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            cfg = {}

        def text(v: Any) -> str | None:
            return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None

        template = cfg.get("chat_template")
        if not template and (self.folder / "chat_template.jinja").is_file():
            template = (self.folder / "chat_template.jinja").read_text()
        return {"eos_token": text(cfg.get("eos_token")), "bos_token": text(cfg.get("bos_token")),
                "pad_token": text(cfg.get("pad_token")), "add_bos_token": bool(cfg.get("add_bos_token", False)),
                "chat_template": template, "vocab_size": self.n_vocab, "model_max_length": self.n_ctx,
                "tokenizer_class": cfg.get("tokenizer_class")}

    def generate(self, prompt: Prompt, params: GenParams, cancel: threading.Event, out: Generation,
                 observer: Observer | None = None) -> Iterator[str]:
        og, np = self._og, self._np
        gp = og.GeneratorParams(self.model)
        opts: dict[str, Any] = {"max_length": len(prompt.tokens) + max(params.max_tokens, 1),
                                "do_sample": params.temperature > 0}
        if params.temperature > 0:
            opts.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.seed is not None:
            opts["random_seed"] = int(params.seed)
        gp.set_search_options(**opts)
        gen = og.Generator(self.model, gp)
        stops = _StopText(list(params.stop) + list(prompt.stop))
        trace = out.logprobs
        if params.logprobs is not None and trace is None:
            trace = out.logprobs = LogprobTrace(params.logprobs)
        try:
            gen.append_tokens(np.asarray(prompt.tokens, dtype=np.int32))
            if trace is not None and params.echo:
                rows = gen.get_output("logits")[0]  # every prompt position: the row at i predicts token i + 1
                trace.first(prompt.tokens[0])
                trace.add_rows(prompt.tokens[1:], rows[:len(prompt.tokens) - 1])
            if params.max_tokens <= 0:
                out.finish_reason = "length"
                return
            stream = self.tok.create_stream()
            while not gen.is_done():
                if cancel.is_set():
                    out.cancelled = True
                    out.finish_reason = "cancelled"
                    return
                gen.generate_next_token()
                if observer is not None:
                    observer.step(1)
                tok = int(gen.get_next_tokens()[0])
                if out.first_token_at is None:
                    out.first_token_at = time.perf_counter()
                if trace is not None:  # the logits this token was drawn from
                    trace.add(tok, gen.get_output("logits")[0, -1])
                if tok in self.eos or tok in prompt.stop_ids:
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
