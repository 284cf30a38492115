"""The fault campaign: every command that writes, cut at seeded random points (SIGKILL at a random
moment or just before a random SQL statement, commit or HTTP request; the database connection
terminated or unreachable; the tracking server killed and restarted; a full disk; EIO on write),
then ``llmops doctor``, ``llmops gc``, ``llmops doctor`` and the command again (``faultkit.inject``).

The default suite runs a seeded sample of each kind; ``LLMOPS_CHAOS=1`` (``make chaos``) runs the
full campaign, over a thousand injections, and writes the reliability table to
``test-output/chaos/``. ``LLMOPS_CHAOS_SEED`` picks another sample, ``LLMOPS_CHAOS_SCALE`` scales
the campaign's counts.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import faultdisk
import faultenv as fe
from fault_outages import (disk_full_output, disk_full_store, eio_output, eio_store, pg_terminate, pg_unreachable,
                           server_restart)
from fault_scenarios import (Ctx, Step, bench, convert_register, datasets_add, gc_killed, promote, promote_while_serving,
                             prompts_add, register, rollback, serve_mid_swap)
from fault_worlds import sqlite_world, world_of
from faultkit import Outcome, Runner, World, calibrate, final_doctor, inject, killer, summarize

SEED = int(os.environ.get("LLMOPS_CHAOS_SEED", "1517"))
FULL = os.environ.get("LLMOPS_CHAOS") == "1"
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
# kind: (injections in the default suite, in the full campaign)
COUNTS = {
    "sigkill-register": (1, 150), "sigkill-register-pg": (1, 50), "sigkill-register-multi-gb": (0, 6),
    "sigkill-convert-register": (1, 50), "sigkill-datasets-add": (1, 90), "sigkill-prompts-add": (1, 80),
    "sigkill-promote": (1, 90), "sigkill-rollback": (1, 70), "sigkill-bench": (1, 50),
    "sigkill-promote-while-serving": (1, 40), "sigkill-serve-mid-swap": (1, 20),
    "pg-terminate-backend": (1, 70), "pg-unreachable": (1, 50), "tracking-server-restart": (1, 40),
    "disk-full-store": (1, 40), "disk-full-output": (1, 30), "eio-store": (1, 30), "eio-output": (1, 20),
    "sigkill-gc": (1, 40),
}
# The default suite's sample: one world per group, one injection of each kind in it.
SAMPLE_GROUPS = {
    "sqlite": ["sigkill-register", "sigkill-datasets-add", "sigkill-prompts-add", "sigkill-promote",
               "sigkill-rollback", "sigkill-gc", "sigkill-bench", "sigkill-convert-register", "eio-store", "eio-output",
               "sigkill-promote-while-serving", "sigkill-serve-mid-swap"],
    "pg": ["sigkill-register-pg", "pg-terminate-backend", "pg-unreachable"],
    "server": ["tracking-server-restart"],
    "disk": ["disk-full-store", "disk-full-output"],
}
MAX_FAILURES = 3  # a kind stops after this many failed injections: the first ones tell the story
OUTCOMES: list[Outcome] = []
OUT_DIR = Path(__file__).resolve().parents[1] / "test-output" / "chaos"


def count(kind: str) -> int:
    if not FULL:
        return COUNTS[kind][0]
    scale = float(os.environ.get("LLMOPS_CHAOS_SCALE", "1"))  # a shorter (or longer) campaign
    return max(1, round(COUNTS[kind][1] * scale))


def rng_for(kind: str) -> random.Random:
    return random.Random(f"{SEED}-{kind}")


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:  # noqa: ANN001
    r = Runner(tmp_path_factory.mktemp("fault-logs"))
    yield r
    r.close()


@pytest.fixture(scope="module")
def ctx(tiny_models, tmp_path_factory) -> Ctx:  # noqa: ANN001
    """What scenarios need, made on first use: tiny GGUFs, the EIO library."""
    made: dict[str, object] = {}

    def ggufs() -> list[Path]:
        if "ggufs" not in made:
            from llmops.app.converting import convert

            root = tmp_path_factory.mktemp("fault-ggufs")
            made["ggufs"] = [Path(convert(tiny_models("llama"), t, root / f"tiny-{t}.gguf", verify=False).output)
                             for t in ("gguf-q8_0", "gguf-f16")]
        return made["ggufs"]  # type: ignore[return-value]

    def eio_lib() -> Path:
        if "eio" not in made:
            made["eio"] = faultdisk.build_shim(tmp_path_factory.mktemp("eio"))
        if made["eio"] is None:
            pytest.skip("no C compiler for the EIO library")
        return made["eio"]  # type: ignore[return-value]

    c = Ctx(SEED, tiny_models, ggufs, eio_lib, quick=not FULL)
    yield c
    for cleanup in reversed(c.cleanups):
        cleanup()


STARTED = time.time()


def write_table() -> None:
    """The reliability table of what ran so far (after every kind: a campaign cut short keeps its
    figures)."""
    if not OUTCOMES:
        return
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    table = summarize(OUTCOMES)
    name = "campaign" if FULL else "sample"
    doc = {"seed": SEED, "full": FULL, "seconds": round(time.time() - STARTED, 1), "load": os.getloadavg(),
           "injections": len(OUTCOMES), "kinds": table, "outcomes": [o.to_dict() for o in OUTCOMES]}
    (OUT_DIR / f"{name}.json").write_text(json.dumps(doc, indent=1))
    lines = ["| fault | injections | left debris | inconsistent after gc | lost bytes | failed retries |",
             "|---|---|---|---|---|---|"]
    for kind, row in table.items():
        lines.append(f"| {kind} | {row['runs']} | {row['left_debris']} | {row['inconsistent_after_gc']} | "
                     f"{row['lost_bytes']} | {row['failed_retries']} |")
    (OUT_DIR / f"{name}.md").write_text("\n".join(lines) + "\n")


def run_kind(kind: str, world: World, ctx: Ctx, n: int) -> list[Outcome]:
    """``n`` injections of ``kind`` in ``world``; the failed ones (at most :data:`MAX_FAILURES`)."""
    step = SCENARIOS[kind][1](world, ctx)
    rng = rng_for(kind)
    failed: list[Outcome] = []
    for i in range(n):
        o = step(i, rng)
        OUTCOMES.append(o)
        if not o.ok:
            failed.append(o)
            if len(failed) >= MAX_FAILURES:
                break
    write_table()
    return failed


def _report(failed: list[Outcome]) -> str:
    return "\n".join(f"{o.kind} #{o.index} ({o.cut}): {json.dumps(o.to_dict())}" for o in failed)


def _needs(group: str) -> None:
    if group == "pg" and not fe.pg_reachable():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {fe.PG_ADMIN_URL}")
        pytest.skip("PostgreSQL not reachable")


def _group_marks(group: str) -> list:
    return [pytest.mark.postgres] if group == "pg" else []


@pytest.mark.skipif(FULL, reason="the full campaign runs each kind on its own")
@pytest.mark.parametrize("group", [pytest.param(g, marks=_group_marks(g)) for g in SAMPLE_GROUPS])
def test_fault_sample(group: str, runner, ctx, tmp_path) -> None:  # noqa: ANN001
    """One seeded injection of each kind, the kinds of a group sharing one world."""
    _needs(group)
    failed: list[Outcome] = []
    with world_of(group, tmp_path, runner, quick=True) as world:
        for kind in SAMPLE_GROUPS[group]:
            failed += run_kind(kind, world, ctx, count(kind))
        last = final_doctor(world)
    assert not failed, _report(failed)
    assert last.code == 0, last.out[-2000:]


@pytest.mark.chaos
@pytest.mark.skipif(not FULL, reason="the full campaign (LLMOPS_CHAOS=1, make chaos)")
@pytest.mark.parametrize("kind", [pytest.param(k, marks=_group_marks(w)) for k, (w, _) in SCENARIOS.items()])
def test_fault_campaign(kind: str, runner, ctx, tmp_path) -> None:  # noqa: ANN001
    group = SCENARIOS[kind][0]
    _needs(group)
    with world_of(group, tmp_path, runner, quick=False) as world:
        failed = run_kind(kind, world, ctx, count(kind))
        last = final_doctor(world)
    assert not failed, _report(failed)
    assert last.code == 0, last.out[-2000:]


@pytest.mark.chaos
@pytest.mark.skipif(not FULL, reason="multi-GB registrations run in the full campaign (LLMOPS_CHAOS=1)")
def test_sigkill_register_multi_gb(runner, tmp_path) -> None:  # noqa: ANN001
    """A 2 GiB registration killed at random moments of its copy; each in a fresh store, so that
    the disk holds at most two copies."""
    kind = "sigkill-register-multi-gb"
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:  # 2 GiB of varied bytes: a 64 MiB random block, repeated
        block = random.Random(SEED).randbytes(64 << 20)
        for _ in range(32):
            fh.write(block)
    rng = rng_for(kind)
    failed = []
    seconds = None
    for i in range(count(kind)):
        import shutil

        root = tmp_path / f"w{i}"
        world = sqlite_world(root, runner)
        with open(big, "r+b") as fh:  # other bytes every time: a new copy into the store
            fh.write(rng.randbytes(32))
        cmd = ["--json", "models", "register", str(big), "--name", "big"]
        if seconds is None:
            seconds = calibrate(world, cmd).seconds
            with open(big, "r+b") as fh:
                fh.write(rng.randbytes(32))
        o = inject(world, kind, i, cmd, killer(rng, seconds, None))
        OUTCOMES.append(o)
        if not o.ok:
            failed.append(o)
        shutil.rmtree(root, ignore_errors=True)
    write_table()
    assert not failed, _report(failed)
