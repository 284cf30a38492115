"""The versions of the tools that made or measured something, as recorded on every run.

One table of every tool llmops may call; a record lists those installed here, so two
results can be compared only when they were produced by the same stack.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

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


def tool_versions(*extra: str) -> dict[str, str]:
    """Installed versions of the base stack plus ``extra`` keys of :data:`TOOLS`."""
    out: dict[str, str] = {}
    for key in (*BASE, *extra):
        try:
            out[key] = version(TOOLS[key])
        except PackageNotFoundError:
            pass
    return out
