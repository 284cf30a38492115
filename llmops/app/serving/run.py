"""``llmops serve``: resolve REF, load and verify its version, follow its alias, run uvicorn.

Stopping (SIGTERM, Ctrl-C) is bounded by ``--grace`` seconds from the signal: the server stops
accepting at once, lets running requests finish until the grace is over and then cuts them
(their streams end with ``finish_reason: cancelled``), writes what request traces it can in
what is left of the grace, says in one line how many it could not write, and exits. A second
signal ends it at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from llmops.app.output import emit, log
from llmops.app.server import is_loopback, port_free, url_host
from llmops.core.errors import LLMOpsError, UsageError

DEFAULT_GRACE_S = 10.0
MIN_TRACE_S = 0.5  # the trace writer's share when requests took the whole grace


def exposure_warning(host: str, api_key: str | None) -> str | None:
    if api_key or is_loopback(host):
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach this port can use the model; "
            "set --api-key or LLMOPS_API_KEY (clients then send 'Authorization: Bearer KEY')")


def serve(store_factory: Callable[[], Any], ref: str, *, host: str = "127.0.0.1", port: int = 8000,
          device: str = "cpu", threads: int | None = None, api_key: str | None = None,
          allowed_hosts: tuple[str, ...] = (), n_ctx: int = 2048, parallel: int | None = None,
          max_tokens: int = 1024, max_queue: int = 16, max_body_bytes: int = 1 << 20, poll_s: float = 2.0,
          trace: bool = True, grace_s: float = DEFAULT_GRACE_S, json_mode: bool = False) -> int:
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

    from llmops.app.serving.api import create_app
    from llmops.app.serving.metrics import Metrics
    from llmops.app.serving.state import Limits, ServerState
    from llmops.app.serving.tracing import Tracer

    tracing = trace and store is not None
    metrics = Metrics()
    loader = Loader(store, device=device, threads=threads, n_ctx=n_ctx, link_traces=tracing, parallel=parallel,
                    observer=metrics.observer, log=log)
    t0 = time.perf_counter()
    if source.kind in ("alias", "version"):
        from llmops.registry.versions import resolve_model_version

        version = str(resolve_model_version(store, source.ref).version)
        first = loader.deploy(source.name, version, source.alias if source.kind == "alias" else None)
    else:
        first = loader.deploy_path(source)
    slots = first.engine.parallel
    log(f"loaded {source.ref} (version {first.version}, {first.engine.backend}, {slots} sequence"
        f"{'s' if slots > 1 else ''} at once) in {time.perf_counter() - t0:.2f} s"
        + (" after checking its sha256" if first.sha256 else ""))
    loader.parallel = slots  # every later version batches as the first does (the queue limits assume it)
    router = Router(first)
    metrics.serving(first.name, first.version)
    metrics.parallel.labels(first.name, first.version).set(slots)
    tracer = Tracer(store, tracing, log)
    state = ServerState(source=source, router=router, metrics=metrics, tracer=tracer,
                        limits=Limits(max_tokens=max_tokens, max_body_bytes=max_body_bytes, max_queue=max_queue,
                                      slots=slots),
                        api_key=api_key or None, allowed_hosts=tuple(allowed_hosts))
    if source.kind == "alias":
        def on_swap(ev) -> None:  # noqa: ANN001 - deploy.SwapEvent
            metrics.swaps.labels(source.name, "ok" if ev.ok else "failed").inc()
            if ev.ok:
                metrics.serving(source.name, ev.to_version, ev.from_version)
                metrics.parallel.labels(source.name, ev.to_version).set(router.current.engine.parallel)
            tracer.swap(name=source.name, alias=ev.alias, from_version=ev.from_version, to_version=ev.to_version,
                        ok=ev.ok, seconds=ev.seconds, error=ev.error,
                        logged_model_id=router.current.logged_model_id if ev.ok else None)

        state.watcher = AliasWatcher(store, source.name, source.alias, router, loader, poll_s, log, on_swap=on_swap)

    import uvicorn

    app = create_app(state)
    url = f"http://{url_host(host)}:{port}"
    stop = _Stopping(state, grace_s)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if stop.signalled_at is not None:
                stop.at_once(sig)
            stop.signal(sig)
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: Any = None) -> None:
            await stop.run(self, sockets)

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
                            timeout_graceful_shutdown=int(grace_s) + 1, timeout_keep_alive=30)
    server = _Server(config)
    # uvicorn stops on SIGTERM/SIGINT (our shutdown), then re-raises the signal: end with status 0
    # (a service manager's stop, or Ctrl-C, is not a failure).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        stop.cleanup()
    return 0 if server.started else 1


class _Stopping:
    """The bounded stop: see the module's description."""

    def __init__(self, state: Any, grace_s: float) -> None:
        self.state, self.grace_s = state, grace_s
        self.signalled_at: float | None = None
        self.cut = 0
        self._cleaned = False

    def signal(self, sig: int) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
            self.state.stopping = True
            log(f"stopping: no new requests; running ones get {self.grace_s:g} s (--grace); a second "
                f"{signal.Signals(sig).name} stops at once")

    def at_once(self, sig: int) -> None:
        tracer = self.state.tracer
        log(f"stopped at once by a second {signal.Signals(sig).name}: {self.state.pending} request(s) cut, "
            f"{tracer.backlog} trace(s) not written")
        os._exit(128 + sig)

    def deadline(self) -> float:
        return (self.signalled_at or time.monotonic()) + self.grace_s

    async def run(self, server: Any, sockets: Any) -> None:
        """uvicorn's shutdown with the grace: stop listening, wait for running requests until the
        deadline, cut what still runs, then write traces until the deadline."""
        self.state.stopping = True
        for s in server.servers:
            s.close()
        for sock in sockets or []:
            sock.close()
        for conn in list(server.server_state.connections):
            conn.shutdown()
        deadline = self.deadline()
        ss = server.server_state

        def busy() -> bool:
            return bool(self.state.pending or ss.tasks)

        while busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if busy():
            self.cut = self.state.pending
            self.state.router.cut()  # the engines end every sequence at their next step
            until = time.monotonic() + 2.0
            while busy() and time.monotonic() < until:
                await asyncio.sleep(0.02)
            for t in list(ss.tasks):
                t.cancel(msg="llmops serve: the --grace is over")
        for conn in list(ss.connections):
            conn.shutdown()
        await asyncio.to_thread(self.cleanup)

    def cleanup(self) -> None:
        """Stop following the alias, write the traces still queued until the deadline, unload."""
        if self._cleaned:
            return
        self._cleaned = True
        state = self.state
        if state.watcher is not None:
            state.watcher.stop()
        tracer = state.tracer
        if tracer.enabled:
            left = max(MIN_TRACE_S, self.deadline() - time.monotonic())
            tracer.flush(timeout=left)
            parts = [f"{tracer.written} trace(s) written"]
            if tracer.unwritten or tracer.dropped:
                parts.append(f"{tracer.unwritten + tracer.dropped} dropped ({tracer.unwritten} not written within "
                             f"the {self.grace_s:g} s grace, {tracer.dropped} refused by a full queue)")
            if tracer.failed:
                parts.append(f"{tracer.failed} failed")
            log("stopped: " + (f"{self.cut} request(s) cut at the end of the grace; " if self.cut else "")
                + "; ".join(parts))
        elif self.cut:
            log(f"stopped: {self.cut} request(s) cut at the end of the grace")
        state.router.close()


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
