"""Importing GPTQModel inside a command-line tool (shared by the GPTQ converter and runner).

GPTQModel 7.6 is written for interactive use: its worker pool refuses to start on a
2-core machine unless ``GPTQMODEL_CPU_WORKERS`` is at least 2 (the model-loader sub-pool
asks for 2); it prints a banner on **stdout** at import, through a terminal library that
caches the stream; and a dependency (tokenicer) calls ``logging.basicConfig(level=INFO)``
at import, which would make every library's INFO records appear on stderr. Here is the
one quiet import, which sets the environment first and puts logging back as it was.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

from llmops.core.quiet import root_logging_kept

_lock = threading.Lock()
_imported = False


def configure_environment() -> None:
    """Worker counts GPTQModel's thread pool accepts; must run before gptqmodel is imported."""
    # The pool's "model_loader:cpu" sub-pool takes 2 workers from the "cpu" pool, so a
    # value below 2 (GPTQModel's own default on a 2-core machine is 1) cannot start.
    value = os.environ.get("GPTQMODEL_CPU_WORKERS")
    try:
        workers = int(value) if value else 0
    except ValueError:
        workers = 0
    if workers < 2:
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, min(12, ((os.cpu_count() or 2) + 1) // 2)))


def import_gptqmodel() -> Any:
    """Import gptqmodel once, quietly, leaving the process's logging configuration as it was."""
    global _imported
    with _lock:
        if _imported:
            import gptqmodel

            return gptqmodel
        configure_environment()
        try:
            with root_logging_kept(), _stdout_to(os.devnull):
                import gptqmodel
        except ImportError as e:
            from llmops.core.errors import NotAvailable

            raise NotAvailable(f"GPTQ conversion needs gptqmodel ({e})") from None
        _imported = True
        return gptqmodel


@contextlib.contextmanager
def _stdout_to(path: str | os.PathLike[str]) -> Iterator[None]:
    """Send everything written to stdout (Python and native) to ``path`` meanwhile.

    The replacement Python stream is left open afterwards on purpose: GPTQModel's
    terminal library keeps references to the stream it saw, and a closed file
    would make its later writes fail; they land in the (removed) log file instead.
    """
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    saved_fd = os.dup(1)
    saved_py = sys.stdout
    sink = open(path, "a", encoding="utf-8", errors="replace", buffering=1)  # noqa: SIM115 - see docstring
    try:
        os.dup2(sink.fileno(), 1)
        sys.stdout = sink
        yield
    finally:
        with contextlib.suppress(Exception):
            sink.flush()
        sys.stdout = saved_py
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
