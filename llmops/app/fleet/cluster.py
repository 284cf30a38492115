"""The driver's side of a fleet: connecting to the Ray cluster, and what it holds (the targets,
their nodes, which are busy), checked before any job is sent.

A driver runs on a host of the cluster (a node ``llmops node start`` joined, or the head):
Ray's client mode needs ``ray[client]``, which llmops does not install.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from llmops.app.fleet.labels import PREFIX, SLOT, TARGET_LABEL, version_skew
from llmops.core.errors import LLMOpsError, UsageError


@dataclass
class Node:
    node_id: str
    target: str
    host: str
    address: str
    labels: dict[str, str] = field(default_factory=dict)
    busy: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "target": self.target, "host": self.host, "address": self.address,
                "busy": self.busy, "labels": self.labels}

    @property
    def name(self) -> str:
        """Short and stable enough for a result's ``node``: the host label and the Ray node id's head."""
        return f"{self.labels.get(PREFIX + 'host', self.host)}:{self.node_id[:8]}"


def resolve_address(address: str | None) -> str:
    from llmops.app.fleet.nodes import ADDRESS_ENV, local_head_address

    found = address or os.environ.get(ADDRESS_ENV) or local_head_address()
    if not found:
        raise UsageError(f"no Ray cluster named: give --on HOST:PORT (the address `llmops node start --head` printed) "
                         f"or set ${ADDRESS_ENV}")
    return found


def connect(address: str | None, token_file: str | None = None) -> str:
    """Connect this process to the cluster as a driver (token authentication, quiet logs);
    returns the address. Ray's own notices go to stderr, never to the --json document. Nothing
    may import ray before this: it reads its authentication settings once, when imported."""
    from llmops.app.fleet.nodes import ensure_token, ray_env, token_path

    addr = resolve_address(address)
    token = ensure_token(token_path(token_file), create=False)
    env = ray_env(token, base={})
    for k, v in env.items():
        os.environ[k] = v
    os.environ.pop("RAY_AUTH_TOKEN", None)
    import ray  # Ray reads its authentication settings when first imported: after the lines above

    _notices_to_stderr()
    if ray.is_initialized():
        return addr
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    # Ray's core worker installs its own fatal-signal handlers: SIGTERM would print a stack and
    # exit 1 instead of unwinding as Ctrl-C does (and cancelling this driver's jobs)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        ray.init(address=addr, logging_level="ERROR", log_to_driver=False, namespace="llmops")
    except Exception as exc:  # noqa: BLE001 - ConnectionError, AuthenticationError, ...
        first = " ".join(str(exc).split())[:300]
        raise LLMOpsError(f"cannot connect to the Ray cluster at {addr}: {first} (is the token the head's, "
                          "and does this host belong to the cluster?)") from None
    finally:
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    return addr


def _notices_to_stderr() -> None:
    """Ray prints its raylet notices (a node died, a task is retried) on the driver's stdout,
    whatever ``log_to_driver`` says; stdout holds the --json document."""
    import sys

    from ray._private import worker

    original = getattr(worker, "_llmops_original_print", None) or worker.print_to_stdstream

    def to_stderr(data: Any, ignore_prefixes: Any = None, *args: Any, **kwargs: Any) -> None:
        for line in (data.get("lines") or []) if isinstance(data, dict) else []:
            sys.stderr.write(f"ray: {line}\n")

    worker._llmops_original_print = original
    worker.print_to_stdstream = to_stderr


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def fleet() -> list[Node]:
    """The alive nodes that joined as llmops targets, with whether each is busy (its benchmark
    slot taken)."""
    import ray
    from ray._private import state

    try:
        available = state.available_resources_per_node()
    except Exception:  # noqa: BLE001 - a private API: without it, nodes show as free
        available = {}
    out = []
    for n in ray.nodes():
        labels = dict(n.get("Labels") or {})
        if not n.get("Alive") or TARGET_LABEL not in labels:
            continue
        nid = n["NodeID"]
        mine = {k: v for k, v in labels.items() if k.startswith(PREFIX)}
        out.append(Node(node_id=nid, target=labels[TARGET_LABEL], host=n.get("NodeName") or n.get("NodeManagerAddress"),
                        address=f"{n.get('NodeManagerAddress')}:{n.get('NodeManagerPort')}", labels=mine,
                        busy=bool(available) and available.get(nid, {}).get(SLOT, 0) < 1))
    return sorted(out, key=lambda n: (n.target, n.host, n.node_id))


def choose_targets(nodes: list[Node], targets: list[str] | None, all_targets: bool) -> list[str]:
    """The targets asked for, each carried by at least one node whose versions match this
    driver's; otherwise one line naming what exists, or the node and what differs."""
    present = sorted({n.target for n in nodes})
    if all_targets:
        chosen = present
        if not chosen:
            raise LLMOpsError("the cluster has no llmops targets: start nodes with `llmops node start --target NAME`")
    else:
        if not targets:
            raise UsageError("name the targets: --target NAME[,NAME...] or --all-targets")
        missing = [t for t in targets if t not in present]
        if missing:
            raise LLMOpsError(f"no node carries target {', '.join(missing)}: the cluster has "
                              f"{', '.join(present) if present else 'no targets'}")
        chosen = list(dict.fromkeys(targets))
    for n in nodes:
        if n.target in chosen:
            skew = version_skew(n.labels)
            if skew:
                raise LLMOpsError(f"node {n.name} of target {n.target} runs other versions than this driver: "
                                  f"{'; '.join(skew)} (install the same llmops and runtimes there)")
    return chosen
