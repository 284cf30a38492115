"""llama.cpp's own tools, as the reference that fidelity tests and `make bench` compare against.

Both come from the llama-cpp-python source distribution of the version we depend on (fetched
once with pip into the llmops cache), so the comparison runs the very llama.cpp we link.
They are never used to produce an artifact.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"


def reference_converter_script() -> Path:
    """llama.cpp's convert_hf_to_gguf.py from the llama-cpp-python sdist (cached; never part of the project)."""
    from llmops.core.settings import cache_dir

    root = cache_dir() / "reference" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    dl = root.parent / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(dl)], cwd=dl, check=True,
                   capture_output=True)
    tar = dl / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    with tarfile.open(tar) as tf:
        members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name and (
            "/conversion/" in m.name or "/gguf-py/" in m.name or m.name.endswith("convert_hf_to_gguf.py"))]
        tf.extractall(root.parent, members=members, filter="data")
    return script


def llama_cpp_tool(name: str) -> Path:
    """One of llama.cpp's own tools (llama-perplexity, llama-bench, llama-quantize, llama-server),
    built from the same llama.cpp that llama-cpp-python wraps, so both sides of a comparison run the
    same kernels (and llama-quantize reads an importance matrix exactly as the quantizer we call is
    handed it; llama-server batches with the very kernels ``llmops serve`` calls)."""
    from llmops.core.settings import cache_dir

    root = cache_dir() / "reference" / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    binary = root / "build" / "bin" / name
    if binary.is_file():
        return binary
    dl = cache_dir() / "reference" / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    tar = dl / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not tar.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(dl)], check=True, capture_output=True)
    src = root / "src"
    if not (src / "CMakeLists.txt").is_file():
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(tar) as tf:
            members = []
            for m in tf.getmembers():
                if m.name.startswith(prefix) and len(m.name) > len(prefix):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            tf.extractall(src, members=members, filter="data")
    print(f"building {name} (once; several minutes on 2 cores)", file=sys.stderr)
    subprocess.run(["cmake", "-S", str(src), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    # the server's targets only exist when asked for; the web UI and HTTPS are not needed
                    # on a loopback benchmark (nor built: only the named target is)
                    f"-DLLAMA_BUILD_SERVER={'ON' if name == 'llama-server' else 'OFF'}", "-DLLAMA_BUILD_UI=OFF",
                    "-DLLAMA_OPENSSL=OFF"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(root / "build"), "--target", name, "-j", str(os.cpu_count() or 2)],
                   check=True, capture_output=True)
    return binary
