"""The fault campaign's surroundings: PostgreSQL databases and a proxy that can cut them off, a
shared MLflow server that can be killed and restarted, ``llmops serve`` with a client that keeps
asking. The disk that fills up and the writes that fail are in ``faultdisk``."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pgtest
from faultkit import LLMOPS, base_env

PG_ADMIN_URL = pgtest.PG_ADMIN_URL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float, what: str, step: float = 0.1) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _sessions_of(pids: list[int]) -> set[int]:
    out = set()
    for p in pids:
        with contextlib.suppress(OSError):
            out.add(os.getsid(p))
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process, everything it started, and every process of their sessions (a child
    started while the tree was being killed, re-parented to init, keeps its session)."""
    tree = descendants(pid)
    sessions = _sessions_of(tree) - {os.getsid(0)}
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)

    def members() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[3]) in sessions and fields[0] not in ("Z", "X"):
                    found.append(int(entry.name))
        return found

    deadline = time.monotonic() + 30
    while (left := members()) and time.monotonic() < deadline:
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        time.sleep(0.05)


def listeners(port: int) -> list[int]:
    """The processes with a socket listening on TCP ``port`` (IPv4 or IPv6), from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{f[9]}]")
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                    found.append(int(entry.name))
    return found


# -- PostgreSQL ----------------------------------------------------------------------------------------
def pg_reachable() -> bool:
    return pgtest.unreachable() is None


def pg_database() -> contextlib.AbstractContextManager[str]:
    return pgtest.database("llmops_chaos")


pg_url = pgtest.url_of


def terminate_backends(db: str) -> int:
    """``pg_terminate_backend`` on every session of database ``db``: how many there were."""
    eng = pgtest.admin_engine()
    try:
        with eng.connect() as c:
            return len(c.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %(d)s "
                "AND pid <> pg_backend_pid()", {"d": db}).all())
    finally:
        eng.dispose()


class Proxy:
    """A TCP proxy to PostgreSQL that can make it unreachable for a while: every connection
    through it is cut, and new ones are cut as they come, until :meth:`restore`."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.down = False
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):  # cut: the sockets were closed under us
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        self.down = True
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self._stop = True
        self.cut()
        self.listener.close()


# -- the shared MLflow server -------------------------------------------------------------------------
class TrackingServer:
    """``llmops ui --serve-artifacts`` on a store, killed (the whole tree, SIGKILL) and started again
    on the same port at will."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log, self.port = env, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from llmops.app.server import port_free, wait_until_up

        wait_for(lambda: port_free("127.0.0.1", self.port), 60, "the server's port to be free")
        fh = open(self.log, "a")  # noqa: SIM115 - the server writes it while it runs
        self.proc = subprocess.Popen([LLMOPS, "ui", "--serve-artifacts", "--port", str(self.port)], env=self.env,
                                     stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        fh.close()
        wait_until_up(self.url, self.proc, timeout=300)

    def kill(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid)
            self.proc.wait(timeout=60)
            self.proc = None
        # a worker that left the tree and its session still holds the port: it is the server too
        for pid in listeners(self.port):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        from llmops.app.server import stop

        if self.proc is not None:
            stop(self.proc, timeout=30)
            self.proc = None


# -- llmops serve and a client that keeps asking ------------------------------------------------------
class Serving:
    def __init__(self, ref: str, env: dict[str, str], log: Path) -> None:
        self.ref, self.env, self.log, self.port = ref, env, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.answers = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._client: threading.Thread | None = None

    def start(self) -> None:
        fh = open(self.log, "a")  # noqa: SIM115
        self.proc = subprocess.Popen([LLMOPS, "serve", self.ref, "--port", str(self.port), "--poll", "0.5",
                                      "--threads", "1", "--ctx", "256", "--no-trace"], env=self.env, stdout=fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        fh.close()
        wait_for(lambda: self._up(), 300, "llmops serve to answer", step=0.25)

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"llmops serve ended: {self.log.read_text()[-1500:]}")
        try:
            return self.health().get("status") == "ok"
        except OSError:
            return False

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=10) as r:
            return json.loads(r.read())

    def ask(self) -> str:
        body = json.dumps({"prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
        req = urllib.request.Request(f"{self.url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.headers.get("X-Llmops-Model-Version", "")

    def keep_asking(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.ask()
                    self.answers += 1
                except Exception as exc:  # noqa: BLE001 - counted, reported by the test
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(0.1)

        self._client = threading.Thread(target=loop, daemon=True)
        self._client.start()

    def version(self) -> str | None:
        try:
            return str(self.health().get("version"))
        except OSError:
            return None

    def stop(self) -> None:
        self._stop.set()
        if self._client is not None:
            self._client.join(timeout=120)
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    kill_tree(self.proc.pid)
                    self.proc.wait(timeout=30)
            self.proc = None


__all__ = ["base_env"]
