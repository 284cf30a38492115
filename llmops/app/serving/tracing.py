"""Every request an MLflow trace, linked to the version that answered; every swap one too.

Written with MLflow's tracing API (``mlflow.start_span_no_context`` with the request's own
start time, ended at its last byte), into the store's experiment, with the version's
LoggedModel as the trace's ``mlflow.modelId``; MLflow's own export queue writes them. The
names a trace carries are ``llmops.registry.traces``', which reads them back for
``llmops monitor``.

MLflow builds and exports traces on threads of the process that makes them, and writing one
to a SQL store costs tens of milliseconds of Python: in the serving process that competes
for the interpreter lock and the cores with generation. So the server only queues a small
record of each finished request (a bounded ``multiprocessing`` queue: when it is full the
record is dropped and counted, never waited for), and a writer process at the lowest CPU
priority turns the records into MLflow traces, with whatever CPU generation leaves idle.
"""

from __future__ import annotations

import os
import queue
import sys
import time
from dataclasses import dataclass
from typing import Any

from llmops.registry import traces as T

MAX_TEXT = 4000  # characters of one text (a message, a prompt, the output) a trace keeps
MAX_INPUT_TEXT = 16000  # characters of all of one request's messages together
MAX_QUEUE_BYTES = 32 << 20  # records waiting for the writer, by their size, not only their number


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """Text as a trace keeps it: the first ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more characters)"


def bound_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """A request's messages as its trace keeps them: each clipped, and all of them within
    ``MAX_INPUT_TEXT`` characters (the first ones; the rest counted), so a trace's size is
    bounded by this module, not by the request body a client chose."""
    out: list[dict[str, str]] = []
    used = 0
    for i, m in enumerate(messages):
        room = min(MAX_TEXT, MAX_INPUT_TEXT - used)
        if room <= 0:
            out.append({"role": "llmops", "content": f"({len(messages) - i} more messages not kept)"})
            break
        content = clip(m["content"], room)
        used += len(content)
        out.append({"role": m["role"], "content": content})
    return out


def record_bytes(r: "RequestRecord") -> int:
    """About what a record costs in the queue and the writer: its texts (everything else is a
    few numbers)."""
    return 512 + len(repr(r.inputs)) + len(r.output) + len(r.error or "")


@dataclass
class RequestRecord:
    """One request as the server saw it (``time.perf_counter`` seconds, except the wall clock start)."""

    endpoint: str  # chat.completions or completions
    start_ns: int  # wall clock at arrival
    t_arrival: float
    name: str
    version: str
    alias: str | None
    logged_model_id: str | None
    t_acquired: float | None = None
    acquired_ms: int | None = None
    t_slot: float | None = None  # the worker thread started on it
    t_first: float | None = None
    t_end: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    status: str = T.STATUS_OK
    http_status: int = 200
    error: str | None = None
    stream: bool = False
    inputs: Any = None
    output: str = ""

    def ms(self, a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else (b - a) * 1000.0

    @property
    def latency_ms(self) -> float | None:
        return self.ms(self.t_arrival, self.t_end)

    @property
    def ttft_ms(self) -> float | None:
        return self.ms(self.t_arrival, self.t_first)

    @property
    def generation_ms(self) -> float | None:
        return self.ms(self.t_slot, self.t_end)

    @property
    def tokens_per_s(self) -> float | None:
        g = self.generation_ms
        return (self.completion_tokens or 0) / (g / 1000.0) if g and self.completion_tokens else None


class TraceWriter:
    """Records to MLflow traces (runs in the writer process; ``inline`` tests use it directly)."""

    def __init__(self, tracking_uri: str, experiment_id: str, log) -> None:  # noqa: ANN001 - a log function
        import mlflow
        from mlflow.entities import SpanType
        from mlflow.tracing.constant import SpanAttributeKey, TraceMetadataKey

        mlflow.set_tracking_uri(tracking_uri)
        self._mlflow = mlflow
        self._span_types = {"chat.completions": SpanType.CHAT_MODEL, "completions": SpanType.LLM}
        self._usage_key = SpanAttributeKey.CHAT_USAGE
        self._model_id_key = TraceMetadataKey.MODEL_ID
        self.experiment_id = experiment_id
        self.log = log
        self.written = 0
        self.failed = 0
        self._warned = False

    def _fail(self, exc: BaseException) -> None:
        self.failed += 1
        if not self._warned:
            self._warned = True
            self.log(f"warning: could not write a trace ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                     "serving goes on (this warning is shown once)")

    def write(self, kind: str, payload: Any) -> None:
        try:
            if kind == "request":
                self.request(payload)
            else:
                self.swap(**payload)
            self.written += 1
        except Exception as exc:  # noqa: BLE001 - a trace is never worth more than a warning
            self._fail(exc)

    def request(self, r: RequestRecord) -> None:
        figures = {
            T.META_LATENCY_MS: r.latency_ms, T.META_TTFT_MS: r.ttft_ms, T.META_QUEUE_MS: r.ms(r.t_arrival, r.t_slot),
            T.META_GENERATION_MS: r.generation_ms, T.META_PROMPT_TOKENS: r.prompt_tokens,
            T.META_COMPLETION_TOKENS: r.completion_tokens, T.META_TOKENS_PER_S: r.tokens_per_s,
            T.META_ACQUIRED_MS: r.acquired_ms, T.META_HTTP_STATUS: r.http_status,
        }
        metadata = {k: (f"{v:.3f}" if isinstance(v, float) else str(v)) for k, v in figures.items() if v is not None}
        if r.logged_model_id:
            metadata[self._model_id_key] = r.logged_model_id
        if r.error:
            metadata[T.META_ERROR] = r.error[:500]
        tags = {T.TAG_KIND: T.KIND_REQUEST, T.TAG_MODEL: r.name, T.TAG_VERSION: r.version, T.TAG_ALIAS: r.alias or "",
                T.TAG_STATUS: r.status, T.TAG_ENDPOINT: r.endpoint}
        attributes = {"llmops.stream": r.stream, "llmops.finish_reason": r.finish_reason or "",
                      **{k: v for k, v in figures.items() if v is not None and k != T.META_ACQUIRED_MS}}
        span = self._mlflow.start_span_no_context(
            r.endpoint, span_type=self._span_types.get(r.endpoint, "LLM"), inputs=r.inputs, attributes=attributes,
            tags=tags, metadata=metadata, experiment_id=self.experiment_id, start_time_ns=r.start_ns)
        if r.prompt_tokens is not None:
            pt, ct = r.prompt_tokens, r.completion_tokens or 0
            span.set_attribute(self._usage_key, {"input_tokens": pt, "output_tokens": ct, "total_tokens": pt + ct})
        end_ns = r.start_ns + int(((r.t_end if r.t_end is not None else r.t_arrival) - r.t_arrival) * 1e9)
        outputs = {"text": clip(r.output), "finish_reason": r.finish_reason}  # clipped again: inline use
        span.end(outputs=outputs, status="OK" if r.status in (T.STATUS_OK, T.STATUS_CANCELLED) else "ERROR",
                 end_time_ns=end_ns)

    def swap(self, *, name: str, alias: str, from_version: str | None, to_version: str, ok: bool, seconds: float,
             error: str | None, logged_model_id: str | None, at_ns: int) -> None:
        metadata = {T.META_FROM_VERSION: from_version or "", T.META_TO_VERSION: to_version, T.META_LOAD_S: f"{seconds:.3f}"}
        if error:
            metadata[T.META_ERROR] = error[:500]
        if ok and logged_model_id:
            metadata[self._model_id_key] = logged_model_id
        tags = {T.TAG_KIND: T.KIND_SWAP, T.TAG_MODEL: name, T.TAG_VERSION: to_version, T.TAG_ALIAS: alias,
                T.TAG_STATUS: T.SWAP_OK if ok else T.SWAP_FAILED}
        span = self._mlflow.start_span_no_context(
            "swap", span_type="UNKNOWN", inputs={"alias": f"models:/{name}@{alias}", "from_version": from_version,
                                                "to_version": to_version},
            tags=tags, metadata=metadata, experiment_id=self.experiment_id, start_time_ns=at_ns - int(seconds * 1e9))
        span.end(outputs={"ok": ok, "error": error}, status="OK" if ok else "ERROR", end_time_ns=at_ns)

    def flush(self, timeout: float) -> bool:
        import threading

        t = threading.Thread(target=self._mlflow.flush_trace_async_logging, daemon=True, name="llmops-trace-flush")
        t.start()
        t.join(timeout)
        return not t.is_alive()


def _stderr(message: str) -> None:
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()


def _writer_main(q, tracking_uri: str, experiment_id: str, parent: int, written, failed, queued, sqlite: bool) -> None:  # noqa: ANN001
    """The writer process: lowest CPU priority, records from ``q`` until ``None`` (or the parent is gone)."""
    import signal

    # The server decides when to stop (it drains the queue first): a Ctrl-C or a stop sent to
    # the whole process group must not end the writer before that.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.nice(19)
    except OSError:
        pass
    # A burst of requests outruns the store for a while: MLflow's own queue holds it (bounded;
    # each trace is at most a few tens of kB, see bound_messages).
    os.environ.setdefault("MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE", "2000")
    if sqlite:
        # one SQLite file takes one writer at a time: a few export threads, not MLflow's ten
        os.environ.setdefault("MLFLOW_ASYNC_TRACE_LOGGING_MAX_WORKERS", "2")
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    writer = TraceWriter(tracking_uri, experiment_id, _stderr)
    while True:
        try:
            item = q.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                break  # the server died without saying goodbye
            continue
        if item is None:
            break
        kind, payload, size = item
        writer.write(kind, payload)
        written.value, failed.value = writer.written, writer.failed
        with queued.get_lock():
            queued.value -= size
    if not writer.flush(120.0):
        _stderr("warning: some traces were still being written when the trace writer stopped")


class Tracer:
    """The serving side: queues request and swap records for the writer process (or does
    nothing, with ``enabled=False``)."""

    def __init__(self, store, enabled: bool, log, *, max_queue: int = 10000,  # noqa: ANN001 - Store, a log function
                 max_queue_bytes: int = MAX_QUEUE_BYTES) -> None:
        self.enabled = enabled
        self.max_queue_bytes = max_queue_bytes
        self.log = log
        self.dropped = 0
        self._warned_full = False
        self._proc = None
        if not enabled:
            return
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._q = ctx.Queue(maxsize=max_queue)
        self._written = ctx.Value("q", 0)
        self._failed = ctx.Value("q", 0)
        self._queued = ctx.Value("q", 0)  # bytes of the records not yet written
        settings = store.settings
        self._proc = ctx.Process(
            target=_writer_main, name="llmops-trace-writer", daemon=True,
            args=(self._q, settings.tracking_uri, store.experiment_id, os.getpid(), self._written, self._failed,
                  self._queued, settings.is_sqlite and settings.tracking_is_local_db))
        self._proc.start()

    @property
    def written(self) -> int:
        return int(self._written.value) if self.enabled else 0

    @property
    def failed(self) -> int:
        return int(self._failed.value) if self.enabled else 0

    @property
    def queued_bytes(self) -> int:
        return int(self._queued.value) if self.enabled else 0

    def _put(self, kind: str, payload: Any, size: int) -> None:
        if self._proc is None:
            return  # closed
        try:
            with self._queued.get_lock():
                if self._queued.value + size > self.max_queue_bytes:
                    raise queue.Full
                self._q.put_nowait((kind, payload, size))
                self._queued.value += size
        except queue.Full:
            self.dropped += 1
            if not self._warned_full:
                self._warned_full = True
                self.log("warning: the trace queue is full (the store writes more slowly than requests arrive): "
                         "traces are dropped until it drains (this warning is shown once)")

    def request(self, r: RequestRecord) -> None:
        if self.enabled:
            r.output = clip(r.output)
            r.error = r.error[:500] if r.error else r.error
            self._put("request", r, record_bytes(r))

    def swap(self, *, name: str, alias: str, from_version: str | None, to_version: str, ok: bool, seconds: float,
             error: str | None, logged_model_id: str | None) -> None:
        if self.enabled:
            self._put("swap", {"name": name, "alias": alias, "from_version": from_version, "to_version": to_version,
                                "ok": ok, "seconds": seconds, "error": error, "logged_model_id": logged_model_id,
                                "at_ns": time.time_ns()}, 1024 + len(error or ""))

    def flush(self, timeout: float = 60.0) -> bool:
        """Stop the writer once it has written what is queued (at most ``timeout`` seconds)."""
        if not self.enabled or self._proc is None:
            return True
        try:
            self._q.put(None, timeout=5)
        except queue.Full:
            pass
        self._proc.join(timeout)
        ok = not self._proc.is_alive()
        if not ok:
            self._proc.kill()
            self._proc.join(5)
        self.close()
        return ok

    def close(self) -> None:
        """Let go of the queue without waiting on it. A queue's feeder thread is joined when the
        interpreter exits; with the writer gone, records still in its pipe would block that join
        (and the process) forever, so whatever the writer did not take is abandoned here."""
        if not self.enabled:
            return
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._proc = None
        self._q.cancel_join_thread()
        self._q.close()
