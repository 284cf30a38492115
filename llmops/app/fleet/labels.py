"""What a fleet node says of itself: Ray labels read off the host, its Ray resources, and the
version check a driver makes before it trusts a node with a job.

Ray's labels (``ray start --labels``) are what ``llmops node list`` shows and what the version
check reads; scheduling goes by custom resources, the stable mechanism (labels are still beta in
Ray 2.60): every node carries one :data:`SLOT` (two jobs never share a host and disturb each
other's timings) and a marker resource per target.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any

SLOT = "llmops_slot"
TARGET_PREFIX = "llmops_target_"
MARK = 0.001  # of a target's marker resource, per job: the slot is what is exclusive

PREFIX = "llmops-"
TARGET_LABEL = PREFIX + "target"
VERSION_LABELS = {  # label -> llmops.core.toolversions key: a node whose versions differ is refused
    PREFIX + "v-llmops": "llmops",
    PREFIX + "v-llama-cpp": "llama_cpp",
    PREFIX + "v-gguf": "gguf",
    PREFIX + "v-torch": "torch",
    PREFIX + "v-transformers": "transformers",
    PREFIX + "v-onnxruntime": "onnxruntime",
    PREFIX + "v-onnxruntime-genai": "onnxruntime_genai",
    PREFIX + "v-gptqmodel": "gptqmodel",
}
TARGET_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,46}[A-Za-z0-9])?$")


def check_target_name(name: str) -> str:
    from llmops.core.errors import UsageError

    if not TARGET_NAME.fullmatch(name or ""):
        raise UsageError(f"target name {name!r}: use letters, digits, '-', '_' and '.', at most 48 characters, "
                         "starting and ending with a letter or digit")
    return name


def target_resource(target: str) -> str:
    return TARGET_PREFIX + target


def label_value(value: Any) -> str:
    """A value as a Ray (Kubernetes-style) label takes it: at most 63 characters of letters,
    digits, '-', '_' and '.', beginning and ending with a letter or digit."""
    text = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value)).strip("_.-")
    return text[:63].rstrip("_.-")


def isa_class(flags: list[str] | set[str] | frozenset[str], machine: str) -> str:
    """The ISA tier the runtimes' kernels choose by: amx, avx512, avx2 (x86) or neon (Arm)."""
    f = set(flags)
    if {"amx_tile", "amx_int8"} & f:
        return "amx"
    if "avx512f" in f:
        return "avx512"
    if "avx2" in f:
        return "avx2"
    if "asimd" in f or machine in ("aarch64", "arm64"):
        return "neon"
    return label_value(machine) or "unknown"


def host_labels(target: str, device: str = "cpu") -> dict[str, str]:
    """This host as Ray labels: target, ISA tier, CPU model, cores, RAM, GPU and VRAM where there
    is one, the host name, and the versions of llmops and its runtimes."""
    from llmops.benchmarks.hardware import _gpu, profile
    from llmops.core.toolversions import tool_versions

    prof = profile(None, "cpu")
    labels = {
        TARGET_LABEL: target,
        PREFIX + "isa": isa_class(prof.get("isa_flags") or [], prof.get("machine") or ""),
        PREFIX + "cpu": label_value(prof.get("cpu_model") or "unknown"),
        PREFIX + "cores": str(prof.get("cores") or os.cpu_count() or 1),
        PREFIX + "ram-gib": str(round((prof.get("ram_bytes") or 0) / (1 << 30))),
        PREFIX + "host": label_value(socket.gethostname()),
    }
    gpu = _gpu() if device == "cuda" or os.environ.get("LLMOPS_FLEET_GPU") else {}
    if gpu.get("gpu_name"):
        labels[PREFIX + "gpu"] = label_value(gpu["gpu_name"])
        labels[PREFIX + "vram-gib"] = str(round(gpu.get("gpu_memory_bytes", 0) / (1 << 30)))
    versions = tool_versions("onnxruntime", "onnxruntime_genai", "gptqmodel")
    for label, key in VERSION_LABELS.items():
        if versions.get(key):
            labels[label] = label_value(versions[key])
    return {k: v for k, v in labels.items() if v}


def version_skew(labels: dict[str, str], mine: dict[str, str] | None = None) -> list[str]:
    """What differs between a node's recorded versions and this driver's: ``"torch 2.13.0 (here
    2.12.0)"`` lines, empty when they agree."""
    if mine is None:
        from llmops.core.toolversions import tool_versions

        versions = tool_versions("onnxruntime", "onnxruntime_genai", "gptqmodel")
        mine = {label: label_value(versions[key]) for label, key in VERSION_LABELS.items() if versions.get(key)}
    out = []
    for label in VERSION_LABELS:
        theirs, ours = labels.get(label), mine.get(label)
        if theirs != ours:
            out.append(f"{label.removeprefix(PREFIX + 'v-')} {theirs or 'missing'} (here {ours or 'missing'})")
    return out


def hardware_mismatch(labels: dict[str, str], measured: dict[str, Any]) -> list[str]:
    """Where a job's measured hardware contradicts the labels its node joined with (a node moved
    to other hardware, a label set by hand): named in the result, not hidden."""
    out = []
    isa = isa_class(measured.get("isa_flags") or [], measured.get("machine") or "")
    if labels.get(PREFIX + "isa") and labels[PREFIX + "isa"] != isa:
        out.append(f"ISA {isa}, labelled {labels[PREFIX + 'isa']}")
    cpu = label_value(measured.get("cpu_model") or "unknown")
    if labels.get(PREFIX + "cpu") and labels[PREFIX + "cpu"] != cpu:
        out.append(f"CPU {cpu}, labelled {labels[PREFIX + 'cpu']}")
    return out
