"""Libraries that configure the process's logging when imported, put back as they found it.

Several dependencies (tokenicer under GPTQModel, onnxruntime's quantizer under the ONNX
model builder) call ``logging.basicConfig`` at import, which would print every library's
INFO records on stderr for the rest of the process; stdout carries ``--json``.

Others warn at import about things that do not concern a CPU conversion (torchao's CUDA-only
extensions and Triton, torch's notice about torchao's pytree registrations): those loggers are
kept to errors, so that stderr carries only llmops' own progress and real warnings.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator


# Loggers whose import-time warnings are noise for llmops' users (see above).
IMPORT_NOISE = ("torchao", "torch.utils._pytree")


def silence_import_noise() -> None:
    for name in IMPORT_NOISE:
        logger = logging.getLogger(name)
        if logger.level < logging.ERROR:
            logger.setLevel(logging.ERROR)


@contextlib.contextmanager
def root_logging_kept() -> Iterator[Callable[[], None]]:
    """While the block runs, imports may add root handlers; they go again at the end (and
    whenever the yielded ``restore`` is called), and the root level comes back."""
    silence_import_noise()
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
