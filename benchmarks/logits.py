"""Logits runners (one per backend) and the child process they run in.

A runner turns token ids into next-token logits. Each backend loads native code
(llama.cpp, torch) that can crash or run out of memory, so evaluation runs the
runner in a *child interpreter*: a segfault or an OOM kill becomes a one-line
:class:`LLMOpsError` in the parent instead of a dead CLI. The child sends back
per-token NLLs, and the scored logits through a ``.npy`` file in a temporary
folder only when a KL-divergence comparison needs them.

Chunking mirrors llama.cpp's ``llama-perplexity`` (its default, non-strided
method), so our numbers are comparable with its output:

1. tokenize the whole text once with the GGUF's tokenizer, adding BOS only if the
   vocabulary's ``add_bos`` flag says so (``common_tokenize(ctx, text, true)``);
2. cut it into ``n_chunk = min(chunks, len // n_ctx)`` windows of ``n_ctx`` tokens;
3. when ``add_bos``, the first token of every window is replaced by BOS;
4. each window is evaluated from an empty KV cache, and only its second half is
   scored: logits at positions ``n_ctx/2 .. n_ctx-2`` predict tokens
   ``n_ctx/2+1 .. n_ctx-1`` (``n_ctx - n_ctx/2 - 1`` tokens per window);
5. perplexity = exp(sum NLL / count) over all scored tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from llmops.errors import LLMOpsError


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

    def tokenize(self, text: str) -> np.ndarray:
        """The ids the artifact's own tokenizer gives ``text`` (BOS first only if it adds one)."""
        ...

    def logits(self, tokens: np.ndarray, first: int = 0, last: int | None = None) -> np.ndarray:
        """[last - first, vocab] float32 logits at positions ``first..last-1`` of one sequence
        evaluated from an empty cache (all positions by default). Perplexity scores only the
        second half of each window, so a runner that can skip the output projection for the
        other positions should."""
        ...


# backend -> "module:Class"; modules are imported only when that backend runs.
BACKENDS: dict[str, str] = {
    "llama.cpp": "llmops.benchmarks.logits:LlamaCppRunner",
    "torch": "llmops.benchmarks.logits:TorchRunner",
    "onnx": "llmops.benchmarks.runner_onnx:OnnxRunner",
    "gptq": "llmops.benchmarks.runner_gptq:GPTQRunner",
}


def backend_for(path: str | Path) -> str:
    """Which runner reads this artifact (from its headers, not its name)."""
    from llmops.artifact_info import describe, is_gguf

    if is_gguf(path):  # the magic is enough; parsing a GGUF's metadata takes seconds
        return "llama.cpp"
    fmt = describe(path).format
    return {"gguf": "llama.cpp", "onnx": "onnx", "gptq": "gptq"}.get(fmt, "torch")


class HFTokenizerMixin:
    """Tokenization with the checkpoint's own Hugging Face tokenizer (torch, ONNX and GPTQ folders)."""

    def _load_tokenizer(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        p = Path(path)
        root = p if p.is_dir() else p.parent
        self.tokenizer = AutoTokenizer.from_pretrained(root)
        probe = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = self.tokenizer.bos_token_id
        self.add_bos = bool(bos is not None and probe and probe[0] == bos)
        self.bos_id = int(bos) if bos is not None else -1

    def tokenize(self, text: str) -> np.ndarray:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return np.asarray(ids, dtype=np.int32)


# ----------------------------------------------------------------------------------------------
# runners


class LlamaCppRunner:
    def __init__(self, path: str, n_ctx: int = 512, threads: int | None = None, vocab_only: bool = False,
                 kv_f32: bool = False, device: str = "cpu") -> None:
        import llama_cpp

        if not Path(path).is_file():
            raise LLMOpsError(f"{path}: no such GGUF file")
        threads = threads or os.cpu_count() or 1
        try:
            with _model_params(use_extra_bufts=_extra_bufts_ok()):
                self.llm = llama_cpp.Llama(
                    model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), logits_all=False,
                    n_threads=threads, n_threads_batch=threads, vocab_only=vocab_only, verbose=False,
                    n_gpu_layers=-1 if device == "cuda" else 0,
                    # llama-perplexity's default ("auto") turns flash attention on wherever the
                    # backend has it, CPU included: the same kernels give the same perplexity, to
                    # the last digit it prints. Its CPU kernel rounds through float16, so a float32
                    # KV cache, asked for to compare with float32 references, goes without it.
                    flash_attn=not kv_f32,
                    **({"type_k": 0, "type_v": 0} if kv_f32 else {}),  # GGML_TYPE_F32 KV cache
                )
        except ValueError as e:
            raise LLMOpsError(f"llama.cpp cannot load {path}: {e}") from None
        self.vocab_size = self.llm.n_vocab()
        vocab = self.llm._model.vocab
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.bos_id = int(llama_cpp.llama_vocab_bos(vocab))

    def tokenize(self, text: str) -> np.ndarray:
        # add_special=True: BOS only if the vocabulary asks for it; specials in the text are plain text
        return np.asarray(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False), dtype=np.int32)

    def logits(self, tokens: np.ndarray, first: int = 0, last: int | None = None) -> np.ndarray:
        """Decode through llama.cpp's batch API directly: ``Llama.eval`` asks for logits at
        every position (or only the last) and copies them twice, while llama-perplexity flags
        only the scored positions, so llama.cpp skips the output projection for the rest."""
        tokens = np.asarray(tokens, dtype=np.int32)
        n = len(tokens)
        last = n if last is None else last
        ctx, batch, n_batch = self.llm._ctx, self.llm._batch, self.llm.n_batch
        ctx.kv_cache_clear()
        out = np.empty((last - first, self.vocab_size), dtype=np.float32)
        row = 0
        for start in range(0, n, n_batch):
            part = tokens[start:start + n_batch]
            batch.set_batch(batch=part.tolist(), n_past=start, logits_all=False)
            flags = batch.batch.logits
            wanted = 0
            for i in range(len(part)):
                want = first <= start + i < last
                flags[i] = want
                wanted += want
            if wanted == 0:  # llama.cpp needs at least one output per batch; computed, not kept
                flags[len(part) - 1] = True
            ctx.decode(batch)
            if wanted:
                got = np.ctypeslib.as_array(ctx.get_logits(), shape=(wanted, self.vocab_size))
                out[row:row + wanted] = got
                row += wanted
        return out

def _extra_bufts_ok() -> bool:
    """Whether to let llama.cpp repack weights into its CPU extra buffer types (see _model_params)."""
    env = os.environ.get("LLMOPS_LLAMA_EXTRA_BUFTS")
    if env in ("0", "1"):
        return env == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "amx_int8" not in f.read()
    except OSError:
        return True


@contextlib.contextmanager
def _model_params(**overrides: Any) -> Iterator[None]:
    """Set llama_model_params fields that llama-cpp-python's Llama() does not expose.

    ``use_extra_bufts``: llama.cpp's CPU "extra" buffer types repack weights for AMX and
    AVX2/AVX512 kernels. The AMX matmul of the llama.cpp bundled with llama-cpp-python
    0.3.36 crashes (SIGSEGV) on quantized weights, so on CPUs with AMX the extra buffer
    types are off (LLMOPS_LLAMA_EXTRA_BUFTS=1/0 forces either way). Logits agree to
    float rounding either way: the weights are the same, only the kernels differ.
    """
    import llama_cpp.llama as ll

    orig = ll.llama_cpp.llama_model_default_params

    def patched() -> Any:
        p = orig()
        for k, v in overrides.items():
            setattr(p, k, v)
        return p

    ll.llama_cpp.llama_model_default_params = patched
    try:
        yield
    finally:
        ll.llama_cpp.llama_model_default_params = orig


class TorchLogitsMixin:
    """Full-sequence logits from a transformers causal LM in ``self.model`` (torch and GPTQ runners)."""

    device: str = "cpu"

    def logits(self, tokens: np.ndarray, first: int = 0, last: int | None = None) -> np.ndarray:
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
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self._load_tokenizer(path)
        if vocab_only:
            self.vocab_size = len(self.tokenizer)
            return
        self.model = load_torch_model(path)
        self.vocab_size = int(self.model.config.vocab_size)



def load_torch_model(path: str) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path)
    if p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin"))):
        return AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
    # bare weights or *.pth: build from config.json and load through the safe loader
    from llmops.converters.checkpoint import open_checkpoint

    ckpt = open_checkpoint(p)
    config = AutoConfig.from_pretrained(ckpt.root)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sd = {n: torch.from_numpy(np.array(ckpt.float32(n))) for n in ckpt.names()}
    model.load_state_dict(sd, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def make_runner(spec: RunnerSpec, vocab_only: bool = False) -> LogitsRunner:
    import importlib

    target = BACKENDS.get(spec.backend)
    if target is None:
        raise LLMOpsError(f"unknown runner backend {spec.backend!r}; known: {', '.join(BACKENDS)}")
    module, _, cls = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise LLMOpsError(f"the {spec.backend} runner is not available in this version ({e})") from None
    kwargs: dict[str, Any] = {"n_ctx": spec.n_ctx, "threads": spec.threads, "vocab_only": vocab_only}
    if spec.device != "cpu":
        kwargs["device"] = spec.device
    return factory(spec.path, **kwargs)


# ----------------------------------------------------------------------------------------------
# perplexity windows


@dataclass
class Windows:
    inputs: np.ndarray  # [n_chunk, n_ctx] token ids fed to the model (BOS substituted when add_bos)
    targets: np.ndarray  # [n_chunk, n_ctx - first - 1] ids scored
    first: int
    n_ctx: int
    n_tokens: int  # tokens in the whole text

    @property
    def n_chunk(self) -> int:
        return int(self.inputs.shape[0])


def make_windows(tokens: np.ndarray, n_ctx: int, chunks: int | None, add_bos: bool, bos_id: int) -> Windows:
    tokens = np.asarray(tokens, dtype=np.int32)
    if len(tokens) < 2 * n_ctx:
        raise LLMOpsError(f"the eval text tokenizes to {len(tokens)} tokens; perplexity with a context of {n_ctx} "
                          f"needs at least {2 * n_ctx}")
    n_max = len(tokens) // n_ctx
    n = n_max if chunks is None or chunks < 0 else min(chunks, n_max)
    first = n_ctx // 2
    inputs = tokens[: n * n_ctx].reshape(n, n_ctx).copy()
    targets = inputs[:, first + 1:].copy()
    if add_bos:
        inputs[:, 0] = bos_id
    return Windows(inputs, targets, first, n_ctx, len(tokens))


# ----------------------------------------------------------------------------------------------
# the child process
#
# A fresh interpreter (subprocess, not multiprocessing) so that it works whatever the caller's
# __main__ is; the job and the reply are small JSON files, bulk data goes through .npy files.


# Cap, in MiB, on what a runner child may allocate once its runtime is imported
# (``llmops bench --max-memory``): a runaway model must not take the machine, or a shared
# CI runner, down with it. Past the cap its allocations fail and the child errors out or
# dies, which the parent reports as one line.
MAX_MEMORY_ENV = "LLMOPS_RUNNER_MAX_MEMORY_MB"
_RUNTIME_MODULES = {"llama.cpp": ("llama_cpp",), "torch": ("torch", "transformers"), "gptq": ("torch", "transformers"),
                    "onnx": ("onnxruntime",)}


def _cap_memory(backend: str) -> None:
    """Import the backend's runtime first (its start-up is not the model's memory), then cap the
    data segment (RLIMIT_DATA: heap and private mappings, not the mapped libraries)."""
    limit = os.environ.get(MAX_MEMORY_ENV)
    if not limit:
        return
    import importlib
    import resource

    for mod in _RUNTIME_MODULES.get(backend, ()):
        importlib.import_module(mod)
    from llmops.benchmarks.procfs import kib_field

    used = kib_field("/proc/self/status", "VmData") or 0
    cap = used + int(float(limit) * 1024 * 1024)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))


def _do_job(job: dict[str, Any]) -> dict[str, Any]:
    spec = RunnerSpec(**job["spec"])
    _cap_memory(spec.backend)
    if job["kind"] == "latency":
        from llmops.benchmarks.latency import measure

        return {"ok": True, **measure(spec, job)}
    if job["kind"] == "tokenize":
        r = make_runner(spec, vocab_only=True)
        text = Path(job["text_file"]).read_text(encoding="utf-8")
        np.save(job["out"], r.tokenize(text))
        return {"ok": True, "add_bos": r.add_bos, "bos_id": r.bos_id, "vocab_size": r.vocab_size}
    runner = make_runner(spec)
    nll = score_windows(runner, np.load(job["inputs"]), np.load(job["targets"]), job["first"], job["last"],
                        job.get("out"))
    np.save(job["nll"], nll)
    return {"ok": True, "vocab_size": runner.vocab_size}


def score_windows(runner: LogitsRunner, inputs: np.ndarray, targets: np.ndarray, first: int, last: int,
                  logits_out: str | Path | None = None) -> np.ndarray:
    """Per-token NLL ``[n_chunk, last - first]`` of each window's scored positions, computed where
    the logits are made; the logits themselves (``[n_chunk, last - first, vocab]`` float32, 50 MB
    a window for a 49k vocabulary) go to ``logits_out`` only when a comparison needs them."""
    from llmops.benchmarks.metrics import token_nll

    keep = None
    if logits_out is not None:
        keep = np.lib.format.open_memmap(logits_out, mode="w+", dtype=np.float32,
                                         shape=(inputs.shape[0], last - first, runner.vocab_size))
    nll = np.empty(targets.shape, dtype=np.float64)
    for i in range(inputs.shape[0]):
        lg = runner.logits(inputs[i], first, last)
        nll[i] = token_nll(lg, targets[i])
        if keep is not None:
            keep[i] = lg
    if keep is not None:
        keep.flush()
        del keep
    return nll


def child_main(job_file: str) -> int:
    job = json.loads(Path(job_file).read_text())
    try:
        reply = _do_job(job)
    except LLMOpsError as e:
        reply = {"ok": False, "error": str(e)}
    except MemoryError:
        reply = {"ok": False, "error": "out of memory"}
    except BaseException as e:  # noqa: BLE001 - reported to the parent as one line
        reply = {"ok": False, "error": traceback.format_exception_only(type(e), e)[-1].strip()}
    Path(job["reply"]).write_text(json.dumps(reply))
    return 0


def run_in_child(job: dict[str, Any], what: str, workdir: str | Path, timeout: float | None = None) -> dict[str, Any]:
    """Run a runner job in a child interpreter; native crashes and OOM kills become LLMOpsError."""
    import subprocess
    import sys

    wd = Path(workdir)
    job = {**job, "reply": str(wd / f"reply-{os.getpid()}-{id(job)}.json")}
    job_file = wd / f"job-{os.getpid()}-{id(job)}.json"
    job_file.write_text(json.dumps(job))
    code = "import sys; from llmops.benchmarks.logits import child_main; sys.exit(child_main(sys.argv[1]))"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(job_file)], cwd=wd, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LLMOpsError(f"{what} timed out after {timeout:.0f}s") from None
    reply_file = Path(job["reply"])
    if reply_file.is_file():
        reply = json.loads(reply_file.read_text())
        if not reply.get("ok"):
            raise LLMOpsError(f"{what} failed: {reply.get('error')}")
        return reply
    tail = [ln for ln in proc.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    raise LLMOpsError(f"{what} {child_exit_reason(proc.returncode, tail)}")


def child_exit_reason(rc: int, stderr_lines: list[str]) -> str:
    """How a child interpreter that sent no reply ended, in words: a signal (a native crash, or
    SIGKILL, which on Linux is usually the OOM killer) or an exit code with its last error line."""
    import signal

    if rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
        return "was killed (out of memory?)" if -rc == signal.SIGKILL else f"crashed ({sig})"
    last = next((t.strip() for t in reversed(stderr_lines)
                 if t.strip() and not t.lstrip().startswith(("File ", "^", "~"))), "")
    return f"exited with code {rc}" + (f": {last[:200]}" if last else "")
