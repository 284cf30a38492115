"""ONNX folders batched through onnxruntime-genai's ``Engine``.

The engine batches on every provider: statically on CPU (a batch of up to ``--parallel``
requests is formed from those waiting and runs until its last member ends; a request arriving
meanwhile waits for the next batch), and continuously with a paged KV cache on CUDA (the
``dynamic_batching`` settings; a model not built for them is batched statically). Its events
carry tokens, not logits, so a request for ``logprobs`` runs through a ``Generator`` on the
same thread, between two engine steps; so does a request that finds nothing else running or
waiting (a static batch of one would hold later arrivals just as long, and the ``Generator``
decodes one sequence faster than the engine's batch of one: measured 72 against 59 tok/s).
The engine answers only the thread that made it: one thread makes it and does everything with
it, tokenizing included.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from llmops.app.serving.engines import BatchLoop, Job, ModelTokenizer, Observer, finish
from llmops.app.serving.onnx_engine import OnnxGenaiEngine, _StopText
from llmops.core.errors import LLMOpsError


class _Running:
    def __init__(self, job: Job, request: Any, turn: int, stream: Any) -> None:
        self.job, self.request, self.turn, self.stream = job, request, turn, stream
        self.stops = _StopText(list(job.params.stop) + list(job.prompt.stop))
        self.cancel_sent = False


class OnnxBatchEngine(ModelTokenizer, BatchLoop):
    """Requests batched through onnxruntime-genai's ``Engine`` (see the module's description)."""

    backend = "onnxruntime-genai"

    def __init__(self, folder: str | Path, *, n_ctx: int | None = None, threads: int | None = None,
                 device: str = "cpu", parallel: int = 4, observer: Observer | None = None, name: str = "model",
                 log: Any = None) -> None:
        self.parallel = int(parallel)
        static = {"engine": {"static_batching": {"max_batch_size": self.parallel}}}
        if device == "cuda":  # continuous batching where the model was built for its paged cache
            try:
                self.inner = OnnxGenaiEngine(folder, n_ctx=n_ctx, threads=threads, device=device, overlay={
                    "engine": {"dynamic_batching": {"max_batch_size": self.parallel}}})
            except LLMOpsError:
                self.inner = OnnxGenaiEngine(folder, n_ctx=n_ctx, threads=threads, device=device, overlay=static)
        else:
            self.inner = OnnxGenaiEngine(folder, n_ctx=n_ctx, threads=threads, device=device, overlay=static)
        self._og = self.inner._og
        self._engine: Any = None
        self.n_ctx = self.inner.n_ctx
        self.observer = observer or Observer()
        self.log = log or (lambda message: None)
        self.failed: str | None = None
        self._cv = threading.Condition()
        self._incoming: collections.deque[Job] = collections.deque()
        self._running: dict[int, _Running] = {}
        self._solo: Job | None = None  # the job running through the Generator, if one is
        self._closing = False
        self._calls: collections.deque[tuple[Any, Future]] = collections.deque()
        self._ready = threading.Event()
        self._start_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"llmops-batch-{name}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self.inner.close()
            raise LLMOpsError(f"onnxruntime-genai cannot batch {folder}: {self._start_error} (serve it with --parallel 1)")

    def call(self, fn: Any) -> Future:
        """On the engine's thread, between two steps (the tokenizer's options are shared state)."""
        fut: Future = Future()
        with self._cv:
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut

    def submit(self, job: Job) -> None:
        job.out.queued_at = time.perf_counter()
        with self._cv:
            if self.failed or self._closing:
                raise LLMOpsError(f"this version cannot serve: {self.failed or 'it is being unloaded'}")
            self._incoming.append(job)
            self._cv.notify()

    def _running_jobs(self) -> list[Job]:
        return [r.job for r in self._running.values()] + ([self._solo] if self._solo is not None else [])

    def _run(self) -> None:
        # the engine answers only the thread that made it: it is made here, and used only here
        try:
            self._engine = self._og.Engine(self.inner.model)
            self._events = self._engine.create_event_buffer(8 * self.parallel)
        except Exception as exc:  # noqa: BLE001 - onnxruntime-genai raises its own error types
            self._start_error = " ".join(str(exc).split())[:300] or type(exc).__name__
            return
        finally:
            self._ready.set()
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - recorded; whatever waits is told
            self.failed = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            self.log(f"error: the onnxruntime-genai engine stopped: {self.failed}")
            with self._cv:
                waiting, self._incoming = list(self._incoming), collections.deque()
            for job in [*waiting, *(r.job for r in self._running.values())]:
                finish(job, None, LLMOpsError(f"this version cannot serve: {self.failed}"))
            return
        self._engine = None
        self.inner.close()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._incoming or self._running or self._calls or self._closing):
                    self._cv.wait()
                if self._closing and not (self._incoming or self._running or self._calls):
                    return
                jobs, self._incoming = list(self._incoming), collections.deque()
                calls, self._calls = list(self._calls), collections.deque()
            for fn, fut in calls:
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - the caller's to handle
                    fut.set_exception(exc)
            alone = len(jobs) == 1 and not self._running
            for job in jobs:
                self._begin(job, alone)
            if self._running:
                self._step()

    def _begin(self, job: Job, alone: bool = False) -> None:
        og, np = self._og, self.inner._np
        job.out.started_at = time.perf_counter()
        if job.cancel.is_set():
            finish(job, "cancelled")
            return
        if alone or job.params.logprobs is not None:  # logits are the Generator's: this one runs alone, now
            self.observer.started(job)
            self._solo = job
            try:
                for piece in self.inner.generate(job.prompt, job.params, job.cancel, job.out, self.observer):
                    job.sink.text(piece)
            except Exception as exc:  # noqa: BLE001 - that request fails, the engine goes on
                finish(job, None, exc)
                return
            finally:
                self._solo = None
            finish(job, job.out.finish_reason or "length")
            return
        p = job.params
        req = self._engine.create_request()
        opts = og.TurnOptions(req)
        opts.set_max_generated_tokens(max(1, p.max_tokens))
        if p.temperature > 0:
            opts.set_do_sample(True)
            opts.set_temperature(p.temperature)
            opts.set_top_p(p.top_p)
            opts.set_top_k(0)
        else:
            opts.set_do_sample(False)
        if p.seed is not None:
            opts.set_seed(int(p.seed))
        turn = req.begin_turn(np.asarray(job.prompt.tokens, dtype=np.int32), opts)
        self._running[id(req)] = _Running(job, req, turn, self.inner.tok.create_stream())

    def _step(self) -> None:
        for r in self._running.values():
            if r.job.cancel.is_set() and not r.cancel_sent:
                r.cancel_sent = r.request.cancel_turn(r.turn) or True
        events = self._engine.run(self._events)
        flags = self._og.EngineEventFlags
        reasons = self._og.FinishReason
        seen = set()
        for i in range(len(events)):
            ev = events[i]
            r = self._running.get(id(ev.request))
            if r is None:
                continue
            job, out = r.job, r.job.out
            if id(ev.request) not in seen and out.completion_tokens == 0 and out.first_token_at is None:
                self.observer.started(job)  # the batch it waited for has begun
            seen.add(id(ev.request))
            fl = int(ev.flags.value) if hasattr(ev.flags, "value") else int(ev.flags)
            end = None
            if fl & int(flags.TOKEN.value) and ev.token is not None:
                tok = int(ev.token)
                if out.first_token_at is None:
                    out.first_token_at = time.perf_counter()
                if tok in self.inner.eos or tok in job.prompt.stop_ids:
                    end = "stop"
                elif not job.cancel.is_set():
                    out.completion_tokens += 1
                    text, stopped = r.stops.feed(r.stream.decode(tok))
                    if text:
                        job.sink.text(text)
                    if stopped:
                        end = "stop"
                        if not r.cancel_sent:
                            r.cancel_sent = r.request.cancel_turn(r.turn) or True
            if fl & int(flags.FAILED.value):
                self._close(r, None, LLMOpsError(f"onnxruntime-genai failed this request ({ev.error_code.name})"))
                continue
            if end is None and fl & int(flags.TURN_FINISHED.value):
                reason = ev.finish_reason
                end = ("stop" if reason in (reasons.EOS, reasons.STOP_STRING) else
                       "cancelled" if reason == reasons.CANCELLED else "length")
            if end is not None or fl & int(flags.TURN_FINISHED.value):
                self._close(r, end or "length", None)
        if seen:
            self.observer.step(len(seen))

    def _close(self, r: _Running, reason: str | None, error: BaseException | None) -> None:
        if self._running.pop(id(r.request), None) is None:
            return
        if error is None and reason != "cancelled":
            rest = r.stops.flush()
            if rest:
                r.job.sink.text(rest)
        try:
            r.request.close()
        except Exception:  # noqa: BLE001, S110 - the request is done with either way
            pass
        finish(r.job, reason, error)
