"""What runs on a target: the body of a fleet task, in a Ray worker of the target's node.

A task gets a small description (the artifact's URI and sha256, the options), fetches the
bytes itself — a path every host sees, or the registry's artifact store through a tracking
server, into the host's verified cache — and refuses bytes whose sha256 is not the registry's.
It then runs exactly what ``llmops bench`` runs (the child-process runners, on this host's
cores), reads this host's hardware profile, and returns a small result: the driver records
it. Errors of the job itself come back as one line in the result (``error``), so Ray retries
only what failed underneath it (a node that died), never a job that is simply wrong.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from llmops.core.errors import LLMOpsError


def host_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def fetch(art: dict[str, Any]) -> Path:
    """The bytes of ``art`` (``uri``, ``sha256``, ``label``, ``tracking_uri``) on this host,
    checked against the registry's sha256."""
    from llmops.app.serving.cache import cached, check
    from llmops.core.hashing import sha256_path
    from llmops.registry.artifacts import local_path

    label, sha = art["label"], art["sha256"]
    local = local_path(art["uri"])
    if local is not None and local.exists():
        check(sha256_path(local), sha, label)
        return local
    if local is not None and not art.get("tracking_uri", "").startswith("http"):
        raise LLMOpsError(f"{label}: {local} is not on this host (mount the store here, or serve its artifacts "
                          "from a tracking server: llmops ui --serve-artifacts)")

    def download(tmp: Path) -> str:
        import mlflow.artifacts

        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=art["uri"], dst_path=str(tmp),
                                                       tracking_uri=art.get("tracking_uri") or None))
        return sha256_path(got)

    return cached(sha, art["uri"], label, download)


def bench_job(spec: dict[str, Any], text: str | None) -> dict[str, Any]:
    """One artifact benchmarked on this host: ``{"metrics", "details", "hardware", "node_id",
    "host", "seconds"}``, or ``{"error": one line}``."""
    t0 = time.time()
    try:
        return _bench(spec, text, t0)
    except LLMOpsError as exc:
        return {"error": str(exc), "host": socket.gethostname(), "seconds": time.time() - t0}
    except Exception as exc:  # noqa: BLE001 - one line for the driver, whatever the runner raised
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", "host": socket.gethostname(),
                "seconds": time.time() - t0}


def _bench(spec: dict[str, Any], text: str | None, t0: float) -> dict[str, Any]:
    from llmops.benchmarks.bench import BenchOptions, bench_artifact
    from llmops.benchmarks.hardware import profile
    from llmops.core.settings import cache_dir

    threads = int(spec.get("threads") or host_threads())
    # Ray sets OMP_NUM_THREADS to a task's CPUs (none here: the slot is what is exclusive);
    # the runner children inherit the environment, so it says this host's thread count.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    path = fetch(spec["artifact"])
    baseline = fetch(spec["baseline"]) if spec.get("baseline") else None
    opts = BenchOptions(metrics=set(spec["metrics"]), device=spec.get("device", "cpu"), threads=threads, text=text,
                        ctx=spec["ctx"], chunks=spec.get("chunks"), baseline=baseline, runs=spec["runs"],
                        prompt_tokens=spec["prompt_tokens"], decode_tokens=spec["decode_tokens"],
                        cache_dir=cache_dir() / "logits")
    res = bench_artifact(path, opts)
    node_id = None
    try:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - run outside Ray (tests call it directly)
        pass
    return {"metrics": res["metrics"], "details": res["details"], "hardware": profile(threads, opts.device),
            "threads": threads, "node_id": node_id, "host": socket.gethostname(), "seconds": time.time() - t0}


def convert_job(spec: dict[str, Any], text: str | None) -> dict[str, Any]:
    """One conversion on this host into the sweep's folder (which the driver sees too), verified
    against the source as ``llmops convert`` verifies: ``{"record": {...}, "host", "seconds"}``,
    or ``{"error": one line}``. The driver registers it."""
    t0 = time.time()
    try:
        from llmops.app.converting import convert

        threads = int(spec.get("threads") or host_threads())
        os.environ["OMP_NUM_THREADS"] = str(threads)
        source = fetch(spec["source"])
        record = convert(source, spec["target"], Path(spec["output"]), verify=bool(spec.get("verify", True)),
                         eval_text=text, threads=threads)
        fields = {k: v for k, v in record.to_dict().items() if k != "tensors"}
        fields["output"] = str(record.output)
        return {"record": fields, "host": socket.gethostname(), "seconds": time.time() - t0}
    except LLMOpsError as exc:
        return {"error": str(exc), "host": socket.gethostname(), "seconds": time.time() - t0}
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", "host": socket.gethostname(),
                "seconds": time.time() - t0}
