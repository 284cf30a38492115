"""``llmops node start | stop``: this host as a Ray node that is a benchmark target.

``ray start --block`` runs as our child in a session of its own, so what one ``node start``
started is exactly the processes of that session, and ``node stop`` ends those (by process
id, never ``ray stop``, which ends every Ray process of the user). Secure by default: Ray's
token authentication on (a token file the user gives, or one made with mode 0600 for a new
head), no dashboard and no client server, and the node's environment — which every task on it
inherits — without database or MLflow credentials.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmops.app.fleet.labels import SLOT, check_target_name, host_labels, target_resource
from llmops.core.errors import LLMOpsError, UsageError
from llmops.core.settings import cache_dir

STARTED = "Ray runtime started"
OBJECT_STORE_BYTES = 100_000_000  # results and the eval text are small; Ray's default is 30 % of RAM
MAX_TEMP_DIR = 40  # Ray's socket paths under it must fit the 107 bytes of a Unix socket name
# What a worker must never see (every task inherits the node's environment): database and
# tracking credentials stay with the driver, which alone records results.
CREDENTIALS = ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_USERNAME",
               "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_BACKEND_STORE_URI",
               "MLFLOW_REGISTRY_STORE_URI", "PGPASSWORD", "PGPASSFILE", "DATABASE_URL", "LLMOPS_API_KEY")
ADDRESS_ENV = "LLMOPS_RAY_ADDRESS"
TOKEN_ENV = "LLMOPS_RAY_TOKEN_FILE"


def fleet_dir() -> Path:
    return cache_dir() / "fleet"


def token_path(explicit: str | None = None) -> Path:
    """``--token-file``, else ``$LLMOPS_RAY_TOKEN_FILE``, else the cache's ``fleet/auth_token``."""
    return Path(explicit or os.environ.get(TOKEN_ENV) or fleet_dir() / "auth_token").expanduser().resolve()


def ensure_token(path: Path, create: bool) -> Path:
    """The token file, made (64 hex characters, mode 0600) when ``create`` and missing; one that
    others may read is refused: whoever holds it can run code on every node."""
    if not path.exists():
        if not create:
            raise UsageError(f"no Ray token at {path}: copy the head's token file there (mode 0600), or name it "
                             f"with --token-file / ${TOKEN_ENV}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        return path
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"the Ray token {path} is readable by others (mode {oct(mode & 0o777)}): chmod 600 it")
    if not path.read_text().strip():
        raise UsageError(f"the Ray token {path} is empty")
    return path


def ray_env(token: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a node (and so of every task on it), or of a driver: token
    authentication on, no usage reporting, no credentials."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in CREDENTIALS}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env.pop("RAY_AUTH_TOKEN", None)  # the file is the one source
    return env


def ray_executable() -> str:
    exe = Path(sys.executable).with_name("ray")
    if not exe.exists():
        raise UsageError("Ray is not installed beside llmops: pip install 'llmops[fleet]' (ray==2.60.0)")
    return str(exe)


def _temp_dir() -> Path:
    """A short private folder for the node's sockets, logs and session."""
    base = Path(tempfile.gettempdir())
    if len(str(base)) > MAX_TEMP_DIR - 20:
        base = Path("/tmp")
    root = base / f"llmops-ray-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="", dir=root))


def _wait_started(proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if STARTED in text:
            return
        if proc.poll() is not None:
            raise LLMOpsError(f"ray start exited with status {proc.returncode}: {_last_line(text)}")
        time.sleep(0.2)
    _end_session(proc.pid)
    raise LLMOpsError(f"the Ray node did not start within {timeout:.0f} s (see {log}): {_last_line(log.read_text(errors='replace'))}")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "WARNING" not in ln]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["no output"])[-1][:300]


def start(target: str, *, head: bool, address: str | None = None, port: int = 0, node_ip: str | None = None,
          num_cpus: int | None = None, token_file: str | None = None, device: str = "cpu",
          timeout: float = 120.0) -> dict[str, Any]:
    """Start this host's node (the head of a new cluster, or one joining ``address``) and wait
    until it runs; returns what it joined with."""
    check_target_name(target)
    if head and address:
        raise UsageError("give --head to start a cluster, or --address HOST:PORT to join one, not both")
    if not head and not address:
        address = os.environ.get(ADDRESS_ENV) or local_head_address()
        if not address:
            raise UsageError(f"give --head to start a cluster, or --address HOST:PORT (or ${ADDRESS_ENV}) to join one")
    exe = ray_executable()
    token = ensure_token(token_path(token_file), create=head)
    labels = host_labels(target, device)
    resources = {SLOT: 1, target_resource(target): 1}
    tmp = _temp_dir()
    args = [exe, "start", "--block", "--temp-dir", str(tmp), "--disable-usage-stats",
            "--object-store-memory", str(OBJECT_STORE_BYTES), "--resources", json.dumps(resources),
            "--labels", ",".join(f"{k}={v}" for k, v in labels.items())]
    if head:
        args += ["--head", "--port", str(port), "--include-dashboard=false"]
    else:
        args += ["--address", str(address)]
    if node_ip:
        args += ["--node-ip-address", node_ip]
    if num_cpus:
        args += ["--num-cpus", str(num_cpus)]
    log = tmp / "node.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                env=ray_env(token), start_new_session=True, cwd=str(tmp))
    _wait_started(proc, log, timeout)
    if head:
        current = tmp / "ray_current_cluster"
        address = current.read_text().strip() if current.exists() else f"{node_ip or '127.0.0.1'}:{port}"
    record = {"pid": proc.pid, "target": target, "head": head, "address": address, "node_ip": node_ip,
              "temp_dir": str(tmp), "log": str(log), "token_file": str(token), "labels": labels,
              "resources": resources, "started_at": time.time()}
    state = fleet_dir() / "nodes"
    state.mkdir(parents=True, exist_ok=True)
    (state / f"{proc.pid}.json").write_text(json.dumps(record, indent=2))
    return record


def records() -> list[dict[str, Any]]:
    """The nodes ``node start`` started on this host and that still run."""
    out = []
    for f in sorted((fleet_dir() / "nodes").glob("*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if _ours(rec):
            out.append(rec)
        else:
            f.unlink(missing_ok=True)  # a node that is gone (stopped, or the host rebooted)
    return out


def _ours(rec: dict[str, Any]) -> bool:
    """Whether the recorded process is still the ``ray start`` we started (pids are reused)."""
    try:
        cmd = Path(f"/proc/{int(rec['pid'])}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, KeyError):
        return False
    return b"start" in cmd and str(rec.get("temp_dir", "")).encode() in cmd


def local_head_address() -> str | None:
    heads = [r for r in records() if r.get("head")]
    return heads[-1]["address"] if heads else None


def stop(target: str | None = None, timeout: float = 15.0) -> list[dict[str, Any]]:
    """Stop the nodes ``node start`` started here (of ``target``, or all): joined nodes first,
    then heads. SIGTERM to ``ray start`` (which stops its node's processes), then SIGKILL to
    whatever of its session is left."""
    chosen = [r for r in records() if target is None or r["target"] == target]
    stopped = []
    for rec in sorted(chosen, key=lambda r: bool(r.get("head"))):
        _end_session(int(rec["pid"]), timeout)
        (fleet_dir() / "nodes" / f"{rec['pid']}.json").unlink(missing_ok=True)
        stopped.append({"target": rec["target"], "pid": rec["pid"], "head": rec.get("head", False),
                        "address": rec.get("address")})
    return stopped


def _session_members(sid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 4 and int(fields[4]) == sid:  # state ppid pgrp session
            out.append(int(d.name))
    return out


def _end_session(pid: int, timeout: float = 15.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    for member in _session_members(pid):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
