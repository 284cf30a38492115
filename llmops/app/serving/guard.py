"""What a request must be before the server reads it: from whom (``Host``, ``Origin``) and in
what form (``Content-Type: application/json``, JSON a parser can take).

A server on loopback without an API key trusts whoever can connect, and a web page in the
user's browser can connect: a cross-site ``text/plain`` POST needs no CORS preflight, and a
DNS-rebinding page (its own name re-pointed at 127.0.0.1) reads the answers as same-origin.
So, unless a key is set, the request's ``Host`` must be a name that cannot be rebound — a
loopback name, an IP address literal — or one the operator allowed (``--allowed-host``); a
browser's ``Origin``, when sent, must be such a host too; and every body is JSON by its
``Content-Type``, which a page can send cross-site only after a preflight this server never
grants. With a key, the bearer header (which a page cannot add cross-site without that same
preflight) is the check.

Written as plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which re-wraps
streaming responses and delays a disconnected client's cancellation.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from llmops.app.serving.schemas import BadRequest

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def split_host(value: str) -> str:
    """The host part of a ``Host`` header value (``name:port``, ``[v6]:port``), lower-cased."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[1:v.find("]")] if "]" in v else v[1:]
    if v.count(":") == 1:
        return v.split(":", 1)[0]
    return v  # a bare IPv6 address, or a name without a port


def host_allowed(host: str, allowed: Iterable[str] = ()) -> bool:
    """Whether ``host`` (no port) cannot be a rebound name: a loopback name (``*.localhost``
    included), an IP literal, or one of ``allowed``."""
    h = host.strip().strip("[]").rstrip(".").lower()
    if not h:
        return False
    if h in LOOPBACK_NAMES or h.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(h.split("%", 1)[0])
        return True
    except ValueError:
        pass
    return h in {a.strip().strip("[]").rstrip(".").lower() for a in allowed}


def is_loopback_address(address: str) -> bool:
    """Whether a peer's address is this machine's loopback (an IPv4-mapped one included)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def origin_allowed(origin: str, allowed: Iterable[str] = ()) -> bool:
    """A browser's ``Origin`` (``scheme://host[:port]``; ``null`` from sandboxed frames and files)."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    return host_allowed(parts.hostname, allowed)


class HostGuard:
    """ASGI middleware refusing, when no API key is set, requests whose ``Host`` or ``Origin``
    is not a host this server answers (403, OpenAI's error shape)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, allowed_hosts: Iterable[str] = (),
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.api_key = api_key
        self.allowed = tuple(allowed_hosts)
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or self.api_key:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = split_host(headers.get("host", ""))
        problem = None
        if not host_allowed(host, self.allowed):
            problem = (f"Host '{host[:100]}' is not one this server answers without an API key: use "
                       "127.0.0.1 or localhost, start it with --allowed-host NAME, or set --api-key")
        elif "origin" in headers and not origin_allowed(headers["origin"], self.allowed):
            problem = (f"requests from the web page at {headers['origin'][:100]!r} are refused: this server has no "
                       "API key (set --api-key to serve browsers on other sites)")
        if problem is None:
            await self.app(scope, receive, send)
            return
        if self.on_refused is not None:
            self.on_refused(scope.get("path", ""))
        body = json.dumps({"error": {"message": problem, "type": "invalid_request_error", "param": None,
                                     "code": "forbidden_host"}}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def require_json(content_type: str | None) -> None:
    """A body is JSON by its ``Content-Type`` (``application/json``, any parameters), or 415."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise BadRequest(f"Content-Type must be application/json, not {media or 'missing'!r}", status=415,
                         code="unsupported_media_type")


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or one 400 line: invalid JSON, nesting deeper than the parser's stack,
    an integer past Python's digit limit (both of which ``json.loads`` raises as something
    other than a decode error)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise BadRequest("the request body nests too deeply", code="invalid_json") from None
    except UnicodeDecodeError as e:
        raise BadRequest(f"the request body is not valid UTF-8 JSON: {e.reason}", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, and integers of more digits than int() takes
        msg = " ".join(str(e).split())[:200]
        raise BadRequest(f"the request body is not valid JSON: {msg}", code="invalid_json") from None
