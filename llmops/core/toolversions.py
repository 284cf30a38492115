"""The versions of the tools that made or measured something, as recorded on every run.

One table of every tool llmops may call; a record lists those installed here, so two
results can be compared only when they were produced by the same stack.
"""

from __future__ import annotations

import os
import re
import sys
from functools import lru_cache

# record key -> distribution name
TOOLS: dict[str, str] = {
    "llmops": "llmops",
    "gguf": "gguf",
    "llama_cpp": "llama-cpp-python",
    "torch": "torch",
    "transformers": "transformers",
    "numpy": "numpy",
    "gptqmodel": "gptqmodel",
    "optimum": "optimum",
    "onnxruntime": "onnxruntime",
    "onnxruntime_genai": "onnxruntime-genai",
    "onnx": "onnx",
    "onnx_ir": "onnx-ir",
}

BASE = ("llmops", "gguf", "llama_cpp", "torch", "transformers", "numpy")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


@lru_cache(maxsize=1)
def _installed() -> dict[str, str]:
    """Normalised distribution name -> version, from the ``NAME-VERSION.dist-info`` folder names on
    ``sys.path`` (first one wins, as for imports): one listing of each folder, where
    ``importlib.metadata.version`` searches every path entry again for each name (a conversion
    recorded six names in 30 ms, a twentieth of a small model's whole conversion)."""
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for n in names:
            if n.endswith(".dist-info") and "-" in n:
                dist, _, ver = n[: -len(".dist-info")].rpartition("-")
                found.setdefault(_norm(dist), ver)
    return found


def tool_versions(*extra: str) -> dict[str, str]:
    """Installed versions of the base stack plus ``extra`` keys of :data:`TOOLS`."""
    out: dict[str, str] = {}
    installed = _installed()
    for key in (*BASE, *extra):
        ver = installed.get(_norm(TOOLS[key]))
        if ver is None:  # installed some other way (an egg, a zip): the library's own search
            from importlib.metadata import PackageNotFoundError, version

            try:
                ver = version(TOOLS[key])
            except PackageNotFoundError:
                continue
        out[key] = ver
    return out
