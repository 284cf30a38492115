"""``/v1/chat/completions`` and ``/v1/completions``: a request to jobs on the current version's
engine, and the engine's output back as OpenAI's response, chunks, or ``logprobs``.

Admission counts prompts (a completion request may carry several, as lm-eval sends them):
beyond the decoding slots and ``--max-queue`` waiting ones the answer is 503 with
``Retry-After``. The engine calls back on its own thread; text reaches the event loop
through ``call_soon_threadsafe``. A client that disconnects, streaming or not, cancels its
jobs: the engine drops their sequences at its next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llmops.app.serving import schemas
from llmops.app.serving.deploy import Deployment
from llmops.app.serving.engines import GenParams, Job, NoChatTemplate, Prompt
from llmops.app.serving.schemas import BadRequest
from llmops.app.serving.state import (
    ServerState,
    authorized,
    check_tokens,
    error,
    read_body,
    unauthorized,
    version_headers,
)
from llmops.app.serving.textout import openai_logprobs
from llmops.app.serving.tracing import RequestRecord, bound_messages, clip
from llmops.registry import traces as T


class _Stream(StreamingResponse):
    """Starlette's streaming response, closing the body iterator however the response ends, so
    the generation's cleanup (cancel flag, slot, trace) runs at once and not at garbage
    collection; ``cleanup`` runs if the iterator never started (the client left before the
    first byte)."""

    def __init__(self, content: Any, cleanup: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            self._cleanup()


class _ToLoop:
    """A job's sink on the event loop: text pieces into a queue, or collected into a future."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue | None = None) -> None:
        self.loop, self.queue = loop, queue
        self.parts: list[str] = []
        self.ended: asyncio.Future = loop.create_future()

    def text(self, piece: str) -> None:
        if self.queue is not None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ("text", piece))
        else:
            self.parts.append(piece)

    def done(self, error: BaseException | None) -> None:
        def settle() -> None:
            if not self.ended.done():
                self.ended.set_result(error)
            if self.queue is not None:
                self.queue.put_nowait(("end", error))

        self.loop.call_soon_threadsafe(settle)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: the next message is that)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


def _params(state: ServerState, req: schemas._Sampling) -> GenParams:
    limit = req.limit()
    return GenParams(
        max_tokens=limit if limit is not None else state.limits.max_tokens,
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p), stop=req.stops(), seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        logprobs=getattr(req, "logprobs", None), echo=bool(getattr(req, "echo", False)),
    )


def _check_model(state: ServerState, req: schemas._Sampling, d: Deployment) -> None:
    if req.model in (None, "", d.name, d.label, state.source.ref, f"models:/{d.label}"):
        return
    raise BadRequest(f"model '{req.model}' is not served here: this server serves '{d.name}' "
                     f"({state.source.ref}, now version {d.version})", status=404, code="model_not_found", param="model")


def _build_prompts(d: Deployment, req: schemas._Sampling) -> list[Prompt]:
    """Token ids of each prompt (on the engine's tokenizer thread)."""
    engine = d.engine
    if isinstance(req, schemas.ChatRequest):
        return [engine.chat_prompt([m.for_template() for m in req.messages])]
    out = []
    for p in req.prompts():
        if isinstance(p, str):
            out.append(engine.text_prompt(p))
        else:
            check_tokens(p, engine.n_vocab, "prompt")
            out.append(Prompt(list(p)))
    return out


async def complete(state: ServerState, request: Request, endpoint: str) -> Response:
    metrics, tracer, limits = state.metrics, state.tracer, state.limits
    t_arrival, start_ns = time.perf_counter(), time.time_ns()
    if not authorized(state, request):
        return unauthorized(state, endpoint)
    chat_mode = endpoint == "chat.completions"
    kind = schemas.ChatRequest if chat_mode else schemas.CompletionRequest
    try:
        body, body_bytes = await read_body(limits, request)
        req = schemas.parse(kind, body)
        _check_model(state, req, state.router.current)
        params = _params(state, req)
        if params.max_tokens > limits.max_tokens:
            raise BadRequest(f"max_tokens {params.max_tokens} exceeds this server's limit of {limits.max_tokens} "
                             "(--max-tokens)", param="max_tokens")
        n_prompts = 1 if chat_mode else len(req.prompts())
        if n_prompts > limits.capacity:
            raise BadRequest(f"'prompt': {n_prompts} prompts in one request exceed what this server admits at once "
                             f"({limits.capacity}: --parallel and --max-queue); send fewer", param="prompt")
        if state.stopping or state.pending + n_prompts > limits.capacity:
            raise BadRequest(f"the server is busy: {state.pending} requests running or queued (--max-queue "
                             f"{limits.max_queue}); retry shortly", status=503, code="overloaded",
                             headers={"Retry-After": "1"})
    except BadRequest as e:
        metrics.refused.labels(endpoint, str(e.status)).inc()
        return error(e.status, e.message, code=e.code, param=e.param, headers=e.headers)

    state.pending += n_prompts
    d = state.router.acquire()
    rec = RequestRecord(endpoint=endpoint, start_ns=start_ns, t_arrival=t_arrival, name=d.name, version=d.version,
                        alias=d.alias, logged_model_id=d.logged_model_id, t_acquired=time.perf_counter(),
                        acquired_ms=int(time.time() * 1000), stream=req.stream)
    jobs: list[Job] = []
    ended = [False]

    def finish() -> None:
        if ended[0]:
            return
        ended[0] = True
        for j in jobs:
            state.jobs.discard(j)
        outs = [j.out for j in jobs]
        rec.t_end = rec.t_end or time.perf_counter()
        if outs:
            starts = [o.started_at for o in outs if o.started_at is not None]
            firsts = [o.first_token_at for o in outs if o.first_token_at is not None]
            rec.t_slot = min(starts) if starts else None
            rec.t_first = min(firsts) if firsts else None
            rec.completion_tokens = sum(o.completion_tokens for o in outs)
            rec.finish_reason = rec.finish_reason or outs[0].finish_reason
        state.router.release(d)
        state.pending -= n_prompts
        metrics.answered(name=rec.name, version=rec.version, endpoint=rec.endpoint, status=rec.status,
                         latency_s=(rec.latency_ms or 0) / 1000.0 if rec.status == T.STATUS_OK else None,
                         ttft_s=(rec.ttft_ms / 1000.0) if rec.ttft_ms is not None and rec.status == T.STATUS_OK else None,
                         prompt_tokens=rec.prompt_tokens, completion_tokens=rec.completion_tokens)
        tracer.request(rec)

    def cancelled() -> None:
        for j in jobs:
            j.cancel.set()
        rec.status, rec.http_status, rec.finish_reason = T.STATUS_CANCELLED, 499, "cancelled"

    loop = asyncio.get_running_loop()
    handed_over = False
    try:
        if chat_mode:
            rec.inputs = {"messages": bound_messages([m.for_template() for m in req.messages])}
        else:
            texts = [p if isinstance(p, str) else f"<{len(p)} token ids>" for p in req.prompts()]
            rec.inputs = {"prompt": clip(texts[0])} if len(texts) == 1 else {"prompts": [clip(t, 1000) for t in texts[:16]]}
        try:
            prompts = await asyncio.wrap_future(d.call(lambda: _build_prompts(d, req)))
        except NoChatTemplate as e:
            raise BadRequest(str(e), code="no_chat_template") from None
        except BadRequest:
            raise
        except Exception as e:  # noqa: BLE001 - a template that refuses these messages (raise_exception)
            raise BadRequest(f"the model's chat template refused these messages: {e}", param="messages") from None
        rec.prompt_tokens = sum(len(p.tokens) for p in prompts)
        per_job = []
        for p in prompts:
            n = len(p.tokens)
            room = d.engine.n_ctx - n
            if n == 0 or room < (0 if params.max_tokens == 0 else 1):
                raise BadRequest(f"the prompt has {n} tokens and this model's context holds {d.engine.n_ctx} "
                                 "(--ctx): " + ("shorten it" if n else "give it some text"),
                                 code="context_length_exceeded", param="messages" if chat_mode else "prompt")
            per_job.append(GenParams(**{**params.__dict__, "max_tokens": min(params.max_tokens, room)}))
        created = int(time.time())
        rid = f"{'chatcmpl' if chat_mode else 'cmpl'}-{uuid.uuid4().hex}"

        def usage() -> dict[str, Any]:
            c = sum(j.out.completion_tokens for j in jobs)
            return {"prompt_tokens": rec.prompt_tokens, "completion_tokens": c, "total_tokens": rec.prompt_tokens + c,
                    "prompt_tokens_details": {"cached_tokens": sum(j.out.cached_tokens for j in jobs)}}

        queue: asyncio.Queue | None = asyncio.Queue() if req.stream else None
        sinks = [_ToLoop(loop, queue) for _ in prompts]
        jobs.extend(Job(p, gp, s) for p, gp, s in zip(prompts, per_job, sinks))
        for j in jobs:
            state.jobs.add(j)
            d.submit(j)

        if not req.stream:
            waiting = asyncio.ensure_future(asyncio.gather(*(s.ended for s in sinks)))
            gone = asyncio.ensure_future(_disconnected(request))
            try:
                await asyncio.wait([waiting, gone], return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if not waiting.done():  # the client left: its sequences are dropped at the engine's next step
                cancelled()
                await waiting
                return Response(status_code=499)
            errors = [e for e in waiting.result() if e is not None]
            if errors:
                raise errors[0]
            rec.t_end = time.perf_counter()
            texts_out = ["".join(s.parts) for s in sinks]
            rec.output = texts_out[0]
            if chat_mode:
                choices = [{"index": 0, "message": {"role": "assistant", "content": texts_out[0]}, "logprobs": None,
                            "finish_reason": jobs[0].out.finish_reason}]
                body = {"id": rid, "object": "chat.completion", "created": created, "model": d.label,
                        "choices": choices, "usage": usage()}
            else:
                choices = await asyncio.wrap_future(d.call(lambda: _choices(d, req.prompts(), prompts, jobs, texts_out)))
                body = {"id": rid, "object": "text_completion", "created": created, "model": d.label,
                        "choices": choices, "usage": usage()}
            return JSONResponse(body, headers=version_headers(d))

        # -- streaming: one prompt
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        gen = jobs[0].out

        def chunk(delta_text: str | None, finish: str | None = None, role: bool = False,
                  with_usage: bool = False) -> bytes:
            if chat_mode:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": d.label,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            else:
                c = {"id": rid, "object": "text_completion", "created": created, "model": d.label,
                     "choices": [{"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}]}
            if with_usage:
                c["usage"] = usage()
            return b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\n\n"

        closed = [False]

        def close_stream(done: bool, pieces: list[str]) -> None:
            if closed[0]:
                return
            closed[0] = True
            rec.output = "".join(pieces)
            if not done:
                cancelled()
            finish()

        async def events() -> AsyncIterator[bytes]:
            done = False
            pieces: list[str] = []
            try:
                if chat_mode:
                    yield chunk("", role=True)
                while True:
                    kind_, val = await queue.get()
                    if kind_ == "text":
                        pieces.append(val)
                        yield chunk(val)
                        continue
                    if val is not None:
                        rec.status, rec.http_status = T.STATUS_ERROR, 500
                        rec.error = f"{type(val).__name__}: {' '.join(str(val).split())[:300]}"
                        err = {"error": {"message": f"generation failed: {rec.error}", "type": "server_error",
                                         "param": None, "code": "internal_error"}}
                        yield b"data: " + json.dumps(err).encode() + b"\n\n"
                        done = True
                        return
                    break
                rec.t_end = time.perf_counter()
                if gen.cancelled:  # cut by the server (a shutdown past its grace)
                    rec.status, rec.http_status = T.STATUS_CANCELLED, 499
                # the last chunk carries usage always (OpenAI: only with stream_options.include_usage,
                # in a chunk of its own, which is sent too when asked for)
                yield chunk(None if chat_mode else "", finish=gen.finish_reason, with_usage=True)
                if include_usage:
                    c = {"id": rid, "object": "chat.completion.chunk" if chat_mode else "text_completion",
                         "created": created, "model": d.label, "choices": [], "usage": usage()}
                    yield b"data: " + json.dumps(c).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                done = True
            finally:
                close_stream(done, pieces)

        handed_over = True
        headers = {**version_headers(d), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return _Stream(events(), lambda: close_stream(False, []), media_type="text/event-stream", headers=headers)
    except BadRequest as e:
        rec.status, rec.http_status, rec.error = T.STATUS_REJECTED, e.status, e.message
        # a refused request is traced by its size, never its body: a client could fill the store
        rec.inputs = {"refused_body_bytes": body_bytes}
        metrics.refused.labels(endpoint, str(e.status)).inc()
        return error(e.status, e.message, code=e.code, param=e.param, headers={**e.headers, **version_headers(d)})
    except asyncio.CancelledError:
        cancelled()
        raise
    except Exception as e:  # noqa: BLE001 - one bad request is a 500, never a dead worker
        for j in jobs:
            j.cancel.set()
        rec.status, rec.http_status = T.STATUS_ERROR, 500
        rec.error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        return error(500, f"generation failed: {rec.error}", code="internal_error", headers=version_headers(d))
    finally:
        if not handed_over:
            if any(j.out.cancelled for j in jobs) and rec.status == T.STATUS_OK:
                rec.status, rec.http_status = T.STATUS_CANCELLED, 499
            finish()


def _choices(d: Deployment, given: list[Any], prompts: list[Prompt], jobs: list[Job], texts: list[str]) -> list[dict]:
    """The completion choices, with ``echo`` and ``logprobs`` (on the engine's tokenizer thread:
    every token's bytes are looked up)."""
    engine = d.engine
    out = []
    for i, (g, p, j, text) in enumerate(zip(given, prompts, jobs, texts)):
        prompt_text = g if isinstance(g, str) else b"".join(engine.piece(t) for t in p.tokens).decode("utf-8", "ignore")
        echo = j.params.echo
        lp = None
        if j.out.logprobs is not None:
            trace = j.out.logprobs
            lp = openai_logprobs(trace, [engine.piece(t) for t in trace.tokens], engine.piece,
                                 0 if echo else len(prompt_text))
        out.append({"index": i, "text": (prompt_text if echo else "") + text, "logprobs": lp,
                    "finish_reason": j.out.finish_reason})
    return out
