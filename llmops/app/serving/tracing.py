"""Every request an MLflow trace, linked to the version that answered; every swap one too.

Written with MLflow's tracing API (``mlflow.start_span_no_context`` with the request's own
start time, ended at its last byte), into the store's experiment, with the version's
LoggedModel as the trace's ``mlflow.modelId``. The names a trace carries are
``llmops.registry.traces``', which reads them back for ``llmops monitor``.

MLflow builds and exports traces on threads of the process that makes them, and writing one
to a SQL store costs tens of milliseconds of Python: in the serving process that competes
for the interpreter lock and the cores with generation. So the server only queues a small
record of each finished request (a bounded ``multiprocessing`` queue: when it is full the
record is dropped and counted, never waited for), and a writer process at the lowest CPU
priority turns the records into MLflow traces, with whatever CPU generation leaves idle.

The writer exports each trace itself, synchronously (not through MLflow's background queue,
which drops a trace that meets an error with a warning): a write that meets a busy store
(SQLite's lock held by another writer, a slow or briefly unavailable server) is tried again
with a growing pause, for up to :data:`RETRY_S` seconds, so a trace is written late rather
than lost; only one that still fails is counted as failed (the writer process is
:mod:`llmops.app.serving.trace_writer`). At shutdown the writer gets a
deadline, writes what it can before it, and the server reports how many were not written
(a backlog is reported, never waited on without bound).
"""

from __future__ import annotations

import os
import queue
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


def record_bytes(r: RequestRecord) -> int:
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

class Tracer:
    """The serving side: queues request and swap records for the writer process (or does
    nothing, with ``enabled=False``)."""

    def __init__(self, store, enabled: bool, log, *, max_queue: int = 10000,  # noqa: ANN001 - Store, a log function
                 max_queue_bytes: int = MAX_QUEUE_BYTES) -> None:
        self.enabled = enabled
        self.max_queue_bytes = max_queue_bytes
        self.log = log
        self.dropped = 0  # refused by a full queue
        self.put = 0  # handed to the writer
        self.unwritten = 0  # handed to the writer and not written by the end
        self._warned_full = False
        self._proc = None
        if not enabled:
            return
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._q = ctx.Queue(maxsize=max_queue)
        # what the writer has not taken by the end is counted, never waited for at exit (a writer
        # that died leaves the queue's pipe full, and joining its feeder thread would hang)
        self._q.cancel_join_thread()
        self._written = ctx.Value("q", 0)
        self._failed = ctx.Value("q", 0)
        self._queued = ctx.Value("q", 0)  # bytes of the records not yet written
        self._stop_at = ctx.Value("d", 0.0)
        self._retried = ctx.Value("q", 0)
        settings = store.settings
        from llmops.app.serving.trace_writer import writer_main

        self._proc = ctx.Process(
            target=writer_main, name="llmops-trace-writer", daemon=True,
            args=(self._q, settings.tracking_uri, store.experiment_id, os.getpid(), self._written, self._failed,
                  self._queued, settings.is_sqlite and settings.tracking_is_local_db, self._stop_at, self._retried))
        self._proc.start()
        # the writer ignores SIGTERM (a stop sent to the process group must not cut its drain), so
        # multiprocessing's exit handler, which terminates and then joins it, would wait for ever:
        # one never flushed is ended here first (atexit runs this before that handler)
        import atexit

        atexit.register(self.close)

    @property
    def written(self) -> int:
        return int(self._written.value) if self.enabled else 0

    @property
    def failed(self) -> int:
        return int(self._failed.value) if self.enabled else 0

    @property
    def retried(self) -> int:
        """Store calls tried again because the store was busy."""
        return int(self._retried.value) if self.enabled else 0

    @property
    def queued_bytes(self) -> int:
        return int(self._queued.value) if self.enabled else 0

    @property
    def backlog(self) -> int:
        """Records handed to the writer and not yet written (nor failed)."""
        return max(0, self.put - self.written - self.failed) if self.enabled else 0

    def _put(self, kind: str, payload: Any, size: int) -> None:
        if self._proc is None:
            return  # closed
        try:
            with self._queued.get_lock():
                if self._queued.value + size > self.max_queue_bytes:
                    raise queue.Full
                self._q.put_nowait((kind, payload, size))
                self._queued.value += size
            self.put += 1
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
        """Stop the writer once it has written what is queued, or at ``timeout`` seconds from now
        with what it has not written left unwritten (``unwritten``); True when nothing was left."""
        if not self.enabled or self._proc is None:
            return True
        self._stop_at.value = time.time() + max(0.0, timeout)
        # past the deadline the writer ends at its next look at the clock (a retry stops at the
        # deadline too); one that does not, within seconds, is ended
        self._proc.join(max(0.0, timeout) + 3.0)
        self.close()
        self.unwritten = self.backlog
        return self.unwritten == 0

    def close(self) -> None:
        """End the writer (at once, if it still runs) and let go of the queue without waiting on
        it: a queue's feeder thread blocked on a full pipe that nobody reads would otherwise keep
        the process from exiting. What the writer did not take is abandoned (``backlog``)."""
        if not self.enabled or self._proc is None:
            return
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._proc = None
        self._q.cancel_join_thread()
        self._q.close()
