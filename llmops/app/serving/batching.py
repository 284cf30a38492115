"""Continuous batching over llama.cpp: every running request advances in one ``llama_decode``.

llama-cpp-python's ``Llama`` decodes one sequence; its server serialises requests. llama.cpp's
own server decodes several sequences in one batch, which on a CPU turns the memory-bound
single stream into more tokens per second in aggregate (reading the weights once per step
serves every sequence). This is the same scheme over llama-cpp-python's low-level API, in
this process (no extra build, no proxy hop):

* one context with ``n_seq_max = parallel`` and one unified KV cache of ``parallel × n_ctx``
  cells (llama-server's ``--parallel N --kv-unified``); a request holds a sequence id (a
  slot) from admission to its end, and its cells are removed (``llama_memory_seq_rm``) the
  moment it is cut by its client or fails; one that ends normally leaves them as a cache, and
  the next request is given the slot sharing the longest prefix with its prompt
  (:mod:`llmops.app.serving.slots`; llama-server's ``cache_prompt``);
* each step builds one ``llama_batch``: the last sampled token of every generating sequence,
  then prompt tokens of admitted requests up to ``n_batch``; a new request joins between two
  steps, its prompt decoded alongside the others' next tokens;
* each sequence samples from its own row of logits with its own sampler chain, the chain
  llama-cpp-python's ``Llama`` builds (penalties, top-k 40, typical, top-p, min-p 0.05,
  temperature, seeded distribution; greedy at temperature 0).

The loop owns the context: nothing else touches it. A step that llama.cpp refuses fails the
requests in it, and the loop goes on; a loop that keeps failing gets a fresh context.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from llmops.app.serving.engines import (
    BatchLoop,
    GenParams,
    Job,
    ModelTokenizer,
    Observer,
    default_parallel,
    finish,
)
from llmops.app.serving.llama_model import LlamaModelFile, train_context
from llmops.app.serving.slots import Slots
from llmops.app.serving.textout import LogprobTrace, TextStream
from llmops.core.errors import LLMOpsError

N_BATCH = 512
RESTART_AFTER = 3  # failed steps in a row before the context is made anew


class _Seq:
    """One admitted request: its slot, how much of its prompt is in the cache, its sampler."""

    def __init__(self, job: Job, slot: int, sampler: Any, text: TextStream) -> None:
        self.job, self.slot, self.sampler, self.text = job, slot, sampler, text
        self.prompt = job.prompt.tokens
        self.fed = 0  # prompt tokens handed to llama_decode
        self.pos = 0  # the position of the next token this sequence decodes
        self.last: int | None = None  # the sampled token not yet decoded
        self.trace = job.out.logprobs
        self.decoded: list[int] = []  # sampled tokens decoded into the cache after the prompt


class LlamaBatchEngine(ModelTokenizer, BatchLoop):
    """A GGUF served with continuous batching (see the module's description)."""

    backend = "llama.cpp"

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, threads: int | None = None, device: str = "cpu",
                 parallel: int | None = None, observer: Observer | None = None, name: str = "model",
                 log: Any = None) -> None:
        import llama_cpp

        self.lib = llama_cpp
        train = train_context(path)
        if train and n_ctx > train:
            n_ctx = train  # beyond its training context a model's output degrades; llama.cpp only warns
        self.file = LlamaModelFile(path, device=device)
        self.n_ctx = int(n_ctx)
        self.parallel = int(parallel or default_parallel(self.n_ctx, self.file.kv_bytes_per_token()))
        self.parallel = max(1, min(self.parallel, int(llama_cpp.llama_max_parallel_sequences())))
        self.threads = threads
        self.device = device
        self.observer = observer or Observer()
        self.log = log or (lambda message: None)
        self.name = name
        self.failures = 0  # steps failed in a row
        self.restarts = 0
        self.failed: str | None = None  # why the loop stopped for good
        self._ctx = None
        self._batch = None
        try:
            self._new_context()
        except BaseException:
            self.file.close()
            raise
        self._cv = threading.Condition()
        self._incoming: collections.deque[Job] = collections.deque()
        self._active: list[_Seq] = []
        self._slots = Slots(self.parallel)
        self._closing = False
        self._tok = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llmops-tok-{name}")
        self._thread = threading.Thread(target=self._run, name=f"llmops-batch-{name}", daemon=True)
        self._thread.start()

    # -- the model's tokenizer (any thread) ---------------------------------------------------
    @property
    def inner(self) -> LlamaModelFile:
        return self.file

    def tokenizer_info(self) -> dict[str, Any]:
        return {**self.file.tokenizer_info(), "model_max_length": self.n_ctx}

    def call(self, fn: Any) -> Future:
        """Tokenizing off the event loop and off the batch loop (a long prompt takes milliseconds)."""
        return self._tok.submit(fn)

    # -- jobs -------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        job.out.queued_at = time.perf_counter()
        if job.params.logprobs is not None and job.out.logprobs is None:
            job.out.logprobs = LogprobTrace(job.params.logprobs)
        with self._cv:
            if self.failed:
                raise LLMOpsError(f"this version cannot serve: {self.failed}")
            if self._closing:
                raise LLMOpsError("this version is being unloaded")
            self._incoming.append(job)
            self._cv.notify()

    def close(self) -> None:
        """Stop once the jobs already handed in have ended, then free the context and the weights."""
        super().close()
        self._tok.shutdown(wait=False)

    def _running_jobs(self) -> list[Job]:
        return [s.job for s in self._active]

    # -- the loop (its own thread) ----------------------------------------------------------
    def _new_context(self) -> None:
        lib = self.lib
        from llama_cpp._internals import LlamaContext

        if self._ctx is not None:
            self._ctx.close()
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        cp = lib.llama_context_default_params()
        cp.n_ctx = self.parallel * self.n_ctx
        cp.n_batch = N_BATCH
        cp.n_ubatch = N_BATCH
        cp.n_seq_max = self.parallel
        cp.kv_unified = True
        import multiprocessing

        cp.n_threads = self.threads or max(multiprocessing.cpu_count() // 2, 1)
        cp.n_threads_batch = self.threads or multiprocessing.cpu_count()
        # flash attention, as llama-server's "auto" has it on a CPU: with several sequences in one
        # unified cache, its kernel skips the other sequences' (masked) cells instead of multiplying
        # through them; measured 1.2-1.5x at 8 sequences, and no slower for one
        cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        try:
            self._ctx = LlamaContext(model=self.file.model, params=cp, verbose=False)
        except ValueError as e:
            raise LLMOpsError(f"llama.cpp cannot make a context of {cp.n_ctx} tokens for {self.parallel} sequences: "
                              f"{e} (lower --parallel or --ctx)") from None
        self._mem = lib.llama_get_memory(self._ctx.ctx)
        self._batch = b = lib.llama_batch_init(N_BATCH, 0, 1)
        # the arrays' pointers, fetched once: a ctypes field read makes a new object each time
        self._fields = (b.token, b.pos, b.n_seq_id, b.seq_id, b.logits)

    def _sampler(self, p: GenParams) -> Any:
        """The chain ``Llama._init_sampler`` builds for ``create_completion``'s defaults."""
        from llama_cpp._internals import LlamaSampler

        s = LlamaSampler()
        if p.presence_penalty or p.frequency_penalty:
            s.add_penalties(n_vocab=self.file.n_vocab, penalty_last_n=64, penalty_repeat=1.0,
                            penalty_freq=p.frequency_penalty, penalty_present=p.presence_penalty)
        if p.temperature == 0:
            s.add_greedy()
        else:
            s.add_top_k(40)
            s.add_typical(1.0, 1)
            s.add_top_p(p.top_p, 1)
            s.add_min_p(0.05, 1)
            s.add_temp(p.temperature)
            s.add_dist(p.seed if p.seed is not None else random.getrandbits(32))
        return s

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - recorded; whatever waits is told
            self.failed = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            with self._cv:
                waiting, self._incoming = list(self._incoming), collections.deque()
            for job in waiting:
                finish(job, None, LLMOpsError(f"this version cannot serve: {self.failed}"))
            return
        self._ctx.close()
        self.lib.llama_batch_free(self._batch)
        self.file.close()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._incoming and not self._active and not self._closing:
                    self._cv.wait()
                if self._closing and not self._incoming and not self._active:
                    break
                admitted = []
                while self._incoming and self._slots:
                    job = self._incoming.popleft()
                    admitted.append((job, self._slots.take(job.prompt.tokens)))
            for job, slot in admitted:
                self._admit(job, slot)
            if not self._active:
                continue
            try:
                self._step()
                self.failures = 0
            except Exception as exc:  # noqa: BLE001 - the loop outlives a failed step
                self._failed_step(exc)

    def _admit(self, job: Job, slot: int) -> None:
        job.out.started_at = time.perf_counter()
        self.observer.started(job)
        if job.cancel.is_set():
            self._release(slot, self._slots.held[slot])  # untouched: what it holds stays
            finish(job, "cancelled")
            return
        stops = list(job.params.stop) + [s for s in job.prompt.stop if s not in job.params.stop]
        s = _Seq(job, slot, self._sampler(job.params), TextStream(stops))
        # an echo wants the logits of every prompt position: nothing of its prompt is reused
        reuse = 0 if s.trace is not None and job.params.echo else self._slots.reusable(slot, s.prompt)
        if len(self._slots.held[slot]) > reuse and not self.lib.llama_memory_seq_rm(self._mem, slot, reuse, -1):
            self.lib.llama_memory_seq_rm(self._mem, slot, -1, -1)  # a cache that cannot be cut part-way
            reuse = 0
        s.fed = s.pos = reuse
        job.out.cached_tokens = reuse
        self._active.append(s)

    def _release(self, slot: int, holding: list[int] | None = None) -> None:
        """``slot`` free again; its cells kept as a cache of ``holding``, or removed."""
        if not holding:
            self.lib.llama_memory_seq_rm(self._mem, slot, -1, -1)
        with self._cv:
            self._slots.give_back(slot, holding)

    def _end(self, s: _Seq, reason: str | None, error: BaseException | None = None) -> None:
        if s in self._active:
            self._active.remove(s)
        ended = error is None and reason in ("stop", "length")
        self._release(s.slot, s.prompt[:s.fed] + s.decoded if ended else None)
        s.sampler.close()
        if ended:
            rest = s.text.flush()
            if rest:
                s.job.sink.text(rest)
        finish(s.job, reason, error)

    def _step(self) -> None:
        lib, b = self.lib, self._batch
        for s in [s for s in self._active if s.job.cancel.is_set()]:
            self._end(s, "cancelled")
        if not self._active:
            return
        n = n_out = 0
        samples: list[tuple[_Seq, int, int]] = []  # (sequence, batch index, output row)
        echoes: list[tuple[_Seq, int, int, int]] = []  # (sequence, first output row, rows, first prompt index)
        seqs = set()

        tokens, positions, n_seq_id, seq_id, want = self._fields

        def add(token: int, pos: int, slot: int, logits: bool) -> None:
            nonlocal n, n_out
            tokens[n], positions[n], n_seq_id[n] = token, pos, 1
            seq_id[n][0] = slot
            want[n] = logits
            n += 1
            n_out += logits

        for s in self._active:
            if s.last is not None:
                samples.append((s, n, n_out))
                add(s.last, s.pos, s.slot, True)
                s.decoded.append(s.last)
                s.pos += 1
                seqs.add(s.slot)
        for s in self._active:
            if s.last is not None or s.fed == len(s.prompt) or n >= N_BATCH:
                continue
            take = min(N_BATCH - n, len(s.prompt) - s.fed)
            echo = s.trace is not None and s.job.params.echo
            if echo:
                echoes.append((s, n_out, take, s.fed))
            for i in range(s.fed, s.fed + take):
                last = i == len(s.prompt) - 1
                if last:
                    samples.append((s, n, n_out))
                add(s.prompt[i], i, s.slot, echo or last)
            s.fed += take
            s.pos = s.fed
            seqs.add(s.slot)
        b.n_tokens = n
        rc = lib.llama_decode(self._ctx.ctx, b)
        if rc != 0:  # every running sequence had a token in this batch: they all fail with it
            raise LLMOpsError(f"llama.cpp could not decode this step (llama_decode returned {rc})")
        self.observer.step(len(seqs))
        rows = np.ctypeslib.as_array(lib.llama_get_logits(self._ctx.ctx), shape=(n_out, self.file.n_vocab)) \
            if echoes or any(s.trace is not None for s, _, _ in samples) else None
        for s, first_row, count, first in echoes:
            if first == 0:
                s.trace.first(s.prompt[0])
            # the row of prompt position i predicts token i + 1; the last prompt row predicts the first sample
            k = min(count, len(s.prompt) - 1 - first)
            s.trace.add_rows(s.prompt[first + 1:first + 1 + k], rows[first_row:first_row + k])
        for s, idx, row in samples:
            self._sampled(s, idx, rows[row] if rows is not None and s.trace is not None else None)

    def _sampled(self, s: _Seq, idx: int, row: np.ndarray | None) -> None:
        job, out = s.job, s.job.out
        if job.params.max_tokens <= 0:  # echo only: the prompt's log probabilities were what was asked
            self._end(s, "length")
            return
        tok = int(s.sampler.sample(self._ctx, idx))
        if out.first_token_at is None:
            out.first_token_at = time.perf_counter()
        if row is not None:
            s.trace.add(tok, row)
        if self.file.is_eog(tok) or tok in job.prompt.stop_ids:
            self._end(s, "stop")
            return
        if job.cancel.is_set():
            self._end(s, "cancelled")
            return
        out.completion_tokens += 1
        text = s.text.feed(self.file.piece(tok, special=False))
        if text:
            job.sink.text(text)
        if s.text.stopped:
            self._end(s, "stop")
        elif out.completion_tokens >= job.params.max_tokens or s.pos >= self.n_ctx:
            self._end(s, "length")
        else:
            s.last = tok

    def _failed_step(self, exc: BaseException) -> None:
        """Everything running fails with the error; the cache starts empty; after
        :data:`RESTART_AFTER` such steps in a row the context itself is made anew. The loop is
        whole again before the requests are told: one that is sent again at once is served."""
        self.failures += 1
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
        running, self._active = list(self._active), []
        try:
            self.lib.llama_memory_clear(self._mem, True)
            with self._cv:
                self._slots.reset()
            if self.failures >= RESTART_AFTER:
                self._new_context()
                self.restarts += 1
                self.failures = 0
                self.log(f"warning: {self.name}: {msg}: {len(running)} request(s) failed; {RESTART_AFTER} failed steps "
                         "in a row, so the llama.cpp context was made anew; serving goes on")
            else:
                self.log(f"warning: {self.name}: {msg}: {len(running)} request(s) failed; serving goes on")
        except Exception as again:  # noqa: BLE001 - nothing left to serve with
            self.log(f"error: {self.name}: cannot recover the batch loop ({type(again).__name__}: {again})")
            raise
        finally:
            for s in running:
                s.sampler.close()
                finish(s.job, None, exc)
