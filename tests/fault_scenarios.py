"""The fault campaign's scenarios, set up in a world (``fault_worlds``): each returns the step
that makes one injection (``faultkit.inject``). Here the writers cut by SIGKILL and ``llmops
serve`` through a killed swap; ``fault_outages`` holds the faults of what a command relies on (the
database, the tracking server, the disk). The default suite runs one step of each in a few
shared worlds, the full campaign many steps of each in a world of its own."""

from __future__ import annotations

import contextlib
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import faultenv as fe
from faultchecks import rows
from faultkit import Done, Outcome, World, calibrate, inject, killer

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
    found = rows(world.db_url, "SELECT version FROM registered_model_aliases WHERE name = :n AND alias = :a",
                 {"n": name, "a": alias})
    return str(found[0][0]) if found else None


def holder_exists(world: World, name: str, version: str = "1") -> bool:
    return bool(rows(world.db_url, "SELECT 1 FROM llmops_versions WHERE kind = 'model' AND name = :n AND version = :v",
                     {"n": name, "v": version}))


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
