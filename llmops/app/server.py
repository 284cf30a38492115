"""``llmops ui``: MLflow's own server on the store, so users browse it in the UI they know."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO

from llmops.core.settings import configured_secrets, redact, redact_text
from llmops.core.errors import LLMOpsError
from llmops.app.output import emit, log


# The experiment's artifact location when the server serves artifacts: clients on other
# machines upload and download through the server instead of writing to a local path.
SERVED_ARTIFACT_ROOT = "mlflow-artifacts:/llmops"


# MLflow's server reads these for its --backend-store-uri and --registry-store-uri options
# (``mlflow server --help``). The store's URI goes to the child this way and never on its
# command line, which any user of the machine can read (``ps``, /proc/PID/cmdline): a
# PostgreSQL URI carries its password.
BACKEND_STORE_ENV = "MLFLOW_BACKEND_STORE_URI"
REGISTRY_STORE_ENV = "MLFLOW_REGISTRY_STORE_URI"


def server_command(store, host: str, port: int, serve_artifacts: bool = False,  # noqa: ANN001 - Store
                   workers: int = 1) -> list[str]:
    """The server's argv: nothing secret (the database URI goes in :func:`server_env`)."""
    s = store.settings
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port)]
    if serve_artifacts:
        cmd += ["--serve-artifacts", "--artifacts-destination", s.artifact_root.as_uri(),
                "--default-artifact-root", "mlflow-artifacts:/"]
    elif s.is_sqlite:
        cmd += ["--default-artifact-root", s.artifact_root.as_uri()]
    cmd += ["--workers", str(workers)]
    return cmd


def server_env(store, base: dict[str, str] | None = None) -> dict[str, str]:  # noqa: ANN001 - Store
    """The server's environment: ``base`` (default: ours) with the store's database URI in
    MLflow's variables for the backend and registry stores."""
    env = dict(os.environ if base is None else base)
    env[BACKEND_STORE_ENV] = store.settings.db_url
    env[REGISTRY_STORE_ENV] = store.settings.db_url
    # A read replica named in our environment would be some other database's.
    env.pop("MLFLOW_READ_REPLICA_BACKEND_STORE_URI", None)
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return env


def server_launch(store, host: str, port: int, serve_artifacts: bool = False, workers: int = 1,  # noqa: ANN001
                  base_env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of the MLflow server ``llmops ui`` starts."""
    return server_command(store, host, port, serve_artifacts, workers), server_env(store, base_env)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (127.0.0.0/8, ::1, a name
    that resolves only to those). 0.0.0.0, ::, other addresses and unresolvable names do not."""
    import ipaddress

    name = host.strip().strip("[]")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    if name.lower() == "localhost":
        return True
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        return False
    try:
        return bool(addrs) and all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addrs)
    except ValueError:
        return False


def exposure_warning(host: str, port: int, serve_artifacts: bool) -> str | None:
    """The warning ``llmops ui`` prints when it serves the artifact store beyond this machine."""
    if not serve_artifacts or is_loopback(host):
        return None
    return (f"warning: --serve-artifacts on {host}:{port} lets anyone who can reach this port read, upload "
            "and overwrite artifacts and registry entries without authentication; run it only on a trusted "
            "network, or put MLflow's basic-auth app in front (mlflow server --app-name basic-auth) "
            "or an authenticating reverse proxy")


def port_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound on ``host``, in the address family ``host`` is of (an IPv6
    address such as ``::1`` cannot be bound by an IPv4 socket: it was refused as "in use")."""
    name = host.strip().strip("[]")
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    for family, kind, proto, _canon, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError:
                return False
    return bool(infos)


def url_host(host: str) -> str:
    """``host`` as it goes into a URL: an IPv6 address in brackets."""
    name = host.strip().strip("[]")
    return f"[{name}]" if ":" in name else name


def wait_until_up(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LLMOpsError(f"the MLflow server exited with code {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:  # noqa: S310 - our own loopback URL
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise LLMOpsError(f"the MLflow server did not answer at {url} within {timeout:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds: a server that ignores the polite signal
    must not outlive whoever started it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies waiting for a reaper do not count)."""
    proc_fs = Path("/proc")
    if not proc_fs.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for entry in proc_fs.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a server started in its own process group: SIGTERM to all of it (MLflow's server,
    uvicorn, its job runner and huey consumers), SIGKILL to whatever is left after ``timeout``
    seconds, so that no worker outlives ``llmops ui``."""
    import signal

    def signal_group(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    signal_group(signal.SIGTERM)
    deadline = time.time() + timeout
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    while time.time() < deadline and _group_alive(proc.pid):
        time.sleep(0.2)
    signal_group(signal.SIGKILL)
    proc.wait()


def serve(store, host: str = "127.0.0.1", port: int = 5000, json_mode: bool = False,  # noqa: ANN001
          serve_artifacts: bool = False, workers: int = 1) -> int:
    """MLflow's server on the store's database. With ``serve_artifacts`` it is the shared
    tracking server of a team or CI: clients set ``MLFLOW_TRACKING_URI`` to it (and
    ``LLMOPS_DATABASE_URL`` to the same database for lineage) and upload through it."""
    if store.settings.tracking_uri != store.settings.db_url:
        raise LLMOpsError(f"MLFLOW_TRACKING_URI points at {redact(store.settings.tracking_uri)}: open that server's UI instead")
    warning = exposure_warning(host, port, serve_artifacts)
    if warning:
        log(warning)
    if not port_free(host, port):
        raise LLMOpsError(f"port {port} on {host} is in use: choose another with --port")
    if serve_artifacts:
        store.artifact_location = SERVED_ARTIFACT_ROOT
    store.open()  # create/migrate tables first, so the server starts on a ready database
    if serve_artifacts:
        loc = store.mlflow.get_experiment(store.experiment_id).artifact_location
        if not loc.startswith("mlflow-artifacts:"):
            raise LLMOpsError(f"this store keeps artifacts at {loc}, which clients of a shared server cannot "
                              "reach: start a shared server on a fresh database")
    url = f"http://{url_host(host)}:{port}"
    argv, env = server_launch(store, host, port, serve_artifacts, workers)
    import signal

    # A service manager (or a test) stops us with SIGTERM, a closed terminal with SIGHUP (which,
    # in its own session, the server no longer gets): take the server down with us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: sys.exit(0))
    # Its own process group, so that stopping it reaches the workers it starts (MLflow's job
    # runner leaves its huey consumers behind otherwise); Ctrl-C reaches us and we stop it.
    # Its output reaches the user through us (see _relay).
    proc = subprocess.Popen(argv, env=env, start_new_session=True,  # noqa: S603 - fixed argv
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    relay = threading.Thread(target=_relay, args=(proc.stdout, store.settings.secrets()), daemon=True,
                             name="mlflow-server-output")
    relay.start()
    try:
        wait_until_up(url, proc)
        if json_mode:
            emit(True, {"url": url, "pid": proc.pid, **store.describe()})
        log(f"MLflow UI for {store.settings.store_dir} at {url} (Ctrl-C to stop)")
        if serve_artifacts:
            log(f"clients: MLFLOW_TRACKING_URI={url} LLMOPS_DATABASE_URL={redact(store.settings.db_url)}")
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_group(proc, timeout=10)
        relay.join(timeout=10)


def _relay(stream: IO[bytes], secrets: tuple[str, ...]) -> None:
    """The server's output, line by line, on our stderr through :func:`redact_text`: the server
    holds the database URI, and a traceback of its may quote it. On stderr, not stdout, which
    --json keeps for the one document."""
    known = (*secrets, *configured_secrets())
    with stream:
        for raw in iter(stream.readline, b""):
            try:
                sys.stderr.write(redact_text(raw.decode("utf-8", "replace"), *known))
                sys.stderr.flush()
            except (OSError, ValueError):  # our stderr is gone: keep draining, so the server never blocks
                pass
