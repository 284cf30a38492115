"""``llmops serve``: resolve REF, load and verify its version, follow its alias, run uvicorn."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from llmops.app.output import emit, log
from llmops.app.server import is_loopback, port_free, url_host
from llmops.core.errors import LLMOpsError, UsageError


def exposure_warning(host: str, api_key: str | None) -> str | None:
    if api_key or is_loopback(host):
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach this port can use the model; "
            "set --api-key or LLMOPS_API_KEY (clients then send 'Authorization: Bearer KEY')")


def serve(store_factory: Callable[[], Any], ref: str, *, host: str = "127.0.0.1", port: int = 8000,
          device: str = "cpu", threads: int | None = None, api_key: str | None = None,
          allowed_hosts: tuple[str, ...] = (), n_ctx: int = 2048,
          max_tokens: int = 1024, max_queue: int = 16, max_body_bytes: int = 1 << 20, poll_s: float = 2.0,
          trace: bool = True, json_mode: bool = False) -> int:
    from llmops.app.serving.deploy import AliasWatcher, Loader, Router, parse_source

    source = parse_source(ref)
    if not port_free(host, port):
        raise LLMOpsError(f"port {port} on {host} is in use: choose another with --port")
    warning = exposure_warning(host, api_key)
    if warning:
        log(warning)
    store = store_factory() if (trace or source.kind != "path") else None
    if store is not None:
        store.open()

    from llmops.app.serving.api import Limits, ServerState, create_app
    from llmops.app.serving.metrics import Metrics
    from llmops.app.serving.tracing import Tracer

    tracing = trace and store is not None
    loader = Loader(store, device=device, threads=threads, n_ctx=n_ctx, link_traces=tracing)
    metrics = Metrics()
    t0 = time.perf_counter()
    if source.kind == "alias":
        from llmops.registry.versions import resolve_model_version

        version = str(resolve_model_version(store, source.ref).version)
        first = loader.deploy(source.name, version, source.alias)
    elif source.kind == "version":
        from llmops.registry.versions import resolve_model_version

        version = str(resolve_model_version(store, source.ref).version)
        first = loader.deploy(source.name, version, None)
    else:
        first = loader.deploy_path(source)
    log(f"loaded {source.ref} (version {first.version}, {first.engine.backend}) in {time.perf_counter() - t0:.2f} s"
        + (" after checking its sha256" if first.sha256 else ""))
    router = Router(first)
    metrics.serving(first.name, first.version)
    tracer = Tracer(store, tracing, log)
    state = ServerState(source=source, router=router, metrics=metrics, tracer=tracer,
                        limits=Limits(max_tokens=max_tokens, max_body_bytes=max_body_bytes, max_queue=max_queue),
                        api_key=api_key or None, allowed_hosts=tuple(allowed_hosts))
    if source.kind == "alias":
        def on_swap(ev) -> None:  # noqa: ANN001 - deploy.SwapEvent
            metrics.swaps.labels(source.name, "ok" if ev.ok else "failed").inc()
            if ev.ok:
                metrics.serving(source.name, ev.to_version, ev.from_version)
            tracer.swap(name=source.name, alias=ev.alias, from_version=ev.from_version, to_version=ev.to_version,
                        ok=ev.ok, seconds=ev.seconds, error=ev.error,
                        logged_model_id=router.current.logged_model_id if ev.ok else None)

        state.watcher = AliasWatcher(store, source.name, source.alias, router, loader, poll_s, log, on_swap=on_swap)

    import uvicorn

    app = create_app(state)
    url = f"http://{url_host(host)}:{port}"

    cleaned = []

    def cleanup() -> None:
        """Stop following the alias, write the traces still queued (bounded), unload."""
        if cleaned:
            return
        cleaned.append(True)
        if state.watcher is not None:
            state.watcher.stop()
        if tracer.enabled and not tracer.flush(timeout=60.0):
            log("warning: some traces were still being written when the server stopped")
        router.close()

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            # uvicorn re-raises the signal that stopped it once serve() returns, which ends the
            # process: the queued traces are written here, after the last request has finished.
            await super().shutdown(sockets=sockets)
            import asyncio

            await asyncio.to_thread(cleanup)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.should_exit:
                return
            if state.watcher is not None:
                state.watcher.start()
            if json_mode:
                emit(True, {"url": url, "base_url": f"{url}/v1", "pid": os.getpid(), "ref": source.ref,
                            **first.describe(), "tracing": tracer.enabled,
                            **({"store": store.describe()} if store is not None else {})})
            log(f"serving {source.ref} (version {first.version}) at {url}/v1"
                + (f", following the alias every {poll_s:g} s" if state.watcher else "") + " (Ctrl-C to stop)")

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=30, timeout_keep_alive=30)
    server = _Server(config)
    import signal

    # uvicorn stops gracefully on SIGTERM/SIGINT, then re-raises the signal: end with status 0
    # (a service manager's stop, or Ctrl-C, is not a failure).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        cleanup()
    return 0 if server.started else 1


def parse_size(text: str) -> int:
    """``1048576``, ``512k``, ``1m`` (binary units) as bytes."""
    t = (text or "").strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in ("k", "m", "g") else t
    try:
        value = int(float(num) * mult)
    except ValueError:
        raise UsageError(f"--max-request-bytes {text!r}: give a size such as 1048576, 512k or 1m") from None
    if value < 1024:
        raise UsageError("--max-request-bytes: at least 1k")
    return value

