"""A GGUF file loaded through llama-cpp-python's wrappers, and its tokenizer as a server uses it.

Everything here reads the model and its vocabulary and nothing else, so it may be called
from any thread while the batch loop decodes (llama.cpp's own server tokenizes on its HTTP
threads the same way): prompts as llama-cpp-python builds them (a chat template rendered by
its ``Jinja2ChatFormatter`` from the GGUF's ``tokenizer.chat_template``; a text prompt with
BOS where the vocabulary wants one), and tokens back to bytes.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Any

from llmops.app.serving.engines import NoChatTemplate, Prompt
from llmops.core.errors import LLMOpsError

_LOG_CALLBACK: Any = None


def _quiet_log(llama_cpp: Any) -> None:
    """llama.cpp's log: errors only (as ``Llama(verbose=False)`` has it), less the one about a
    context past the training length, which a unified KV cache for several sequences always is
    (each sequence is kept within it here)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user_data: Any) -> None:
        if level == 3 and b"possible training context overflow" not in text:
            sys.stderr.write(text.decode("utf-8", errors="replace"))
            sys.stderr.flush()

    _LOG_CALLBACK = callback  # kept: llama.cpp holds only the pointer
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def train_context(path: str | Path) -> int | None:
    """``{arch}.context_length`` of a GGUF, read by llama.cpp from the header alone (the model
    loaded vocabulary-only: no weights, no context)."""
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


class LlamaModelFile:
    """The weights (shared by every sequence) and the tokenizer of one GGUF."""

    def __init__(self, path: str | Path, *, device: str) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaModel
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from llmops.benchmarks.runner_llamacpp import extra_bufts_ok

        if device == "cuda" and not llama_cpp.llama_supports_gpu_offload():
            raise LLMOpsError("this llama-cpp-python was built without GPU offload: reinstall it with CUDA "
                              "(CMAKE_ARGS=-DGGML_CUDA=on) or serve with --device cpu")
        if device not in ("cpu", "cuda"):
            raise LLMOpsError(f"unknown device {device!r}: choose cpu or cuda")
        _quiet_log(llama_cpp)
        self.lib = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = -1 if device == "cuda" else 0
        params.use_extra_bufts = extra_bufts_ok()  # see runner_llamacpp: the CPU repack kernels, not on AMX
        try:
            self.model = LlamaModel(path_model=str(path), params=params, verbose=False)
        except ValueError as e:
            raise LLMOpsError(f"llama.cpp cannot load {path}: {e}") from None
        self.vocab = self.model.vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(self.model.n_ctx_train())
        self.metadata = self.model.metadata()
        self.bos_id, self.eos_id = int(self.model.token_bos()), int(self.model.token_eos())
        self.template = self.metadata.get("tokenizer.chat_template")
        self._formatter = None
        if self.template:
            # as Llama.__init__ builds its "chat_template.default" handler from the same metadata
            self._formatter = Jinja2ChatFormatter(
                template=self.template,
                eos_token=self.model.token_get_text(self.eos_id) if self.eos_id != -1 else "",
                bos_token=self.model.token_get_text(self.bos_id) if self.bos_id != -1 else "",
                stop_token_ids=[self.eos_id],
            )

    def kv_bytes_per_token(self) -> int:
        """Bytes of f16 K and V cache one token takes in every layer."""
        lib, m = self.lib, self.model.model
        n_head = max(1, int(lib.llama_model_n_head(m)))
        head_dim = int(lib.llama_model_n_embd(m)) // n_head
        return 2 * 2 * int(lib.llama_model_n_layer(m)) * int(lib.llama_model_n_head_kv(m)) * head_dim

    # -- prompts ------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict[str, str]]) -> Prompt:
        """As llama-cpp-python's chat handler does: render the template, tokenize with special tokens."""
        if self._formatter is None:
            raise NoChatTemplate("this model's GGUF has no chat template (tokenizer.chat_template): use /v1/completions")
        res = self._formatter(messages=messages)
        stop = [] if not res.stop else [res.stop] if isinstance(res.stop, str) else list(res.stop)
        tokens = self.model.tokenize(res.prompt.encode("utf-8"), add_bos=not res.added_special, special=True)
        return Prompt(tokens, stop, frozenset({self.eos_id}) if self.eos_id != -1 else frozenset())

    def text_prompt(self, text: str) -> Prompt:
        # what create_completion does with a text prompt: BOS where the vocabulary wants one,
        # special-token text kept as text
        return Prompt(self.model.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """As a Hugging Face tokenizer does (``/tokenize``): special-token text is the special
        token; BOS only when asked for and the vocabulary has one."""
        return self.model.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    # -- tokens back ----------------------------------------------------------------------
    def piece(self, token: int, special: bool = True) -> bytes:
        """A token's bytes (special tokens as their text unless ``special`` is False, as
        generated text shows them: not at all)."""
        buf = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, int(token), buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, int(token), buf, -n, 0, special)
        return buf.raw[:max(n, 0)]

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, int(token)))

    def tokenizer_info(self) -> dict[str, Any]:
        def text(tid: int) -> str | None:
            return self.piece(tid).decode("utf-8", errors="replace") if tid >= 0 else None

        return {"eos_token": text(self.eos_id), "bos_token": text(self.bos_id), "pad_token": None,
                "add_bos_token": bool(self.lib.llama_vocab_get_add_bos(self.vocab)),
                "chat_template": self.template, "vocab_size": self.n_vocab, "tokenizer_class": "llama.cpp"}

    def close(self) -> None:
        self.model.close()
