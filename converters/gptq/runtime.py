"""Living with GPTQModel inside a command-line tool.

GPTQModel 7.6 is written for interactive use, and several of its habits would
break a CLI whose stdout carries one JSON document, or a library caller:

* its worker pool refuses to start on a 2-core machine unless
  ``GPTQMODEL_CPU_WORKERS`` is at least 2 (the model-loader sub-pool asks for 2);
* it prints a banner, progress bars and tables on **stdout**, through a terminal
  library that caches the stream;
* a dependency (tokenicer) calls ``logging.basicConfig(level=INFO)`` at import,
  which would make every library's INFO records appear on stderr;
* it writes per-processor log files to ``./logs`` in the current folder;
* an exception in any of its worker threads ends the interpreter with
  ``os._exit(1)``, skipping every ``finally`` (so no temporary folder could be
  removed, and a test run would die).

Quantization therefore runs in a child interpreter (``worker.py``) whose stdout
is a log file; this module holds what that child and the GPTQ runner share: the
environment set before the import, a quiet import that puts the root logger back
as it was, and the per-layer progress taken from the hook GPTQModel itself uses
to print its table (``LoopProcessor.log_new_row``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Progress = Callable[[str], None]

_imported = False
_lock = threading.Lock()


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
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        try:
            with _stdout_to(os.devnull):
                import gptqmodel
        except ImportError as e:
            from llmops.errors import NotAvailable

            raise NotAvailable(f"GPTQ conversion needs gptqmodel ({e})") from None
        finally:
            for h in root.handlers[:]:
                if h not in handlers:
                    root.removeHandler(h)
            root.setLevel(level)
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


class LayerProgress:
    """Turns GPTQModel's per-module result rows into one line per decoder layer.

    GPTQModel calls the row hook on its worker threads, and a worker whose task raises
    ends the whole interpreter (``os._exit(1)`` in ``threadx``), so :meth:`row` never
    raises: it only formats a line and hands it to ``emit``, which must not raise either
    (the quantization worker process writes it to the pipe its parent reads).
    """

    def __init__(self, emit: Progress, n_layers: int, modules_per_layer: int) -> None:
        self.emit = emit
        self.n_layers = n_layers
        self.per_layer = max(1, modules_per_layer)
        self._rows: dict[int, list[tuple[str, float | None, float]]] = {}
        self._started = time.perf_counter()
        self._lock = threading.Lock()

    def row(self, stat: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            self._row(stat)

    def _row(self, stat: dict[str, Any]) -> None:
        try:
            layer = int(stat.get("layer", -1))
        except (TypeError, ValueError):
            return
        module = str(stat.get("module", "?"))
        loss = _float(stat.get("loss"))
        secs = _float(stat.get("time")) or 0.0
        with self._lock:
            rows = self._rows.setdefault(layer, [])
            rows.append((module, loss, secs))
            if len(rows) < self.per_layer:
                return
            done = self._rows.pop(layer)
        losses = [(x, m) for m, x, _ in done if x is not None]
        worst = max(losses) if losses else None
        text = f"layer {layer + 1}/{self.n_layers}: {len(done)} modules quantized"
        if worst is not None:
            mean = sum(x for x, _ in losses) / len(losses)
            text += f", loss mean {mean:.3g} max {worst[0]:.3g} ({worst[1]})"
        text += f", {time.perf_counter() - self._started:.1f} s elapsed"
        self.emit(text)


def _float(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


@contextlib.contextmanager
def contained_run(scratch: Path, hook: LayerProgress) -> Iterator[None]:
    """While GPTQModel runs: its ./logs into ``scratch``, its result rows to ``hook``, no transformers bars."""
    import gptqmodel.looper.loop_processor as lp

    cls = lp.LoopProcessor
    original_row = cls.log_new_row
    original_dir = lp._PROJECT_LOG_DIR

    def log_new_row(self: Any, stat: dict[str, Any]) -> None:
        original_row(self, stat)
        hook.row(stat)

    from transformers.utils import logging as hf_logging

    noisy = [logging.getLogger(n) for n in ("tokenicer", "tokenicer.tokenicer", "gptqmodel", "transformers")]
    levels = [lg.level for lg in noisy]
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" bars on stderr, between our progress lines
    cls.log_new_row = log_new_row
    lp._PROJECT_LOG_DIR = scratch / "logs"
    try:
        for lg in noisy:
            lg.setLevel(max(lg.level, logging.WARNING))
        yield
    finally:
        cls.log_new_row = original_row
        lp._PROJECT_LOG_DIR = original_dir
        for lg, lvl in zip(noisy, levels):
            lg.setLevel(lvl)
        if bars:
            hf_logging.enable_progress_bar()
