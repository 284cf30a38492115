"""The fault campaign's surroundings: PostgreSQL databases and a proxy that can cut them off, a
shared MLflow server that can be killed and restarted, ``llmops serve`` with a client that keeps
asking, a small filesystem that fills up, and a preloaded library that fails writes with EIO."""

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
import uuid
from collections.abc import Iterator
from pathlib import Path

from faultkit import LLMOPS, base_env

PG_ADMIN_URL = os.environ.get("LLMOPS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


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


# -- PostgreSQL ----------------------------------------------------------------------------------------
def pg_admin():  # noqa: ANN201
    from sqlalchemy import create_engine

    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})


def pg_reachable() -> bool:
    try:
        eng = pg_admin()
        with eng.connect() as c:
            c.exec_driver_sql("SELECT 1")
        eng.dispose()
        return True
    except Exception:  # noqa: BLE001
        return False


@contextlib.contextmanager
def pg_database(template: str | None = None) -> Iterator[str]:
    name = f"llmops_chaos_{uuid.uuid4().hex[:10]}"
    eng = pg_admin()
    with eng.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    try:
        yield name
    finally:
        with eng.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        eng.dispose()


def pg_url(db: str, port: int | None = None) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    if port is not None:
        base = base.replace(":5432", f":{port}")
    return f"{base}/{db}"


def terminate_backends(db: str) -> int:
    """``pg_terminate_backend`` on every session of database ``db``: how many there were."""
    eng = pg_admin()
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


# -- a small filesystem that fills up -------------------------------------------------------------------
class SmallDisk:
    """A tmpfs at ``path`` whose size is set at will (root, and a kernel that lets this container
    mount: checked by :meth:`available`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = False

    @staticmethod
    def available(probe: Path) -> bool:
        probe.mkdir(parents=True, exist_ok=True)
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], capture_output=True)
        return ok

    def mount(self, size: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)], check=True)
        self.mounted = True

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def used(self) -> int:
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def umount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)
            self.mounted = False


# -- writes that fail with EIO ---------------------------------------------------------------------------
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include <fcntl.h>

static long fail_at = -2;
static const char *prefix;
static long seen;
static int count_fd = -1;

#define NEXT(name) static __typeof__(name) *real; if (!real) real = dlsym(RTLD_NEXT, #name)

/* FAULT_EIO_PREFIX: the path the failing writes go to; FAULT_EIO_AT: the first of them to fail
   (every later one fails too, as on a failing disk); FAULT_EIO_COUNT: a file that holds how
   many writes went there so far. */
static int failing(int fd) {
    if (fail_at == -2) {
        const char *at = getenv("FAULT_EIO_AT"), *count = getenv("FAULT_EIO_COUNT");
        prefix = getenv("FAULT_EIO_PREFIX");
        fail_at = at ? atol(at) : -1;
        if (count) count_fd = open(count, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    }
    if (!prefix || fd == count_fd) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = 0;
    if (strncmp(path, prefix, strlen(prefix)) != 0) return 0;
    long now = __atomic_add_fetch(&seen, 1, __ATOMIC_SEQ_CST);
    if (count_fd >= 0) {
        char buf[32];
        int len = snprintf(buf, sizeof buf, "%ld\n", now);
        NEXT(pwrite);
        real(count_fd, buf, len, 0);
    }
    if (fail_at < 0 || now < fail_at) return 0;
    errno = EIO;
    return 1;
}

ssize_t write(int fd, const void *b, size_t n) { NEXT(write); return failing(fd) ? -1 : real(fd, b, n); }
ssize_t pwrite(int fd, const void *b, size_t n, off_t o) { NEXT(pwrite); return failing(fd) ? -1 : real(fd, b, n, o); }
ssize_t pwrite64(int fd, const void *b, size_t n, off_t o) { NEXT(pwrite64); return failing(fd) ? -1 : real(fd, b, n, o); }
ssize_t writev(int fd, const struct iovec *v, int c) { NEXT(writev); return failing(fd) ? -1 : real(fd, v, c); }
ssize_t pwritev(int fd, const struct iovec *v, int c, off_t o) { NEXT(pwritev); return failing(fd) ? -1 : real(fd, v, c, o); }
ssize_t copy_file_range(int i, off_t *io, int o, off_t *oo, size_t n, unsigned f) {
    NEXT(copy_file_range); return failing(o) ? -1 : real(i, io, o, oo, n, f); }
int fsync(int fd) { NEXT(fsync); return failing(fd) ? -1 : real(fd); }
int fdatasync(int fd) { NEXT(fdatasync); return failing(fd) ? -1 : real(fd); }
"""


def build_shim(folder: Path) -> Path | None:
    """The EIO library, compiled here (None without a C compiler)."""
    src, lib = folder / "eio.c", folder / "libeio.so"
    folder.mkdir(parents=True, exist_ok=True)
    src.write_text(SHIM)
    try:
        r = subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(lib), str(src), "-ldl"], capture_output=True)
    except OSError:
        return None
    return lib if r.returncode == 0 else None


def with_eio(env: dict[str, str], lib: Path, prefix: Path, at: int, count: Path | None = None) -> dict[str, str]:
    out = {**env, "LD_PRELOAD": str(lib), "FAULT_EIO_PREFIX": str(prefix), "FAULT_EIO_AT": str(at)}
    if count is not None:
        out["FAULT_EIO_COUNT"] = str(count)
    return out


__all__ = ["base_env"]
