"""The trace writer process: request and swap records in, MLflow traces in the store out.

It runs at the lowest CPU priority once MLflow is imported, and exports each trace itself,
synchronously, so a trace is counted as written only once it is in the store. MLflow's store
calls are wrapped (in this process only) so that a transient error — SQLite's lock held by
another writer, a timeout, a tracking server's 5xx — is tried again with a growing pause for up
to :data:`RETRY_S` seconds, or until the shutdown deadline; what still fails is counted as
failed, never silently dropped. See :mod:`llmops.app.serving.tracing` for the serving side.
"""

from __future__ import annotations

import os
import queue
import sys
import time
from typing import Any

from llmops.app.serving.tracing import RequestRecord, clip
from llmops.registry import traces as T

RETRY_S = 60.0  # how long one trace's write is tried again while the store is busy
TRANSIENT = ("locked", "busy", "timeout", "timed out", "temporar", "unavailable", "connection", "too many requests",
             "operationalerror", " 429", " 502", " 503", " 504", "could not serialize", "deadlock")


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
        _RETRY.failure = None
        try:
            if kind == "request":
                self.request(payload)
            else:
                self.swap(**payload)
        except Exception as exc:  # noqa: BLE001 - a trace is never worth more than a warning
            self._fail(exc)
            return
        if _RETRY.failure is not None:  # MLflow's exporter logged it and went on: not written
            self._fail(_RETRY.failure)
        else:
            self.written += 1

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
        """MLflow's background export, if it was on (the writer process turns it off)."""
        import threading

        t = threading.Thread(target=self._mlflow.flush_trace_async_logging, daemon=True, name="llmops-trace-flush")
        t.start()
        t.join(timeout)
        return not t.is_alive()


def _stderr(message: str) -> None:
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()


def transient(exc: BaseException) -> bool:
    """Whether a store's error says "not now" rather than "never" (a lock, a timeout, a 5xx)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(t in text for t in TRANSIENT)


class _Retry:
    """The writer process's retries of MLflow's store calls (class-level wrappers of its
    ``TracingClient``): a transient error is tried again, with a growing pause, until
    :data:`RETRY_S` has passed or the shutdown deadline comes; what finally fails is noted in
    ``failure`` (MLflow's exporter catches it and only logs)."""

    def __init__(self) -> None:
        self.failure: BaseException | None = None
        self.deadline = float("inf")  # wall clock: the writer's own deadline, once the server stops
        self.retried: Any = None  # a shared counter of the tries made again

    def install(self) -> None:
        from mlflow.tracing.client import TracingClient

        for name in ("start_trace", "log_spans"):
            fn = getattr(TracingClient, name, None)
            if fn is not None and not getattr(fn, "_llmops_retry", False):
                setattr(TracingClient, name, self._wrap(fn))

    def _wrap(self, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            pause, give_up = 0.05, min(time.monotonic() + RETRY_S, time.monotonic() + self.deadline - time.time())
            while True:
                try:
                    return fn(*args, **kwargs)
                except NotImplementedError:
                    raise
                except Exception as exc:  # noqa: BLE001 - transient ones are tried again, the rest noted
                    if not transient(exc) or time.monotonic() + pause > give_up:
                        self.failure = exc
                        raise
                    if self.retried is not None:
                        with self.retried.get_lock():
                            self.retried.value += 1
                    time.sleep(pause)
                    pause = min(pause * 2, 2.0)

        call._llmops_retry = True  # type: ignore[attr-defined]
        return call


_RETRY = _Retry()


def writer_main(q, tracking_uri: str, experiment_id: str, parent: int, written, failed, queued,  # noqa: ANN001
                 sqlite: bool, stop_at, retried) -> None:  # noqa: ANN001
    """The writer process: lowest CPU priority, records from ``q`` until the server sets
    ``stop_at`` (a wall-clock deadline) and the queue is empty or the deadline has passed (or
    the server is gone)."""
    import signal

    # The server decides when to stop (it drains the queue first): a Ctrl-C or a stop sent to
    # the whole process group must not end the writer before that.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # each trace written here and now, so that it is counted only once it is in the store
    os.environ["MLFLOW_ENABLE_ASYNC_TRACE_LOGGING"] = "false"
    import logging

    # MLflow's store errors (a locked database, with a traceback, at every try) are this writer's
    # to retry and to count; it reports them in one line
    logging.getLogger("mlflow").setLevel(logging.CRITICAL)
    # MLflow is imported at the server's priority (seconds of CPU once, while the server loads its
    # model anyway): at the lowest one, on a busy machine, the writer could still be importing
    # when the first traces are due
    writer = TraceWriter(tracking_uri, experiment_id, _stderr)
    _RETRY.retried = retried
    _RETRY.install()
    try:  # the store's connection and tables, made now too
        writer._mlflow.MlflowClient(tracking_uri).get_experiment(experiment_id)
    except Exception:  # noqa: BLE001, S110 - the first trace's write reports what is wrong
        pass
    priority = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.nice(19)
    except OSError:
        pass
    draining = False
    while True:
        deadline = stop_at.value
        if deadline and not draining:
            draining = True
            _RETRY.deadline = deadline
            try:  # nothing is served any more: write at the priority the server had, where allowed
                os.setpriority(os.PRIO_PROCESS, 0, priority)
            except OSError:
                pass
        if draining and time.time() >= deadline:
            break
        try:
            item = q.get(timeout=0.2 if draining else 1.0)
        except queue.Empty:
            if draining:
                break
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
