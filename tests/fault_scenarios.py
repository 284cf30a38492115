"""The fault campaign's scenarios: for each kind of fault, the world it needs (a SQLite store, a
PostgreSQL one, one behind a proxy or a tracking server, one on a small disk) and, set up in it,
the step that makes one injection (``faultkit.inject``). The default suite runs one step of each
in a few shared worlds, the full campaign many steps of each in a world of its own."""

from __future__ import annotations

import contextlib
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import faultenv as fe
from faultkit import Done, Outcome, Runner, World, _engine, base_env, calibrate, inject, killer

Step = Callable[[int, random.Random], Outcome]
BIG = 1 << 30


@dataclass
class Ctx:
    seed: int
    tiny_models: Callable[[str], Path]
    ggufs: Callable[[], list[Path]]
    eio_lib: Callable[[], Path]
    quick: bool = False  # the default suite's sample: no measuring runs, the sizes below instead
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def rng(self, what: str) -> random.Random:
        return random.Random(f"{self.seed}-{what}")

    def measure(self, world: World, command: list[str], seconds: float, steps: int | None = None) -> Done:
        """How long the command takes and how many steps it makes: measured by running it whole,
        or (``quick``) the typical figures given (a later whole run measures them: ``killer.update``)."""
        if self.quick:
            return Done(0, "", False, seconds, steps=steps)
        return calibrate(world, command)


def new_file(root: Path, rng: random.Random, lo: int = 64 << 10, hi: int = 512 << 10) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    f = root / f"w{rng.getrandbits(40):010x}.bin"
    f.write_bytes(rng.randbytes(rng.randint(lo, hi)))
    return f


def holder(world: World, name: str, alias: str = "production") -> str | None:
    from sqlalchemy import text

    eng = _engine(world.db_url)
    try:
        with eng.connect() as c:
            v = c.execute(text("SELECT version FROM registered_model_aliases WHERE name = :n AND alias = :a"),
                          {"n": name, "a": alias}).scalar()
    finally:
        eng.dispose()
    return None if v is None else str(v)


def holder_exists(world: World, name: str, version: str = "1") -> bool:
    from sqlalchemy import text

    eng = _engine(world.db_url)
    try:
        with eng.connect() as c:
            return c.execute(text("SELECT 1 FROM llmops_versions WHERE kind = 'model' AND name = :n AND version = :v"),
                             {"n": name, "v": version}).first() is not None
    finally:
        eng.dispose()


def other(world: World, name: str) -> str:
    return "2" if holder(world, name) == "1" else "1"


def two_versions(world: World, name: str, *payloads: Path, link: bool = False) -> None:
    for p in payloads:
        world.must("--json", "models", "register", p, "--name", name, *(["--link"] if link else []))


def convert_cmd(src: Path, out: Path, name: str, verify: bool, target: str = "gguf-q8_0") -> list[str]:
    return ["--json", "convert", str(src), "--to", target, "-o", str(out), "--register", name, "--threads", "1",
            *([] if verify else ["--no-verify"])]


# -- SIGKILL at random points of each writer ---------------------------------------------------------------
def register(kind: str, name: str) -> Callable[[World, Ctx], Step]:
    def setup(world: World, ctx: Ctx) -> Step:
        files = world.root / f"files-{name}"
        cal = ctx.measure(world, ["--json", "models", "register", str(new_file(files, ctx.rng(kind))), "--name", name],
                          1.2, 180)
        cut = killer(ctx.rng(kind + "-cut"), cal.seconds, cal.steps, writes=cal.writes)

        def step(i: int, rng: random.Random) -> Outcome:
            extra = ["--from", f"models:/{name}/1"] if rng.random() < 0.3 and holder_exists(world, name) else []
            cmd = ["--json", "models", "register", str(new_file(files, rng)), "--name", name, *extra]
            return inject(world, kind, i, cmd, cut)

        return step

    return setup


def gc_killed(world: World, ctx: Ctx) -> Step:
    """gc itself killed while it repairs what a killed registration left."""
    kind, files = "sigkill-gc", world.root / "files-gc"
    reg = ctx.measure(world, ["--json", "models", "register", str(new_file(files, ctx.rng(kind))), "--name", "gcm"],
                      1.2, 180)
    debris = killer(ctx.rng(kind + "-debris"), reg.seconds, reg.steps, step_share=1.0, writes=reg.writes)
    cal = ctx.measure(world, ["--json", "gc"], 1.0, 300)
    cut = killer(ctx.rng(kind + "-cut"), cal.seconds, cal.steps, writes=cal.writes)

    def step(i: int, rng: random.Random) -> Outcome:
        debris(world, ["--json", "models", "register", str(new_file(files, rng)), "--name", "gcm"])
        return inject(world, kind, i, ["--json", "gc"], cut)

    return step


def datasets_add(world: World, ctx: Ctx) -> Step:
    kind, files = "sigkill-datasets-add", world.root / "files-ds"
    cal = ctx.measure(world, ["--json", "datasets", "add", "ds", str(new_file(files, ctx.rng(kind), 1000, 5000))],
                      0.3, 120)
    cut = killer(ctx.rng(kind + "-cut"), cal.seconds, cal.steps, writes=cal.writes)
    return lambda i, rng: inject(world, kind, i, ["--json", "datasets", "add", "ds",
                                                  str(new_file(files, rng, 1000, 200_000))], cut)


def prompts_add(world: World, ctx: Ctx) -> Step:
    kind = "sigkill-prompts-add"
    cal = ctx.measure(world, ["--json", "prompts", "add", "pr", "--template", "Answer {{question}} #0"], 0.3, 100)
    cut = killer(ctx.rng(kind + "-cut"), cal.seconds, cal.steps, writes=cal.writes)
    return lambda i, rng: inject(world, kind, i, ["--json", "prompts", "add", "pr", "--template",
                                                  f"Answer {{{{question}}}} #{rng.random()}"], cut)


def promote(world: World, ctx: Ctx) -> Step:
    kind, files = "sigkill-promote", world.root / "files-pm"
    two_versions(world, "pm", new_file(files, ctx.rng(kind)), new_file(files, ctx.rng(kind + "2")))
    world.must("promote", "pm", "1")
    gate = ["--gate", "file_mb <= 100"]
    cal = ctx.measure(world, ["--json", "promote", "pm", "2", *gate], 0.3, 80)
    cut = killer(ctx.rng(kind + "-cut"), cal.seconds, cal.steps, writes=cal.writes)
    return lambda i, rng: inject(world, kind, i, ["--json", "promote", "pm", other(world, "pm"), *gate], cut)


def rollback(world: World, ctx: Ctx) -> Step:
    kind, files = "sigkill-rollback", world.root / "files-rb"
    two_versions(world, "rb", new_file(files, ctx.rng(kind)), new_file(files, ctx.rng(kind + "2")))
    for v in ("1", "2", "1", "2"):  # a history deep enough that a rollback and its retry both have somewhere to go
        world.must("promote", "rb", v)
    cal = ctx.measure(world, ["--json", "rollback", "rb", "--reason", "calibration"], 0.35, 70)
    cut = killer(ctx.rng(kind + "-cut"), cal.seconds, cal.steps, writes=cal.writes)

    def step(i: int, rng: random.Random) -> Outcome:
        for v in ("1", "2"):
            world.must("promote", "rb", v)
        return inject(world, kind, i, ["--json", "rollback", "rb", "--reason", f"chaos {i}"], cut)

    return step


def convert_register(world: World, ctx: Ctx) -> Step:
    import os

    kind = "sigkill-convert-register"
    src, out = ctx.tiny_models("llama"), world.outputs[0] / "tiny.gguf"
    modes = [False, True] if os.environ.get("LLMOPS_EVAL_TEXT") else [False]  # with and without --verify
    cuts = {}
    for verify in modes:
        cal = ctx.measure(world, convert_cmd(src, out, "conv", verify), 6.0 if verify else 1.2, 250)
        cuts[verify] = killer(ctx.rng(f"{kind}-{verify}"), cal.seconds, cal.steps, writes=cal.writes)

    def step(i: int, rng: random.Random) -> Outcome:
        verify = modes[(i + rng.randint(0, 1)) % len(modes)]
        return inject(world, kind, i, convert_cmd(src, out, "conv", verify), cuts[verify])

    return step


def bench(world: World, ctx: Ctx) -> Step:
    kind = "sigkill-bench"
    world.must("--json", "models", "register", ctx.ggufs()[0], "--name", "g")
    cmd = ["--json", "bench", "models:/g/1", "--metrics", "memory", "--threads", "1"]
    cal = ctx.measure(world, cmd, 2.5, 110)
    cut = killer(ctx.rng(kind + "-cut"), cal.seconds, cal.steps, writes=cal.writes)
    return lambda i, rng: inject(world, kind, i, cmd, cut)


# -- llmops serve ---------------------------------------------------------------------------------------------
def _serves_holder(world: World, serving: fe.Serving, name: str, bound: float = 120) -> None:
    want = holder(world, name)
    fe.wait_for(lambda: serving.version() == want, bound, f"llmops serve to serve version {want}", step=0.2)


def promote_while_serving(world: World, ctx: Ctx) -> Step:
    """`llmops serve` follows sv@production while promotions of sv are killed: it answers every
    request throughout, and ends on the version the audit trail says."""
    kind = "sigkill-promote-while-serving"
    two_versions(world, "sv", *ctx.ggufs())
    world.must("promote", "sv", "1")
    serving = fe.Serving("models:/sv@production", world.env, world.root / "serve-follow.log")
    ctx.cleanups.append(serving.stop)
    serving.start()
    serving.keep_asking()
    cal = ctx.measure(world, ["--json", "promote", "sv", "2"], 0.3, 80)
    cut = killer(ctx.rng(kind + "-cut"), cal.seconds, cal.steps, writes=cal.writes)

    def settle(o: Outcome) -> None:
        _serves_holder(world, serving, "sv")
        o.served_failures = len(serving.failures)
        if serving.failures:
            o.notes.append(f"serve: {serving.failures[:3]}")

    return lambda i, rng: inject(world, kind, i, ["--json", "promote", "sv", other(world, "sv")], cut, settle=settle)


def serve_mid_swap(world: World, ctx: Ctx) -> Step:
    """`llmops serve` killed while it fetches and loads the version an alias moved to (versions
    registered with --link, so a private copy goes into the serve cache): what it leaves in the
    cache goes with gc, and a new server serves the alias's holder."""
    kind = "sigkill-serve-mid-swap"
    two_versions(world, "sw", *ctx.ggufs(), link=True)
    world.must("promote", "sw", "1")
    n = [0]

    def started() -> fe.Serving:
        n[0] += 1
        s = fe.Serving("models:/sw@production", world.env, world.root / f"serve-{n[0]}.log")
        s.start()
        return s

    swap_s = 1.5  # from the alias's move to the new version serving: measured, unless quick
    if not ctx.quick:
        first = started()
        t0 = time.monotonic()
        world.must("promote", "sw", other(world, "sw"))
        _serves_holder(world, first, "sw")
        swap_s = time.monotonic() - t0
        first.stop()

    def step(i: int, rng: random.Random) -> Outcome:
        serving = started()
        delay = rng.uniform(0, swap_s * 1.2)

        def cut(w: World, _command: list[str]) -> tuple[Done, str]:
            w.must("promote", "sw", other(w, "sw"))
            with contextlib.suppress(subprocess.TimeoutExpired):  # the cut point: a random moment of the swap
                serving.proc.wait(timeout=delay)
            fe.kill_tree(serving.proc.pid)
            serving.proc.wait(timeout=60)
            serving.proc = None
            return Done(-9, "", True, delay), f"SIGKILL of llmops serve {delay:.3f} s after the alias moved"

        def retry() -> Done:
            again = started()
            try:
                _serves_holder(world, again, "sw")
                again.ask()
                return Done(0, "", False, 0.0)
            except Exception as exc:  # noqa: BLE001 - reported as a failed retry
                return Done(1, f"{type(exc).__name__}: {exc}", False, 0.0)
            finally:
                again.stop()

        return inject(world, kind, i, [], cut, retry=retry)

    return step


# -- the database: a session terminated, the server unreachable ------------------------------------------------
def _rotating(world: World, ctx: Ctx, kind: str) -> tuple[Callable[[int, random.Random], list[str]], dict[int, float]]:
    """Registration, promotion and a dataset version in turn: the writers a dropped connection cuts."""
    files, m = world.root / f"files-{kind}", f"m-{kind}"
    two_versions(world, m, new_file(files, ctx.rng(kind)), new_file(files, ctx.rng(kind + "2")))
    world.must("promote", m, "1")

    def command(i: int, rng: random.Random) -> list[str]:
        if i % 3 == 0:
            return ["--json", "models", "register", str(new_file(files, rng)), "--name", m]
        if i % 3 == 1:
            return ["--json", "promote", m, other(world, m)]
        return ["--json", "datasets", "add", f"d-{kind}", str(new_file(files, rng, 1000, 50_000))]

    guess = {0: 1.2, 1: 0.4, 2: 0.4}
    return command, {i: ctx.measure(world, command(i, ctx.rng(kind + "3")), guess[i]).seconds for i in range(3)}


def concurrently(world: World, command: list[str], at: float, fault: Callable[[], object],
                 after: Callable[[], None] | None = None) -> tuple[Done, list[str]]:
    """The command, with ``fault()`` at ``at`` seconds into it (unless it ended first); then
    ``after()`` (the fault undone), once both are over."""
    started, ended = threading.Event(), threading.Event()
    said: list[str] = []

    def interfere() -> None:
        started.wait(60)
        if not ended.wait(at):
            said.append(str(fault()))
        if after is not None:
            after()

    t = threading.Thread(target=interfere, daemon=True)
    t.start()
    try:
        done = world.runner.run(command, world.env, on_start=lambda _pid: started.set())
    finally:
        ended.set()
        t.join(timeout=600)
    return done, said


def pg_terminate(world: World, ctx: Ctx) -> Step:
    kind = "pg-terminate-backend"
    command, seconds = _rotating(world, ctx, kind)
    cut_rng, db = ctx.rng(kind + "-cut"), world.extra["db"]

    def step(i: int, rng: random.Random) -> Outcome:
        at = cut_rng.uniform(0, seconds[i % 3])

        def cut(w: World, cmd: list[str]) -> tuple[Done, str]:
            done, said = concurrently(w, cmd, at, lambda: fe.terminate_backends(db))
            return done, f"pg_terminate_backend after {at:.3f} s ({said[0] + ' sessions' if said else 'ended first'})"

        return inject(world, kind, i, command(i, rng), cut)

    return step


def pg_unreachable(world: World, ctx: Ctx) -> Step:
    kind = "pg-unreachable"
    proxy: fe.Proxy = world.extra["proxy"]
    env = world.env
    world.env = world.extra["proxied_env"]  # the command under test reaches the database through the proxy
    try:
        command, seconds = _rotating(world, ctx, kind)
    finally:
        world.env = env
    cut_rng = ctx.rng(kind + "-cut")

    def step(i: int, rng: random.Random) -> Outcome:
        at, dark = cut_rng.uniform(0, seconds[i % 3]), cut_rng.uniform(0.5, 3.0)

        def cut(w: World, cmd: list[str]) -> tuple[Done, str]:
            timer = threading.Timer(dark, proxy.restore)
            done, said = concurrently(w, cmd, at, proxy.cut, after=timer.start)
            return done, f"database unreachable for {dark:.1f} s after {at:.3f} s" + ("" if said else " (ended first)")

        proxied = World(world.root, world.runner, world.extra["proxied_env"], world.db_url, world.store_dir,
                        check_env=world.env, outputs=world.outputs)
        o = inject(proxied, kind, i, command(i, rng), cut,
                   after=lambda: fe.wait_for(lambda: not proxy.down, 30, "the database to be reachable again"))
        return o

    return step


# -- the shared tracking server killed and restarted while a client registers through it --------------------
def server_restart(world: World, ctx: Ctx) -> Step:
    kind, server = "tracking-server-restart", world.extra["server"]
    files = world.root / "files-server"
    cal = ctx.measure(world, ["--json", "models", "register", str(new_file(files, ctx.rng(kind))), "--name", "srv"],
                      3.0)
    timing = {"seconds": cal.seconds}
    cut_rng = ctx.rng(kind + "-cut")

    def step(i: int, rng: random.Random) -> Outcome:
        at = cut_rng.uniform(0, timing["seconds"] * 0.9)

        def cut(w: World, cmd: list[str]) -> tuple[Done, str]:
            done, said = concurrently(w, cmd, at, server.kill, after=server.start)
            if done.code == 0 and not said:
                timing["seconds"] = done.seconds
            return done, f"server killed after {at:.3f} s, restarted" + ("" if said else " (ended first)")

        cmd = ["--json", "models", "register", str(new_file(files, rng)), "--name", "srv"]
        return inject(world, kind, i, cmd, cut)

    return step


# -- a full disk, an I/O error -----------------------------------------------------------------------------------
def disk_full_store(world: World, ctx: Ctx) -> Step:
    """The store on a tmpfs that fills up during the command (without mount rights: a file-size
    limit, RLIMIT_FSIZE, as `ulimit -f` sets)."""
    kind, disk, files = "disk-full-store", world.extra.get("disk"), world.root / "files-full"
    world.must("--json", "models", "register", new_file(files, ctx.rng(kind)), "--name", "full")
    cut_rng = ctx.rng(kind + "-cut")

    def step(i: int, rng: random.Random) -> Outcome:
        f = new_file(files, rng, 256 << 10, 1 << 20)
        room = cut_rng.randint(0, int(f.stat().st_size * 1.5))

        def cut(w: World, c: list[str]) -> tuple[Done, str]:
            if disk is not None:
                disk.resize(disk.used() + room)
                return w.runner.run(c, w.env), f"tmpfs full after {room} more bytes"
            return w.runner.run(c, w.env, fsize=room), f"RLIMIT_FSIZE {room} bytes"

        return inject(world, kind, i, ["--json", "models", "register", str(f), "--name", "full"], cut,
                      after=(lambda: disk.resize(BIG)) if disk else None)

    return step


def disk_full_output(world: World, ctx: Ctx) -> Step:
    kind, disk = "disk-full-output", world.extra.get("disk")
    out_dir = disk.path if disk is not None else world.outputs[0]
    if out_dir not in world.outputs:
        world.outputs.append(out_dir)
    cmd = convert_cmd(ctx.tiny_models("llama"), out_dir / "tiny.gguf", "convfull", False, "gguf-f16")
    size = calibrate(world, cmd).json()["size_bytes"]
    cut_rng = ctx.rng(kind + "-cut")

    def step(i: int, rng: random.Random) -> Outcome:
        room = cut_rng.randint(0, int(size * 1.2))

        def cut(w: World, c: list[str]) -> tuple[Done, str]:
            if disk is not None:
                (out_dir / "tiny.gguf").unlink(missing_ok=True)  # the earlier output's room goes too
                disk.resize(max(disk.used() + room, 4096))
                return w.runner.run(c, w.env), f"tmpfs full after {room} bytes of the output"
            return w.runner.run(c, w.env, fsize=room), f"RLIMIT_FSIZE {room} bytes"

        return inject(world, kind, i, cmd, cut, after=(lambda: disk.resize(BIG)) if disk else None)

    return step


def _eio(kind: str, world: World, ctx: Ctx, prefix: Path, command: Callable[[int, random.Random], list[str]],
         writes: int) -> Step:
    lib, counter = ctx.eio_lib(), world.root / f"{kind}-count"
    # ``writes``: how many writes under ``prefix`` a whole run makes, typically; counted, unless quick
    if not ctx.quick:
        first = world.runner.run(command(0, ctx.rng(kind)), fe.with_eio(world.env, lib, prefix, -1, counter),
                                 exec_=True)
        assert first.code == 0, first.out[-2000:]
        writes = int(counter.read_text().strip() or 1)
    cut_rng = ctx.rng(kind + "-cut")

    def step(i: int, rng: random.Random) -> Outcome:
        at = cut_rng.randint(1, writes)

        def cut(w: World, c: list[str]) -> tuple[Done, str]:
            return (w.runner.run(c, fe.with_eio(w.env, lib, prefix, at), exec_=True),
                    f"EIO from write {at} of {writes} under {prefix.name}")

        return inject(world, kind, i, command(i + 1, rng), cut)

    return step


def eio_store(world: World, ctx: Ctx) -> Step:
    files = world.root / "files-eio"
    return _eio("eio-store", world, ctx, world.store_dir, lambda i, rng: [
        "--json", "models", "register", str(new_file(files, rng)), "--name", "eio"], 100)


def eio_output(world: World, ctx: Ctx) -> Step:
    out = world.outputs[0]
    return _eio("eio-output", world, ctx, out, lambda i, rng: convert_cmd(
        ctx.tiny_models("llama"), out / "tiny-eio.gguf", "conveio", False, "gguf-f16"), 27)


# -- worlds -----------------------------------------------------------------------------------------------------
def sqlite_world(root: Path, runner: Runner) -> World:
    store, cache, out, tmp = root / "store", root / "cache", root / "out", root / "tmp"
    for d in (out, tmp):
        d.mkdir(parents=True, exist_ok=True)
    env = {**base_env(), "LLMOPS_STORE": str(store), "LLMOPS_CACHE": str(cache), "TMPDIR": str(tmp)}
    world = World(root, runner, env, f"sqlite:///{store / 'llmops.db'}", store, outputs=[out])
    world.must("db", "upgrade")
    return world


@contextlib.contextmanager
def world_of(kind: str, root: Path, runner: Runner, quick: bool = False) -> Iterator[World]:
    """A world for faults of ``kind``: ``sqlite``, ``pg`` (with a proxy that can cut the database
    off), ``server`` (a shared tracking server: on PostgreSQL in the full campaign, on SQLite in
    the quick sample, which spares it MLflow's first migration of a PostgreSQL database), ``disk``."""
    if kind == "sqlite":
        yield sqlite_world(root, runner)
    elif kind == "pg":
        with fe.pg_database() as db:
            world = _pg(root, runner, db)
            proxy = fe.Proxy()
            world.extra.update(db=db, proxy=proxy,
                               proxied_env={**world.env, "LLMOPS_DATABASE_URL": fe.pg_url(db, proxy.port)})
            try:
                yield world
            finally:
                proxy.close()
    elif kind == "server":
        if not quick and fe.pg_reachable():
            with fe.pg_database() as db:
                yield from _server_world(root, runner, fe.pg_url(db))
        else:
            yield from _server_world(root, runner, None)
    elif kind == "disk":
        disk = fe.SmallDisk(root / "disk") if fe.SmallDisk.available(root / "probe") else None
        if disk is not None:
            disk.mount(BIG)
        try:
            world = sqlite_world(root, runner)
            if disk is not None:  # the store itself on the small disk
                store = disk.path / "store"
                world.env["LLMOPS_STORE"], world.store_dir = str(store), store
                world.db_url = f"sqlite:///{store / 'llmops.db'}"
                world.must("db", "upgrade")
            world.extra["disk"] = disk
            yield world
        finally:
            if disk is not None:
                disk.umount()
    else:
        raise ValueError(kind)


def _pg(root: Path, runner: Runner, db: str) -> World:
    store, cache, out, tmp = root / "store", root / "cache", root / "out", root / "tmp"
    for d in (out, tmp):
        d.mkdir(parents=True, exist_ok=True)
    env = {**base_env(), "LLMOPS_STORE": str(store), "LLMOPS_CACHE": str(cache), "TMPDIR": str(tmp),
           "LLMOPS_DATABASE_URL": fe.pg_url(db)}
    world = World(root, runner, env, fe.pg_url(db), store, outputs=[out])
    world.must("db", "upgrade")
    return world


def _server_world(root: Path, runner: Runner, pg: str | None) -> Iterator[World]:
    server_store = root / "server-store"
    server_env = {**base_env(), "LLMOPS_STORE": str(server_store), "LLMOPS_CACHE": str(root / "server-cache")}
    if pg is not None:
        server_env["LLMOPS_DATABASE_URL"] = pg
    server = fe.TrackingServer(server_env, root / "server.log")
    server.start()
    try:
        db_url = pg or f"sqlite:///{server_store / 'llmops.db'}"
        client = root / "client"
        for d in (client / "out", client / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        env = {**base_env(), "LLMOPS_STORE": str(client / "store"), "LLMOPS_CACHE": str(client / "cache"),
               "TMPDIR": str(client / "tmp"), "MLFLOW_TRACKING_URI": server.url, "LLMOPS_DATABASE_URL": db_url,
               # a client gives up on a server that stays away (MLflow's default retries for minutes)
               "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
        # doctor and gc on the server's own store (its artifact folder is there); doctor through the
        # server as a client sees it too
        yield World(root, runner, env, db_url, server_store, check_env=server_env, outputs=[client / "out"],
                    extra={"server": server, "also_doctor": [env]})
    finally:
        server.stop()


# kind: (the world it runs in, its setup)
SCENARIOS: dict[str, tuple[str, Callable[[World, Ctx], Step]]] = {
    "sigkill-register": ("sqlite", register("sigkill-register", "m")),
    "sigkill-register-pg": ("pg", register("sigkill-register-pg", "m")),
    "sigkill-convert-register": ("sqlite", convert_register),
    "sigkill-datasets-add": ("sqlite", datasets_add),
    "sigkill-prompts-add": ("sqlite", prompts_add),
    "sigkill-promote": ("sqlite", promote),
    "sigkill-rollback": ("sqlite", rollback),
    "sigkill-bench": ("sqlite", bench),
    "sigkill-gc": ("sqlite", gc_killed),
    "sigkill-promote-while-serving": ("sqlite", promote_while_serving),
    "sigkill-serve-mid-swap": ("sqlite", serve_mid_swap),
    "pg-terminate-backend": ("pg", pg_terminate),
    "pg-unreachable": ("pg", pg_unreachable),
    "tracking-server-restart": ("server", server_restart),
    "disk-full-store": ("disk", disk_full_store),
    "disk-full-output": ("disk", disk_full_output),
    "eio-store": ("sqlite", eio_store),
    "eio-output": ("sqlite", eio_output),
}
