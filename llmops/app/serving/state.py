"""What every endpoint of ``llmops serve`` shares: the server's state and limits, the API key
check, request bodies read within the limit, and OpenAI-shaped errors."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from llmops.app.serving.deploy import AliasWatcher, Deployment, Router, Source
from llmops.app.serving.engines import Job
from llmops.app.serving.guard import is_loopback_address, parse_json, require_json
from llmops.app.serving.metrics import Metrics
from llmops.app.serving.schemas import BadRequest
from llmops.app.serving.tracing import Tracer

VERSION_HEADER = "X-Llmops-Model-Version"
MODEL_HEADER = "X-Llmops-Model"


@dataclass
class Limits:
    max_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    max_queue: int = 16
    slots: int = 1  # sequences the served version decodes at once (--parallel)

    @property
    def capacity(self) -> int:
        """Prompts admitted at once: those decoding and those waiting for a slot."""
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
    pending: int = 0  # prompts admitted and not finished
    jobs: set[Job] = field(default_factory=set)  # handed to an engine and not finished
    stopping: bool = False
    started_at: float = field(default_factory=time.time)

    def queued(self) -> int:
        """Jobs waiting for a sequence slot now."""
        return sum(1 for j in list(self.jobs) if j.out.started_at is None)


def error(status: int, message: str, *, code: str = "invalid_request_error", param: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def version_headers(d: Deployment) -> dict[str, str]:
    return {MODEL_HEADER: d.name, VERSION_HEADER: d.version}


def authorized(state: ServerState, request: Request) -> bool:
    if not state.api_key:
        return True
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), state.api_key.encode())


def unauthorized(state: ServerState, endpoint: str) -> JSONResponse:
    state.metrics.refused.labels(endpoint, "401").inc()
    return error(401, "missing or wrong API key: send 'Authorization: Bearer KEY' (the server's --api-key "
                      "or LLMOPS_API_KEY)", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def may_see_details(state: ServerState, request: Request) -> bool:
    """The model's location, hash and swap errors go to a client with the key, or, where no key
    is set, to a client on this machine; anyone else learns only that the server is up."""
    if state.api_key:
        return authorized(state, request)
    return request.client is not None and is_loopback_address(request.client.host)


async def read_body(limits: Limits, request: Request) -> tuple[Any, int]:
    """The JSON body and its size in bytes, read no further than the limit."""
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


def check_tokens(ids: list[int], n_vocab: int, param: str) -> None:
    """Token ids a client sent: each in the model's vocabulary (llama.cpp would refuse the whole
    batch, every other request in it included)."""
    for t in ids:
        if not 0 <= t < n_vocab:
            raise BadRequest(f"'{param}': token id {t} is not in this model's vocabulary (0 to {n_vocab - 1})",
                             param=param)
