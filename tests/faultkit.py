"""The fault campaign's harness: run a real ``llmops`` command, cut it at a random point, then
``llmops doctor``, ``llmops gc``, ``llmops doctor`` and the command again, and check what must
hold whatever happened: doctor clean after gc, no recorded byte lost, every alias where its audit
trail says, version numbers without gaps or duplicates, the retried command successful.

Commands run as processes of their own (forked from a server that imported llmops once,
``fault_child``; or the ``llmops`` console script, where a fault needs a fresh interpreter), each
in its own session, so that what a killed command leaves running can be seen and counted.
Cut points are seeded: a delay drawn from the command's measured duration (SIGKILL at a random
moment), or a step drawn from its measured step count (SIGKILL just before its K-th SQL
statement, commit or HTTP request: the same seed cuts at the same place).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from faultchecks import alias_problems, lost_bytes, numbering_gaps, recorded_bytes

LLMOPS = str(Path(sys.executable).with_name("llmops"))


class Zygote:
    """The process commands are forked from (``fault_child.py``)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fault_child.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=base_env())

    def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the command server ended")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMOPS_", "MLFLOW_", "PYTEST_"))}
    if os.environ.get("LLMOPS_EVAL_TEXT"):
        env["LLMOPS_EVAL_TEXT"] = os.environ["LLMOPS_EVAL_TEXT"]
    return env


@dataclass
class Done:
    code: int | None  # the exit status; negative: the signal that ended it
    out: str
    killed: bool
    seconds: float
    lingering: int = 0  # processes of its session still running after it ended (then killed)
    steps: int | None = None
    writes: int | None = None

    def json(self) -> Any:
        start = self.out.find("{")
        return json.loads(self.out[start:self.out.rfind("}") + 1]) if start >= 0 else None


def _session_members(sid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def drain(sid: int, bound: float = 60.0) -> int:
    """Wait (at most ``bound`` s) for every process of session ``sid`` to end; kill what is left
    and return how many there were."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if not _session_members(sid):
            return 0
        time.sleep(0.05)
    left = _session_members(sid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(left)


class Runner:
    """Runs commands, cut or whole; logs under ``logs``."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.n = 0
        self._zygote: Zygote | None = None

    def close(self) -> None:
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None

    def run(self, args: list[str], env: dict[str, str], cwd: Path | None = None, *, kill_after: float | None = None,
            kill_at: int | None = None, kill_write: int | None = None, count: bool = False, exec_: bool = False,
            fsize: int | None = None,
            timeout: float = 900, on_start: Callable[[int], None] | None = None) -> Done:
        self.n += 1
        log = self.logs / f"{self.n:05d}-{args[0] if args[0] != '--json' else args[1]}.log"
        counter = self.logs / f"{self.n:05d}.steps" if count else None
        cwd = cwd or self.logs
        t0 = time.monotonic()
        if exec_:
            with open(log, "w") as fh:
                proc = subprocess.Popen([LLMOPS, *args], env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            pid, is_alive = proc.pid, (lambda: proc.poll() is None)
            wait = proc.wait

            def status() -> int | None:
                return proc.returncode
        else:
            if self._zygote is None:
                self._zygote = Zygote()
            zygote = self._zygote
            pid = zygote.ask({"run": {"args": args, "env": env, "cwd": str(cwd), "log": str(log), "kill_at": kill_at,
                                      "kill_write": kill_write, "count_file": str(counter) if counter else None,
                                      "fsize": fsize}})["pid"]
            result: list[int | None] = []

            def is_alive() -> bool:
                return not result and not _wait_for(0)

            def _wait_for(t: float) -> bool:
                if not result:
                    code = zygote.ask({"wait": pid, "timeout": t})["status"]
                    if code is not None:
                        result.append(code)
                return bool(result)

            def wait(timeout: float | None = None) -> None:
                if not _wait_for(timeout if timeout is not None else 1e9):
                    raise subprocess.TimeoutExpired(args, timeout)

            def status() -> int | None:
                return result[0] if result else None
        if on_start is not None:
            on_start(pid)
        killed = False
        if kill_after is not None:
            try:
                wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                pass
            if is_alive():
                os.kill(pid, signal.SIGKILL)
                killed = True
        try:
            wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pid, signal.SIGKILL)
            wait(timeout=60)
        code = status()
        killed = killed or code == -signal.SIGKILL
        lingering = drain(pid)
        counted = counter.read_text().split() if counter is not None and counter.exists() else []
        steps, writes = (int(counted[0]), int(counted[1])) if len(counted) == 2 else (None, None)
        with open(self.logs / "timings.tsv", "a") as fh:
            fh.write(f"{time.monotonic() - t0:.2f}\t{'exec' if exec_ else 'fork'}\t{' '.join(args)[:120]}\n")
        return Done(code, log.read_text(errors="replace"), killed, time.monotonic() - t0, lingering, steps, writes)


# -- the outcome of one injection ---------------------------------------------------------------
@dataclass
class Outcome:
    kind: str
    index: int
    cut: str  # "time 1.234s", "step 17", a fault's own description
    killed: bool = False
    first_code: int | None = None  # how the cut command ended (negative: a signal)
    first_doctor: list[str] = field(default_factory=list)  # the kinds of what the fault left
    gc_code: int | None = None
    doctor_code: int | None = None
    retry_code: int | None = None
    lost: list[str] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    lingering: int = 0
    served_failures: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def inconsistent(self) -> bool:
        return self.gc_code != 0 or self.doctor_code != 0 or bool(self.gaps) or bool(self.aliases)

    @property
    def ok(self) -> bool:
        return (not self.inconsistent and not self.lost and self.retry_code == 0 and not self.served_failures
                and not self.lingering)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def summarize(outcomes: list[Outcome]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        row = table.setdefault(o.kind, {"runs": 0, "killed": 0, "failed": 0, "completed": 0, "left_debris": 0,
                                        "inconsistent_after_gc": 0, "lost_bytes": 0, "failed_retries": 0,
                                        "served_failures": 0, "lingering_processes": 0, "debris": {}})
        row["runs"] += 1
        row["killed"] += o.killed
        row["failed"] += not o.killed and o.first_code not in (0, None)
        row["completed"] += not o.killed and o.first_code == 0
        row["left_debris"] += bool(o.first_doctor)
        row["inconsistent_after_gc"] += o.inconsistent
        row["lost_bytes"] += bool(o.lost)
        row["failed_retries"] += o.retry_code != 0
        row["served_failures"] += o.served_failures
        row["lingering_processes"] += o.lingering
        for k in o.first_doctor:
            row["debris"][k] = row["debris"].get(k, 0) + 1
    return table


# -- one injection -----------------------------------------------------------------------------------
@dataclass
class World:
    """A store and how to reach it: ``env`` for the command under test, ``check_env`` for doctor
    and gc (behind a tracking server: the server's own store, which holds the artifact folder)."""

    root: Path
    runner: Runner
    env: dict[str, str]
    db_url: str
    store_dir: Path
    check_env: dict[str, str] | None = None
    outputs: list[Path] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # what a world's kind of fault needs (a disk, a server)

    def cli(self, *args: object, env: dict[str, str] | None = None, **kw: Any) -> Done:
        return self.runner.run([str(a) for a in args], env or self.env, **kw)

    def must(self, *args: object, **kw: Any) -> Done:
        done = self.cli(*args, **kw)
        assert done.code == 0, done.out[-2000:]
        return done


Cut = Callable[[World, list[str]], tuple[Done, str]]


class killer:  # noqa: N801 - used as a function that makes a cut
    """SIGKILL at a random moment of the command's measured duration, or (``step_share`` of the
    time) just before a random one of its measured steps. Each whole run of the command (the
    retry after a fault) measures them again: a store that grows makes commands longer."""

    def __init__(self, rng: Any, seconds: float, steps: int | None, step_share: float = 0.5,
                 writes: int | None = None) -> None:
        self.rng, self.seconds, self.steps, self.step_share = rng, seconds, steps, step_share
        self.writes = writes

    def update(self, done: Done) -> None:
        if done.code == 0:
            self.seconds = done.seconds
            self.steps = done.steps or self.steps
            self.writes = done.writes or self.writes

    def __call__(self, world: World, command: list[str]) -> tuple[Done, str]:
        if self.steps and self.rng.random() < self.step_share:
            if self.writes and self.rng.random() < 0.5:  # half of them where something is written
                k = self.rng.randint(1, self.writes)
                return (world.runner.run(command, world.env, kill_write=k),
                        f"SIGKILL before write {k} of {self.writes}")
            k = self.rng.randint(1, self.steps)
            return world.runner.run(command, world.env, kill_at=k), f"SIGKILL before step {k} of {self.steps}"
        t = self.rng.uniform(0.0, self.seconds * 1.1)
        return (world.runner.run(command, world.env, kill_after=t),
                f"SIGKILL after {t:.3f} s of {self.seconds:.2f} s")


def calibrate(world: World, command: list[str]) -> Done:
    """The command once, whole: how long it takes and how many steps it makes."""
    return world.must(*command, count=True)


def _lines(done: Done, limit: int = 5) -> str:
    doc = done.json() or {}
    found = doc.get("findings") or doc.get("left") or []
    return "; ".join(f"{f['kind']}: {f['subject']}: {f['detail']}" for f in found[:limit]) or done.out[-800:]


def inject(world: World, kind: str, index: int, command: list[str], cut: Cut, *,
           after: Callable[[], None] | None = None, retry: list[str] | Callable[[], Done] | None = None,
           settle: Callable[[Outcome], None] | None = None) -> Outcome:
    """One fault: the command cut, then doctor, gc, doctor, the command again (``retry``: another
    command, or a callable that runs it), and the checks."""
    before = recorded_bytes(world.db_url, world.store_dir)
    done, how = cut(world, command)
    o = Outcome(kind, index, how, killed=done.killed, first_code=done.code, lingering=done.lingering)
    if done.lingering:
        o.notes.append(f"{done.lingering} process(es) of the cut command outlived it")
    if after is not None:
        after()
    check_env = world.check_env or world.env
    outs = [a for d in world.outputs for a in ("--outputs", str(d))]
    first = world.runner.run(["--json", "doctor", *outs], check_env)
    o.first_doctor = [f["kind"] for f in (first.json() or {}).get("findings", [])]
    g = world.runner.run(["--json", "gc", *outs], check_env)
    o.gc_code = g.code
    if g.code != 0:
        o.notes.append(f"gc: {_lines(g)}")
    second = world.runner.run(["--json", "doctor", *outs], check_env)
    o.doctor_code = second.code
    if second.code != 0:
        o.notes.append(f"doctor after gc: {_lines(second)}")
    for env in world.extra.get("also_doctor", []):  # the same store seen another way (a tracking server's client)
        more = world.runner.run(["--json", "doctor"], env)
        if more.code != 0:
            o.doctor_code = more.code
            o.notes.append(f"doctor (client) after gc: {_lines(more)}")
    again = retry() if callable(retry) else world.runner.run(retry or command, world.env, count=True)
    if hasattr(cut, "update") and retry is None:
        cut.update(again)
    o.retry_code = again.code
    if again.code != 0:
        o.notes.append(f"retry: {again.out[-800:]}")
    o.lost = lost_bytes(before)
    o.gaps = numbering_gaps(world.db_url)
    o.aliases = alias_problems(world.db_url)
    if settle is not None:
        settle(o)
    return o


def final_doctor(world: World) -> Done:
    outs = [a for d in world.outputs for a in ("--outputs", str(d))]
    return world.runner.run(["--json", "doctor", *outs], world.check_env or world.env)
