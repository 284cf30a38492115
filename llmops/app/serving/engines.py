"""What runs a model for ``llmops serve``: engines, the jobs they take, and opening one.

An engine takes :class:`Job` s (a tokenized prompt, sampling parameters, a :class:`Sink` for
its text) and runs them on a thread of its own, calling the sink from that thread. How many it
runs at once is the engine's business:

* GGUF: :class:`llmops.app.serving.batching.LlamaBatchEngine`, continuous batching over
  llama.cpp's batch API (several sequences in one ``llama_decode``; a new request joins the
  running batch between two decode steps). ``--parallel 1`` decodes one sequence at a time.
* ONNX: onnxruntime-genai, one request at a time through its ``Generator``
  (:class:`SerialEngine` around :class:`~llmops.app.serving.onnx_engine.OnnxGenaiEngine`), or
  ``--parallel N`` batches through its ``Engine`` (static batching on CPU).

Token counts are the model's tokenizer's. Sampling is llama-cpp-python's (and
onnxruntime-genai's) own: the same chain, the same defaults, greedy when temperature is 0.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llmops.app.serving.textout import LogprobTrace
from llmops.core.errors import LLMOpsError

MAX_PARALLEL = 8  # llama-server's measured gain on a 2-core CPU flattens out around here
ONNX_PARALLEL = 4  # onnxruntime-genai's engine, static batching on CPU: its measured gain at 4


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
    logprobs: int | None = None  # report log probabilities, with this many alternatives per position
    echo: bool = False  # ... of the prompt's tokens too (the prompt itself is not returned as text here)


@dataclass
class Prompt:
    """Token ids to generate from, with the stop sequences and stop tokens their template adds."""

    tokens: list[int]
    stop: list[str] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()


@dataclass
class Generation:
    """What one generation did, filled in by the engine while it runs."""

    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_at: float | None = None  # time.perf_counter() of the first sampled token
    cancelled: bool = False
    queued_at: float | None = None  # handed to the engine
    started_at: float | None = None  # given a sequence slot (the end of its wait in the queue)
    cached_tokens: int = 0  # prompt tokens found in the KV cache (not decoded again)
    logprobs: LogprobTrace | None = None


class Sink(Protocol):
    """Where a job's output goes; called from the engine's thread."""

    def text(self, piece: str) -> None: ...

    def done(self, error: BaseException | None) -> None: ...


@dataclass(eq=False)  # a job is itself, not its fields: it is kept in sets
class Job:
    prompt: Prompt
    params: GenParams
    sink: Sink
    cancel: threading.Event = field(default_factory=threading.Event)
    out: Generation = field(default_factory=Generation)


class Observer:
    """What engines report for ``/metrics``; this one records nothing."""

    def step(self, sequences: int) -> None:
        """One decode step ran with this many sequences in its batch."""

    def started(self, job: Job) -> None:
        """A job left the queue for a slot (``out.queued_at`` → ``out.started_at``)."""


class Engine(Protocol):
    backend: str
    n_ctx: int  # tokens one sequence may hold (prompt and completion)
    parallel: int  # sequences decoded at once

    def chat_prompt(self, messages: list[dict[str, str]]) -> Prompt: ...

    def text_prompt(self, text: str) -> Prompt: ...

    def tokenize(self, text: str, add_special: bool) -> list[int]: ...

    def piece(self, token: int) -> bytes: ...

    def tokenizer_info(self) -> dict[str, Any]: ...

    @property
    def n_vocab(self) -> int: ...

    def call(self, fn: Callable[[], Any]) -> Future: ...

    def submit(self, job: Job) -> None: ...

    def close(self) -> None: ...


def finish(job: Job, reason: str | None, error: BaseException | None = None) -> None:
    """End a job: its finish reason (``cancelled`` when its client left), then the sink."""
    out = job.out
    if job.cancel.is_set() and error is None and reason not in ("stop", "length"):
        out.cancelled, reason = True, "cancelled"
    out.finish_reason = out.finish_reason or reason
    try:
        job.sink.done(error)
    except Exception:  # noqa: BLE001, S110 - a sink that fails must not take the engine with it
        pass


class ModelTokenizer:
    """The tokenizer half of an engine, answered by the model it wraps (``self.inner``): every
    engine, serial or batching, tokenizes and renders prompts the same way, whatever decodes."""

    inner: Any

    @property
    def n_vocab(self) -> int:
        return self.inner.n_vocab

    def chat_prompt(self, messages: list[dict[str, str]]) -> Prompt:
        return self.inner.chat_prompt(messages)

    def text_prompt(self, text: str) -> Prompt:
        return self.inner.text_prompt(text)

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.inner.tokenize(text, add_special)

    def piece(self, token: int) -> bytes:
        return self.inner.piece(token)

    def tokenizer_info(self) -> dict[str, Any]:
        return self.inner.tokenizer_info()


class BatchLoop:
    """The stop of an engine whose one loop thread owns the model and takes jobs from
    ``_incoming`` under ``_cv``: close (finish what was handed in), join, cut (cancel it all);
    the loop itself reads ``_closing`` and the jobs' cancel flags."""

    _cv: threading.Condition
    _closing: bool
    _incoming: Any  # a deque of Job
    _thread: threading.Thread

    def _running_jobs(self) -> list[Job]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop once the jobs already handed in have ended, then free the model."""
        with self._cv:
            self._closing = True
            self._cv.notify()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def cut(self) -> None:
        """Cancel every job, running or queued (shutdown past its grace)."""
        with self._cv:
            for job in [*self._incoming, *self._running_jobs()]:
                job.cancel.set()
            self._cv.notify()


class SerialEngine(ModelTokenizer):
    """An engine that runs one job at a time to the end, on one worker thread: a runtime whose
    ``generate(prompt, params, cancel, out)`` yields text pieces (onnxruntime-genai's
    ``Generator``). The runtime is not thread-safe, so tokenizing runs on the same thread."""

    def __init__(self, inner: Any, observer: Observer | None = None, name: str = "llmops-engine") -> None:
        self.inner = inner
        self.backend = inner.backend
        self.n_ctx = inner.n_ctx
        self.parallel = 1
        self.observer = observer or Observer()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._jobs: set[Job] = set()  # handed in and not ended

    def call(self, fn: Callable[[], Any]) -> Future:
        return self._executor.submit(fn)

    def submit(self, job: Job) -> None:
        job.out.queued_at = time.perf_counter()
        self._jobs.add(job)
        self._executor.submit(self._run, job)

    def cut(self) -> None:
        """Cancel every job, running or queued (a stop past its grace)."""
        for job in list(self._jobs):
            job.cancel.set()

    def _run(self, job: Job) -> None:
        job.out.started_at = time.perf_counter()
        self.observer.started(job)
        try:
            if job.cancel.is_set():
                finish(job, "cancelled")
                return
            try:
                for piece in self.inner.generate(job.prompt, job.params, job.cancel, job.out, self.observer):
                    job.sink.text(piece)
            except BaseException as exc:  # noqa: BLE001 - reported to the request, the worker goes on
                finish(job, None, exc)
                return
            finish(job, job.out.finish_reason or "length")
        finally:
            self._jobs.discard(job)

    def close(self) -> None:
        """Unload after the work already queued (the worker thread owns the runtime)."""
        self._executor.submit(self.inner.close)
        self._executor.shutdown(wait=False)


def run_to_end(engine: Engine, prompt: Prompt, params: GenParams, timeout: float) -> tuple[str, Generation]:
    """One job through ``engine``, waited for: its text and what it did (the probe; tests)."""
    done = threading.Event()
    parts: list[str] = []
    failure: list[BaseException] = []

    class _Collect:
        def text(self, piece: str) -> None:
            parts.append(piece)

        def done(self, error: BaseException | None) -> None:
            if error is not None:
                failure.append(error)
            done.set()

    job = Job(prompt, params, _Collect())
    engine.submit(job)
    if not done.wait(timeout):
        job.cancel.set()
        raise LLMOpsError(f"no answer within {timeout:.0f} s")
    if failure:
        raise failure[0]
    return "".join(parts), job.out


def default_parallel(n_ctx: int, kv_bytes_per_token: int | None) -> int:
    """Sequences to decode at once when ``--parallel`` is not given: up to :data:`MAX_PARALLEL`,
    fewer where their KV cache (``n_ctx`` tokens each) would take more than a quarter of the
    memory available now."""
    if not kv_bytes_per_token:
        return MAX_PARALLEL
    from llmops.core.procfs import kib_field

    avail = (kib_field("/proc/meminfo", "MemAvailable") or 0) * 1024
    if not avail:
        return MAX_PARALLEL
    return max(1, min(MAX_PARALLEL, int(avail // 4 // (n_ctx * kv_bytes_per_token))))


def open_engine(path: str | Path, fmt: str | None, *, n_ctx: int, threads: int | None, device: str,
                parallel: int | None = None, observer: Observer | None = None, name: str = "model") -> Engine:
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
        from llmops.app.serving.batching import LlamaBatchEngine

        return LlamaBatchEngine(p, n_ctx=n_ctx, threads=threads, device=device, parallel=parallel,
                                observer=observer, name=name)
    if fmt == "onnx":
        if p.is_file():
            p = p.parent
        from llmops.app.serving.onnx_batch import OnnxBatchEngine
        from llmops.app.serving.onnx_engine import OnnxGenaiEngine

        if (parallel or ONNX_PARALLEL) > 1:
            return OnnxBatchEngine(p, n_ctx=n_ctx, threads=threads, device=device, parallel=parallel or ONNX_PARALLEL,
                                   observer=observer, name=name)
        return SerialEngine(OnnxGenaiEngine(p, n_ctx=n_ctx, threads=threads, device=device), observer,
                            name=f"llmops-{name}")
    raise LLMOpsError(f"{path}: llmops serve runs GGUF files (llama.cpp) and ONNX folders (onnxruntime-genai), "
                      f"not {fmt}; convert it first (llmops convert ... --to gguf-q4 or onnx-int4)")


def __getattr__(name: str) -> Any:
    # the ONNX engine lives in its own module (importing it loads onnxruntime); reachable here too
    if name == "OnnxGenaiEngine":
        from llmops.app.serving.onnx_engine import OnnxGenaiEngine

        return OnnxGenaiEngine
    raise AttributeError(name)
