"""The HTTP face of ``llmops serve``: OpenAI's chat and completion endpoints on FastAPI.

What the runtimes do not do is written here: the OpenAI response and chunk envelopes
(llama-cpp-python's own server needs three more packages and knows nothing of versions,
swaps or traces; onnxruntime-genai has no server), the per-request accounting that names
the version that answered, admission (a bounded queue answering 503 with ``Retry-After``),
and errors as OpenAI's JSON ``{"error": {...}}`` with a 4xx status naming the problem.

Requests are handled on the event loop; generation runs on the answering deployment's
worker thread, and a stream's tokens come back through an asyncio queue. A client that
disconnects mid-stream sets the generation's cancel flag, which the runtime loop checks at
every token, so its slot is free at the next token boundary.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmops.app.serving import schemas
from llmops.app.serving.deploy import AliasWatcher, Deployment, Router, Source
from llmops.app.serving.engines import GenParams, Generation, NoChatTemplate
from llmops.app.serving.guard import HostGuard, is_loopback_address, parse_json, require_json
from llmops.app.serving.metrics import Metrics
from llmops.app.serving.schemas import BadRequest
from llmops.app.serving.tracing import RequestRecord, Tracer, bound_messages, clip
from llmops.registry import traces as T

VERSION_HEADER = "X-Llmops-Model-Version"
MODEL_HEADER = "X-Llmops-Model"


@dataclass
class Limits:
    max_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    max_queue: int = 16
    slots: int = 1

    @property
    def capacity(self) -> int:
        return self.slots + self.max_queue


@dataclass
class ServerState:
    source: Source
    router: Router
    metrics: Metrics
    tracer: Tracer
    limits: Limits
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    watcher: AliasWatcher | None = None
    pending: int = 0
    started_at: float = field(default_factory=time.time)


def _error(status: int, message: str, *, code: str = "invalid_request_error", param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _version_headers(d: Deployment) -> dict[str, str]:
    return {MODEL_HEADER: d.name, VERSION_HEADER: d.version}


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


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="llmops serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics, tracer, limits = state.metrics, state.tracer, state.limits
    app.add_middleware(HostGuard, api_key=state.api_key, allowed_hosts=state.allowed_hosts,
                       on_refused=lambda path: metrics.refused.labels(path.strip("/") or "/", "403").inc())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = {404: "no such endpoint: this server answers /v1/chat/completions, /v1/completions, /v1/models, "
                    "/health and /metrics", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, msg, code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code,
                                                                                                  "http_error"))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}", code="internal_error")

    def authorized(request: Request) -> bool:
        if not state.api_key:
            return True
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), state.api_key.encode())

    def unauthorized(endpoint: str) -> JSONResponse:
        metrics.refused.labels(endpoint, "401").inc()
        return _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY' (the server's --api-key "
                           "or LLMOPS_API_KEY)", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def may_see_details(request: Request) -> bool:
        """The model's location, hash and swap errors go to a client with the key, or, where no key
        is set, to a client on this machine; anyone else learns only that the server is up."""
        if state.api_key:
            return authorized(request)
        return request.client is not None and is_loopback_address(request.client.host)

    # -- plain endpoints ----------------------------------------------------------------
    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        d = state.router.current
        if not may_see_details(request):
            return JSONResponse({"status": "ok"})
        w = state.watcher
        return JSONResponse({
            "status": "ok", "ref": state.source.ref, **d.describe(),
            "in_flight": state.pending, "queue_limit": limits.max_queue,
            "following": f"models:/{state.source.name}@{state.source.alias}" if w else None,
            "swapping_to": w.swapping if w else None,
            "last_swap": w.last_swap.to_dict() if w and w.last_swap else None,
            "traces": {"enabled": tracer.enabled, "written": tracer.written, "failed": tracer.failed,
                       "dropped": tracer.dropped},
            "uptime_s": round(time.time() - state.started_at, 3),
        }, headers=_version_headers(d))

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if not authorized(request):
            return unauthorized("metrics")
        metrics.in_flight.set(state.pending)
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        if not authorized(request):
            return unauthorized("models")
        d = state.router.current
        entry = {"object": "model", "created": int(d.loaded_at), "owned_by": "llmops", "version": d.version,
                 "ref": state.source.ref}
        return JSONResponse({"object": "list", "data": [{"id": d.name, **entry}, {"id": d.label, **entry}]},
                            headers=_version_headers(d))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _complete(request, "chat.completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(request, "completions")

    # -- the generation path ------------------------------------------------------------
    async def read_body(request: Request) -> tuple[Any, int]:
        """The JSON body and its size in bytes."""
        require_json(request.headers.get("content-type"))
        cl = request.headers.get("content-length", "")
        if cl.isdigit() and int(cl) > limits.max_body_bytes:
            raise BadRequest(f"request body of {cl} bytes exceeds this server's limit of {limits.max_body_bytes} "
                             "bytes (--max-request-bytes)", status=413, code="request_too_large")
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limits.max_body_bytes:
                raise BadRequest(f"request body exceeds this server's limit of {limits.max_body_bytes} bytes "
                                 "(--max-request-bytes)", status=413, code="request_too_large")
        return parse_json(bytes(buf)), len(buf)

    def check_model(req: schemas._Sampling, d: Deployment) -> None:
        if req.model in (None, "", d.name, d.label, state.source.ref, f"models:/{d.label}"):
            return
        raise BadRequest(f"model '{req.model}' is not served here: this server serves '{d.name}' "
                         f"({state.source.ref}, now version {d.version})", status=404, code="model_not_found",
                         param="model")

    def params_of(req: schemas._Sampling) -> GenParams:
        return GenParams(
            max_tokens=req.limit() or limits.max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p), stop=req.stops(), seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        )

    def finish(rec: RequestRecord, d: Deployment) -> None:
        rec.t_end = rec.t_end or time.perf_counter()
        state.router.release(d)
        state.pending -= 1
        metrics.answered(name=rec.name, version=rec.version, endpoint=rec.endpoint, status=rec.status,
                         latency_s=(rec.latency_ms or 0) / 1000.0 if rec.status == T.STATUS_OK else None,
                         ttft_s=(rec.ttft_ms / 1000.0) if rec.ttft_ms is not None and rec.status == T.STATUS_OK else None,
                         prompt_tokens=rec.prompt_tokens, completion_tokens=rec.completion_tokens)
        tracer.request(rec)

    async def _complete(request: Request, endpoint: str) -> Response:
        t_arrival, start_ns = time.perf_counter(), time.time_ns()
        if not authorized(request):
            return unauthorized(endpoint)
        kind = schemas.ChatRequest if endpoint == "chat.completions" else schemas.CompletionRequest
        try:
            body, body_bytes = await read_body(request)
            req = schemas.parse(kind, body)
            check_model(req, state.router.current)
            params = params_of(req)
            if params.max_tokens > limits.max_tokens:
                raise BadRequest(f"max_tokens {params.max_tokens} exceeds this server's limit of {limits.max_tokens} "
                                 "(--max-tokens)", param="max_tokens")
            if state.pending >= limits.capacity:
                raise BadRequest(f"the server is busy: {state.pending} requests running or queued (--max-queue "
                                 f"{limits.max_queue}); retry shortly", status=503, code="overloaded",
                                 headers={"Retry-After": "1"})
        except BadRequest as e:
            metrics.refused.labels(endpoint, str(e.status)).inc()
            return _error(e.status, e.message, code=e.code, param=e.param, headers=e.headers)

        state.pending += 1
        d = state.router.acquire()
        rec = RequestRecord(endpoint=endpoint, start_ns=start_ns, t_arrival=t_arrival, name=d.name, version=d.version,
                            alias=d.alias, logged_model_id=d.logged_model_id, t_acquired=time.perf_counter(),
                            acquired_ms=int(time.time() * 1000), stream=req.stream)
        loop = asyncio.get_running_loop()
        handed_over = False
        cancel = threading.Event()
        try:
            if isinstance(req, schemas.ChatRequest):
                msgs = [m.for_template() for m in req.messages]
                rec.inputs = {"messages": bound_messages(msgs)}
                build = lambda: d.engine.chat_prompt(msgs)  # noqa: E731
            else:
                text = req.text()
                rec.inputs = {"prompt": clip(text)}
                build = lambda: d.engine.text_prompt(text)  # noqa: E731
            try:
                prompt = await asyncio.wrap_future(d.submit(build))
            except NoChatTemplate as e:
                raise BadRequest(str(e), code="no_chat_template") from None
            except Exception as e:  # noqa: BLE001 - a template that refuses these messages (raise_exception)
                raise BadRequest(f"the model's chat template refused these messages: {e}", param="messages") from None
            rec.prompt_tokens = n = len(prompt.tokens)
            room = d.engine.n_ctx - n
            if room < 1:
                raise BadRequest(f"the prompt has {n} tokens and this model's context holds {d.engine.n_ctx} "
                                 "(--ctx): shorten it", code="context_length_exceeded", param="messages"
                                 if endpoint == "chat.completions" else "prompt")
            params.max_tokens = min(params.max_tokens, room)
            gen = Generation()
            created = int(time.time())
            rid = f"{'chatcmpl' if endpoint == 'chat.completions' else 'cmpl'}-{uuid.uuid4().hex}"

            def usage() -> dict[str, int]:
                return {"prompt_tokens": n, "completion_tokens": gen.completion_tokens,
                        "total_tokens": n + gen.completion_tokens}

            if not req.stream:
                def run() -> str:
                    rec.t_slot = time.perf_counter()
                    return "".join(d.engine.generate(prompt, params, cancel, gen))

                text_out = await asyncio.wrap_future(d.submit(run))
                rec.t_end, rec.t_first = time.perf_counter(), gen.first_token_at
                rec.completion_tokens, rec.finish_reason, rec.output = gen.completion_tokens, gen.finish_reason, text_out
                if endpoint == "chat.completions":
                    choice = {"index": 0, "message": {"role": "assistant", "content": text_out},
                              "logprobs": None, "finish_reason": gen.finish_reason}
                    body = {"id": rid, "object": "chat.completion", "created": created, "model": d.label,
                            "choices": [choice], "usage": usage()}
                else:
                    choice = {"index": 0, "text": text_out, "logprobs": None, "finish_reason": gen.finish_reason}
                    body = {"id": rid, "object": "text_completion", "created": created, "model": d.label,
                            "choices": [choice], "usage": usage()}
                return JSONResponse(body, headers=_version_headers(d))

            # -- streaming: tokens come back from the worker through a queue
            q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

            def push(item: tuple[str, Any]) -> None:
                loop.call_soon_threadsafe(q.put_nowait, item)

            def run_stream() -> None:
                rec.t_slot = time.perf_counter()
                try:
                    if not cancel.is_set():
                        for piece in d.engine.generate(prompt, params, cancel, gen):
                            push(("text", piece))
                    push(("end", None))
                except BaseException as exc:  # noqa: BLE001 - reported to the client as an error event
                    push(("error", exc))

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chat_mode = endpoint == "chat.completions"

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
                    cancel.set()
                    rec.status, rec.http_status, rec.finish_reason = T.STATUS_CANCELLED, 499, "cancelled"
                    rec.t_first = gen.first_token_at
                    rec.completion_tokens = gen.completion_tokens
                finish(rec, d)

            async def events() -> AsyncIterator[bytes]:
                done = False
                pieces: list[str] = []
                try:
                    if chat_mode:
                        yield chunk("", role=True)
                    while True:
                        kind_, val = await q.get()
                        if kind_ == "text":
                            pieces.append(val)
                            yield chunk(val)
                        elif kind_ == "end":
                            break
                        else:
                            rec.status, rec.http_status = T.STATUS_ERROR, 500
                            rec.error = f"{type(val).__name__}: {' '.join(str(val).split())[:300]}"
                            err = {"error": {"message": f"generation failed: {rec.error}", "type": "server_error",
                                             "param": None, "code": "internal_error"}}
                            yield b"data: " + json.dumps(err).encode() + b"\n\n"
                            done = True
                            return
                    rec.t_end, rec.t_first = time.perf_counter(), gen.first_token_at
                    rec.completion_tokens, rec.finish_reason = gen.completion_tokens, gen.finish_reason
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

            d.submit(run_stream)
            handed_over = True
            headers = {**_version_headers(d), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return _Stream(events(), lambda: close_stream(False, []), media_type="text/event-stream", headers=headers)
        except BadRequest as e:
            rec.status, rec.http_status, rec.error = T.STATUS_REJECTED, e.status, e.message
            # a refused request is traced by its size, never its body: a client could fill the store
            rec.inputs = {"refused_body_bytes": body_bytes}
            metrics.refused.labels(endpoint, str(e.status)).inc()
            return _error(e.status, e.message, code=e.code, param=e.param, headers={**e.headers, **_version_headers(d)})
        except asyncio.CancelledError:
            cancel.set()
            rec.status, rec.http_status = T.STATUS_CANCELLED, 499
            raise
        except Exception as e:  # noqa: BLE001 - one bad request is a 500, never a dead worker
            rec.status, rec.http_status = T.STATUS_ERROR, 500
            rec.error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            return _error(500, f"generation failed: {rec.error}", code="internal_error", headers=_version_headers(d))
        finally:
            if not handed_over:
                finish(rec, d)

    return app
