"""Living with GPTQModel's run inside a command-line tool.

An exception in any of GPTQModel's worker threads ends the interpreter with
``os._exit(1)``, skipping every ``finally``, and it writes per-processor log files to
``./logs`` and progress bars to the terminal. Quantization therefore runs in a child
interpreter (``worker.py``, through the core's child protocol); this module holds what
that child needs while GPTQModel runs: its logs kept in a scratch folder, no progress
bars, and the per-layer progress taken from the hook GPTQModel itself uses to print its
table (``LoopProcessor.log_new_row``), reported as one phase whose bar the parent draws.
The quiet import is the core's (``llmops.core.gptqmodel_env``), since the GPTQ runner needs
it too.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmops.core.progress import Phase, as_reporter

Progress = Callable[[str], None]


class LayerProgress:
    """Turns GPTQModel's per-module result rows into one step per decoder layer: a phase
    (:meth:`phase`) advanced once per layer, with that layer's line as its note.

    GPTQModel calls the row hook on its worker threads, and a worker whose task raises
    ends the whole interpreter (``os._exit(1)`` in ``threadx``), so :meth:`row` never
    raises: it only formats a line and hands it on, to a reporter that must not raise either
    (the quantization worker process writes it to the pipe its parent reads).
    """

    def __init__(self, emit: Progress, n_layers: int, modules_per_layer: int) -> None:
        self.reporter = as_reporter(emit)
        self.n_layers = n_layers
        self.per_layer = max(1, modules_per_layer)
        self._rows: dict[int, list[tuple[str, float | None, float]]] = {}
        self._started = time.perf_counter()
        self._lock = threading.Lock()
        self._bar: Phase | None = None
        self.losses: list[tuple[int, str, float]] = []  # (layer, module, GPTQ loss), every module

    @contextlib.contextmanager
    def phase(self, name: str = "GPTQ") -> Iterator[Phase]:
        """While GPTQModel quantizes: the layers as one phase."""
        self._started = time.perf_counter()
        with self.reporter.phase(name, total=self.n_layers, unit="layer") as bar:
            self._bar = bar
            try:
                yield bar
            finally:
                self._bar = None

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
            if loss is not None:
                self.losses.append((layer, module, loss))
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
        bar = self._bar
        if bar is not None:
            bar.advance(note=text)
        else:
            self.reporter.detail(text)


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
