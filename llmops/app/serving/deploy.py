"""What is served: the REF's versions loaded, verified and probed, and the switch between them.

A :class:`Deployment` is one loaded version with its engine (which runs its requests on a
thread of its own, several at once where it batches) and a count of the requests holding it. The
:class:`Router` hands the current deployment to each new request and, on a swap, makes the
new one current in one step under a lock; the old one is unloaded when its last request
lets go of it. The :class:`AliasWatcher` polls the alias through MLflow's client and runs
the swap: materialise and verify the new version's bytes against the registry's sha256,
load it beside the old one (its own engine, its own batch), warm it with a probe prompt,
switch: requests already running finish on the old one. If any step fails the old
version keeps serving, one line is logged, and the failed switch is recorded (a trace, a
metric, ``/health``).

MLflow has no push notification for an alias move on a database-backed store (its webhooks
need a tracking server that can reach us), so the watcher polls; a poll is one indexed
query.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmops.app.serving.engines import (
    Engine,
    GenParams,
    Job,
    Observer,
    open_engine,
    run_to_end,
)
from llmops.core.errors import LLMOpsError, UsageError

PROBE_PROMPT = "Hello"
PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Source:
    """What ``llmops serve REF`` serves: an alias to follow, a pinned version, or a path."""

    kind: str  # alias, version, path
    name: str
    alias: str | None = None
    version: str | None = None
    path: Path | None = None

    @property
    def ref(self) -> str:
        if self.kind == "alias":
            return f"models:/{self.name}@{self.alias}"
        if self.kind == "version":
            return f"models:/{self.name}/{self.version}"
        return str(self.path)


def parse_source(ref: str) -> Source:
    from llmops.registry.refs import is_ref, parse_ref

    if is_ref(ref):
        r = parse_ref(ref, kind="model")
        if r.alias:
            return Source("alias", r.name, alias=r.alias)
        if not r.version:
            raise UsageError(f"{ref}: name a version (models:/NAME/VERSION) or an alias (models:/NAME@ALIAS)")
        return Source("version", r.name, version=str(r.version))
    p = Path(ref).expanduser()
    if not p.exists():
        raise UsageError(f"{ref}: no such file or folder, and not a models:/ reference")
    p = p.resolve()
    name = re.sub(r"[^A-Za-z0-9._-]", "-", p.stem if p.is_file() else p.name).strip("-.") or "model"
    return Source("path", name[:128], path=p)


class Deployment:
    """One loaded version and the engine that runs it."""

    def __init__(self, name: str, version: str, alias: str | None, engine: Engine, *, sha256: str | None,
                 fmt: str | None, path: Path, logged_model_id: str | None = None) -> None:
        self.name, self.version, self.alias = name, version, alias
        self.engine, self.sha256, self.fmt, self.path = engine, sha256, fmt, path
        self.logged_model_id = logged_model_id
        self.loaded_at = time.time()
        self.refs = 0
        self.retired = False
        self.closed = False
        self.timings: dict[str, float] = {}

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"

    def call(self, fn: Callable[[], Any]) -> Future:
        """Tokenizer work, where the engine allows it (off the event loop)."""
        return self.engine.call(fn)

    def submit(self, job: Job) -> None:
        self.engine.submit(job)

    def probe(self, timeout: float = PROBE_TIMEOUT_S) -> None:
        """Generate two tokens from a short prompt: loads lazily-mapped weights, allocates the
        compute buffers, and proves the version answers."""
        _, out = run_to_end(self.engine, self.engine.text_prompt(PROBE_PROMPT), GenParams(max_tokens=2, temperature=0.0),
                            timeout)
        if out.first_token_at is None:
            raise LLMOpsError("the probe prompt produced no token")

    def close(self) -> None:
        """Unload once the jobs already handed in have ended (the engine's thread owns the runtime)."""
        self.closed = True
        self.engine.close()

    def cut(self) -> None:
        """Cancel what runs on this version (a shutdown past its grace)."""
        cut = getattr(self.engine, "cut", None)
        if cut is not None:
            cut()

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "version": self.version, "alias": self.alias, "format": self.fmt,
                "backend": self.engine.backend, "sha256": self.sha256, "n_ctx": self.engine.n_ctx,
                "parallel": self.engine.parallel, "failed": getattr(self.engine, "failed", None),
                "loaded_at": self.loaded_at}


class Router:
    """The current deployment, switched atomically; old ones unloaded when their last request ends."""

    def __init__(self, first: Deployment) -> None:
        self._lock = threading.Lock()
        self.current = first
        self._retiring: list[Deployment] = []  # switched away from, requests still running on them

    def acquire(self) -> Deployment:
        with self._lock:
            d = self.current
            d.refs += 1
            return d

    def release(self, d: Deployment) -> None:
        with self._lock:
            d.refs -= 1
            unload = d.retired and d.refs == 0 and not d.closed
            if unload:
                d.closed = True
                if d in self._retiring:
                    self._retiring.remove(d)
        if unload:
            d.close()

    def switch(self, new: Deployment) -> Deployment:
        with self._lock:
            old, self.current = self.current, new
            old.retired = True
            unload = old.refs == 0 and not old.closed
            if unload:
                old.closed = True
            elif not old.closed:
                self._retiring.append(old)
        if unload:
            old.close()
        return old

    def in_flight(self) -> int:
        with self._lock:
            return self.current.refs

    def close(self) -> None:
        with self._lock:
            d = self.current
            if d.closed:
                return
            d.closed = True
        d.close()

    def cut(self) -> None:
        """Cancel every request running on any version still loaded."""
        with self._lock:
            live = [self.current, *self._retiring]
        for d in live:
            d.cut()


@dataclass
class Fetched:
    path: Path
    sha256: str
    fmt: str | None
    run_id: str | None


class Loader:
    """Registry versions to loaded, verified, probed deployments."""

    def __init__(self, store, *, device: str, threads: int | None, n_ctx: int,  # noqa: ANN001 - Store | None
                 link_traces: bool = True, parallel: int | None = None,
                 observer: Callable[[str, str], Observer] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.device, self.threads, self.n_ctx = device, threads, n_ctx
        self.link_traces = link_traces
        self.parallel = parallel
        self.observer = observer
        self.log = log

    def _open(self, path: Path, fmt: str | None, name: str, version: str) -> Engine:
        observer = self.observer(name, version) if self.observer else None
        engine = open_engine(path, fmt, n_ctx=self.n_ctx, threads=self.threads, device=self.device,
                             parallel=self.parallel, observer=observer, name=f"{name}-v{version}")
        if self.log is not None and hasattr(engine, "log"):
            engine.log = self.log
        return engine

    def fetch(self, name: str, version: str) -> Fetched:
        """The version's bytes on local disk, checked against the registry's sha256, at a path
        that nothing but the store or this cache writes to.

        What is loaded must be what was verified, and llama.cpp and onnxruntime open the file
        again by its name after the check (and map it: a change in place reaches a running
        server). A store file is the store's own copy. One registered with ``--link`` is not:
        it is also its owner's file, and an edit of it in place, between the check and the
        load or later, would go live unverified. Bytes with another hard link are therefore
        copied into the serve cache (a reflink where the filesystem has them), hashed on the
        way, the hash being of the copy's own bytes, and served from that private, read-only
        copy: one read, as the check alone costs, and disk space only for linked versions.

        Behind a tracking server the bytes are downloaded into the same cache, checked before
        they take their place; a cache entry is re-hashed before each use, and one that no
        longer matches is removed and fetched again."""
        from llmops.app.serving.cache import cached, check, shared
        from llmops.core.hashing import copy_path_hashing, sha256_path
        from llmops.registry import artifacts
        from llmops.registry.versions import artifact_for, resolve_model_version, run_of

        mv = resolve_model_version(self.store, f"models:/{name}/{version}")
        art = artifact_for(self.store, "model", name, str(mv.version))
        if art is None:
            raise LLMOpsError(f"models:/{name}/{version} has no llmops record (no sha256 to check its bytes against)")
        label = f"models:/{name}/{version}"
        local = artifacts.local_path(art.uri)
        if local is None:
            import mlflow.artifacts

            def download(tmp: Path) -> str:
                got = Path(mlflow.artifacts.download_artifacts(artifact_uri=art.uri, dst_path=str(tmp),
                                                               tracking_uri=self.store.settings.tracking_uri))
                return sha256_path(got)

            path = cached(art.sha256, art.uri, label, download)
        elif not local.exists():
            raise LLMOpsError(f"the stored bytes of {label} are missing: {local}")
        elif shared(local):
            path = cached(art.sha256, art.uri, label, lambda tmp: copy_path_hashing(local, tmp / local.name, fsync=False))
        else:
            check(sha256_path(local), art.sha256, label)
            path = local
        return Fetched(path, art.sha256, art.format, run_of(mv))

    def deploy(self, name: str, version: str, alias: str | None) -> Deployment:
        t0 = time.perf_counter()
        f = self.fetch(name, version)
        t1 = time.perf_counter()
        engine = self._open(f.path, f.fmt, name, version)
        t2 = time.perf_counter()
        logged = None
        if self.link_traces:
            from llmops.registry.traces import logged_model_for

            logged = logged_model_for(self.store, name, version, f.run_id)
        d = Deployment(name, version, alias, engine, sha256=f.sha256, fmt=f.fmt, path=f.path, logged_model_id=logged)
        try:
            t3 = time.perf_counter()
            d.probe()
        except BaseException:
            d.close()
            raise
        d.timings = {"verify_s": t1 - t0, "load_s": t2 - t1, "probe_s": time.perf_counter() - t3}
        return d

    def deploy_path(self, source: Source) -> Deployment:
        engine = self._open(source.path, None, source.name, "local")
        d = Deployment(source.name, "local", None, engine, sha256=None, fmt=None, path=source.path)
        try:
            d.probe()
        except BaseException:
            d.close()
            raise
        return d


@dataclass
class SwapEvent:
    at: float
    alias: str
    from_version: str
    to_version: str
    ok: bool
    seconds: float
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "alias": self.alias, "from_version": self.from_version, "to_version": self.to_version,
                "ok": self.ok, "seconds": round(self.seconds, 3), "error": self.error}


@dataclass
class AliasWatcher:
    """Polls ``models:/NAME@ALIAS`` and swaps the router's deployment when it moves."""

    store: Any
    name: str
    alias: str
    router: Router
    loader: Loader
    poll_s: float
    log: Callable[[str], None]
    on_swap: Callable[[SwapEvent], None] = lambda e: None
    last_swap: SwapEvent | None = None
    swapping: str | None = None
    _retry_at: dict[str, float] = field(default_factory=dict)
    _tries: dict[str, int] = field(default_factory=dict)
    _lookup_failing: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    BACKOFF_S = (5.0, 15.0, 60.0, 300.0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"llmops-watch-{self.name}@{self.alias}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any one bad poll
                self.log(f"warning: watching {self.name}@{self.alias}: {type(exc).__name__}: {exc}")

    def holder(self) -> str | None:
        try:
            v = str(self.store.mlflow.get_model_version_by_alias(self.name, self.alias).version)
        except Exception as exc:  # noqa: BLE001 - a missing alias or an unreachable store: keep serving
            if not self._lookup_failing:
                self.log(f"warning: cannot read {self.name}@{self.alias} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                         f"still serving version {self.router.current.version}")
                self._lookup_failing = True
            return None
        if self._lookup_failing:
            self.log(f"{self.name}@{self.alias} readable again: version {v}")
            self._lookup_failing = False
        return v

    def check(self) -> None:
        v = self.holder()
        if v is None or v == self.router.current.version:
            return
        if time.time() < self._retry_at.get(v, 0.0):
            return
        self.swap(v)

    def swap(self, version: str) -> None:
        old = self.router.current
        t0 = time.perf_counter()
        self.swapping = version
        try:
            new = self.loader.deploy(self.name, version, self.alias)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the old version keeps serving
            msg = " ".join(str(exc).split()) or type(exc).__name__
            tries = self._tries.get(version, 0)
            self._tries[version] = tries + 1
            wait = self.BACKOFF_S[min(tries, len(self.BACKOFF_S) - 1)]
            self._retry_at[version] = time.time() + wait
            ev = SwapEvent(time.time(), self.alias, old.version, version, False, time.perf_counter() - t0, msg)
            self.last_swap = ev
            self.log(f"warning: not switching {self.name}@{self.alias} to version {version}: {msg}; "
                     f"still serving version {old.version} (next try in {wait:.0f} s)")
            self.on_swap(ev)
            return
        finally:
            self.swapping = None
        self.router.switch(new)
        self._retry_at.pop(version, None)
        self._tries.pop(version, None)
        ev = SwapEvent(time.time(), self.alias, old.version, version, True, time.perf_counter() - t0)
        self.last_swap = ev
        t = new.timings
        self.log(f"{self.name}@{self.alias}: now serving version {version} (was {old.version}; {ev.seconds:.2f} s: "
                 f"sha256 checked in {t.get('verify_s', 0):.2f} s, loaded in {t.get('load_s', 0):.2f} s, "
                 f"probed in {t.get('probe_s', 0):.2f} s)")
        self.on_swap(ev)
