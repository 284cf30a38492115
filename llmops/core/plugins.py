"""Extension points named as ``"module:Class"`` strings, imported only when used.

Converters (one per format) and runners (one per backend) are looked up by name; a table
of strings keeps ``llmops --help`` from importing torch, llama.cpp or onnxruntime, and
lets a missing optional package become one clear error instead of a traceback.
"""

from __future__ import annotations

import importlib
from typing import Any

from llmops.core.errors import LLMOpsError


def load(table: dict[str, str], key: str, *, unknown: str, unavailable: str,
         error: type[LLMOpsError] = LLMOpsError) -> Any:
    """The object ``table[key]`` names.

    ``unknown`` and ``unavailable`` are the one-line messages for a key the table lacks and
    for a module that will not import; they may use ``{key}``, ``{known}`` and ``{reason}``."""
    target = table.get(key)
    if target is None:
        raise error(unknown.format(key=key, known=", ".join(table), reason=""))
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise error(unavailable.format(key=key, known=", ".join(table), reason=e)) from None
