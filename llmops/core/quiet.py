"""Libraries that configure the process's logging when imported, put back as they found it.

Several dependencies (tokenicer under GPTQModel, onnxruntime's quantizer under the ONNX
model builder) call ``logging.basicConfig`` at import, which would print every library's
INFO records on stderr for the rest of the process; stdout carries ``--json``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def root_logging_kept() -> Iterator[Callable[[], None]]:
    """While the block runs, imports may add root handlers; they go again at the end (and
    whenever the yielded ``restore`` is called), and the root level comes back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def restore() -> None:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)

    try:
        yield restore
    finally:
        restore()
