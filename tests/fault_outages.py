"""The fault campaign's outages: what a command relies on taken away while it runs (a database
session terminated or the database unreachable, the shared tracking server killed and restarted,
a full disk, EIO on write). Each setup returns the step that makes one injection."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path

import faultdisk
import faultenv as fe
from fault_scenarios import BIG, Ctx, Step, convert_cmd, new_file, other, two_versions
from faultkit import Done, Outcome, World, calibrate, inject


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

    failed: list[BaseException] = []

    def interfere() -> None:
        try:
            started.wait(60)
            if not ended.wait(at):
                said.append(str(fault()))
            if after is not None:
                after()
        except BaseException as exc:  # noqa: BLE001 - raised in the test's thread below
            failed.append(exc)

    t = threading.Thread(target=interfere, daemon=True)
    t.start()
    try:
        done = world.runner.run(command, world.env, on_start=lambda _pid: started.set())
    finally:
        ended.set()
        t.join(timeout=600)
    if failed:  # the fault or its undoing went wrong: the injection is not what it says
        raise failed[0]
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
        first = world.runner.run(command(0, ctx.rng(kind)), faultdisk.with_eio(world.env, lib, prefix, -1, counter),
                                 exec_=True)
        assert first.code == 0, first.out[-2000:]
        writes = int(counter.read_text().strip() or 1)
    cut_rng = ctx.rng(kind + "-cut")

    def step(i: int, rng: random.Random) -> Outcome:
        at = cut_rng.randint(1, writes)

        def cut(w: World, c: list[str]) -> tuple[Done, str]:
            return (w.runner.run(c, faultdisk.with_eio(w.env, lib, prefix, at), exec_=True),
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
