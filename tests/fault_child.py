"""What the fault campaign's commands run in: ``llmops`` itself, forked from a process that has
imported the command line, MLflow and SQLAlchemy once (run as ``python fault_child.py``: it reads
one JSON request a line on stdin and answers on stdout), so that a thousand commands do not each
pay for the interpreter and its imports. Each child is a process of its own (its own session),
runs ``llmops.app.cli.run`` with the arguments and environment given, as the console script
does, and can be killed like any other.

A child may be told to kill itself with SIGKILL just before its K-th step, a step being a SQL
statement, a commit, or an HTTP request to a tracking server, or just before its K-th write (a
statement that changes rows, a commit, a request that is not a GET): the same K always cuts the
same command at the same place. Asked to count, it writes how many of each it made.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

# imported once, in the server process, before any command forks
import llmops.app.cli  # noqa: F401
import llmops.registry.registration  # noqa: F401
import llmops.registry.promotion  # noqa: F401
import llmops.registry.rollback  # noqa: F401
import llmops.registry.repair  # noqa: F401
import llmops.app.maintenance  # noqa: F401
import mlflow  # noqa: F401
import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
import requests.adapters
import sqlalchemy
from sqlalchemy import event

try:
    import psycopg  # noqa: F401
except ImportError:  # no PostgreSQL driver: those scenarios skip
    pass


class _Steps:
    def __init__(self, kill_at: int | None, kill_write: int | None, count_file: str | None) -> None:
        self.n = self.writes = 0
        self.kill_at, self.kill_write = kill_at, kill_write
        self.count_file = count_file

    def step(self, writes: bool) -> None:
        self.n += 1
        self.writes += writes
        if ((self.kill_at is not None and self.n >= self.kill_at)
                or (writes and self.kill_write is not None and self.writes >= self.kill_write)):
            os.kill(os.getpid(), signal.SIGKILL)

    def statement(self, _conn: object, _cursor: object, statement: str, *_a: object) -> None:
        self.step(statement.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"))

    def write(self) -> None:
        if self.count_file:
            with open(self.count_file, "w") as fh:
                fh.write(f"{self.n} {self.writes}")


def _install(steps: _Steps) -> None:
    event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", steps.statement)
    event.listen(sqlalchemy.engine.Engine, "commit", lambda *_a: steps.step(True))
    send = requests.adapters.HTTPAdapter.send

    def counted(self, request, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        steps.step(request.method != "GET")
        return send(self, request, *a, **k)

    requests.adapters.HTTPAdapter.send = counted
    import atexit

    atexit.register(steps.write)


def run_command(args: list[str], env: dict[str, str], cwd: str, log: str, kill_at: int | None = None,
                count_file: str | None = None, fsize: int | None = None, kill_write: int | None = None) -> None:
    """The forked child: ``llmops ARGS`` in ``cwd`` with exactly ``env``; stdout and stderr into
    ``log`` (stdout first line by line, then stderr: one file, as a terminal would show them)."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if fsize is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    if kill_at is not None or kill_write is not None or count_file:
        _install(_Steps(kill_at, kill_write, count_file))
    sys.argv = ["llmops", *args]
    from llmops.app.cli import run

    run()


def _reap(pid: int, timeout: float) -> int | None:
    """The exit status of child ``pid`` (negative: the signal), waiting at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def serve() -> None:
    """Requests: ``{"run": {...run_command's arguments}}`` answers ``{"pid": N}``;
    ``{"wait": N, "timeout": S}`` answers ``{"status": CODE or null}``."""
    for line in sys.stdin:
        req = json.loads(line)
        if "run" in req:
            pid = os.fork()
            if pid == 0:
                try:
                    run_command(**req["run"])
                finally:
                    os._exit(70)
            reply = {"pid": pid}
        else:
            reply = {"status": _reap(req["wait"], req.get("timeout", 0))}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
