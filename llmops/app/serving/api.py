"""The HTTP face of ``llmops serve``: OpenAI's chat and completion endpoints on FastAPI, and the
tokenizer endpoints an evaluation harness probes.

What the runtimes do not do is written here and beside it: the OpenAI response and chunk
envelopes (llama-cpp-python's own server needs three more packages and knows nothing of
versions, swaps or traces; onnxruntime-genai has no server), the per-request accounting that
names the version that answered, admission (a bounded queue answering 503 with
``Retry-After``), and errors as OpenAI's JSON ``{"error": {...}}`` with a 4xx status naming
the problem. The generation path is :mod:`llmops.app.serving.completions`.

``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` are vLLM's (lm-eval's
``local-completions`` model finds them at the server's root and tokenizes through them, so
its token counts are the served model's own); like every endpoint but ``/health``, they
need the key where one is set.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmops.app.serving.completions import complete
from llmops.app.serving.guard import HostGuard
from llmops.app.serving.schemas import BadRequest
from llmops.app.serving.state import (  # noqa: F401
    MODEL_HEADER,
    VERSION_HEADER,
    Limits,
    ServerState,
    authorized,
    check_tokens,
    error,
    may_see_details,
    read_body,
    unauthorized,
    version_headers,
)

ENDPOINTS = ("/v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize, /tokenizer_info, "
             "/health and /metrics")


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="llmops serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics, tracer, limits = state.metrics, state.tracer, state.limits
    app.add_middleware(HostGuard, api_key=state.api_key, allowed_hosts=state.allowed_hosts,
                       on_refused=lambda path: metrics.refused.labels(path.strip("/") or "/", "403").inc())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no such endpoint: this server answers {ENDPOINTS}", 405: "method not allowed"}.get(
            exc.status_code, str(exc.detail))
        return error(exc.status_code, msg, code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code,
                                                                                                 "http_error"))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}", code="internal_error")

    # -- plain endpoints ----------------------------------------------------------------
    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        d = state.router.current
        if not may_see_details(state, request):
            return JSONResponse({"status": "ok"})
        w = state.watcher
        return JSONResponse({
            "status": "ok", "ref": state.source.ref, **d.describe(),
            "in_flight": state.pending, "queued": state.queued(), "queue_limit": limits.max_queue,
            "following": f"models:/{state.source.name}@{state.source.alias}" if w else None,
            "swapping_to": w.swapping if w else None,
            "last_swap": w.last_swap.to_dict() if w and w.last_swap else None,
            "traces": {"enabled": tracer.enabled, "written": tracer.written, "failed": tracer.failed,
                       "dropped": tracer.dropped, "backlog": tracer.backlog, "retried": tracer.retried},
            "uptime_s": round(time.time() - state.started_at, 3),
        }, headers=version_headers(d))

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if not authorized(state, request):
            return unauthorized(state, "metrics")
        metrics.in_flight.set(state.pending)
        metrics.queued.set(state.queued())
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        if not authorized(state, request):
            return unauthorized(state, "models")
        d = state.router.current
        entry = {"object": "model", "created": int(d.loaded_at), "owned_by": "llmops", "version": d.version,
                 "ref": state.source.ref, "max_model_len": d.engine.n_ctx}
        return JSONResponse({"object": "list", "data": [{"id": d.name, **entry}, {"id": d.label, **entry}]},
                            headers=version_headers(d))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await complete(state, request, "chat.completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(state, request, "completions")

    # -- the tokenizer, as vLLM exposes it ---------------------------------------------------
    async def tokenizer_call(request: Request, endpoint: str, work: Any) -> Response:
        """``work(body, deployment)`` on the current version's tokenizer, the body checked first."""
        if not authorized(state, request):
            return unauthorized(state, endpoint)
        d = state.router.acquire()
        try:
            body = None
            if request.method == "POST":
                body, _ = await read_body(limits, request)
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
            result = await asyncio.wrap_future(d.call(lambda: work(body, d)))
            return JSONResponse(result, headers=version_headers(d))
        except BadRequest as e:
            metrics.refused.labels(endpoint, str(e.status)).inc()
            return error(e.status, e.message, code=e.code, param=e.param, headers=e.headers)
        finally:
            state.router.release(d)

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> Response:
        return await tokenizer_call(request, "tokenizer_info", lambda _b, d: d.engine.tokenizer_info())

    def _tokenize(body: dict[str, Any], d: Any) -> dict[str, Any]:
        text, special = body.get("prompt"), body.get("add_special_tokens", True)
        if "messages" in body:
            raise BadRequest("'messages': tokenize a chat through /v1/chat/completions's usage; here send 'prompt'",
                             param="messages", code="unsupported_parameter")
        if not isinstance(text, str):
            raise BadRequest("'prompt' is required and must be a string", param="prompt")
        if not isinstance(special, bool):
            raise BadRequest("'add_special_tokens' must be true or false", param="add_special_tokens")
        tokens = d.engine.tokenize(text, special)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": d.engine.n_ctx}

    def _detokenize(body: dict[str, Any], d: Any) -> dict[str, Any]:
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise BadRequest("'tokens' is required and must be a list of token ids", param="tokens")
        check_tokens(tokens, d.engine.n_vocab, "tokens")
        return {"prompt": b"".join(d.engine.piece(t) for t in tokens).decode("utf-8", errors="replace")}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await tokenizer_call(request, "tokenize", _tokenize)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await tokenizer_call(request, "detokenize", _detokenize)

    return app
