"""``--to`` values: every conversion target the converters know, parsed into a TargetSpec.

Each format contributes its own table (GGUF's is in ``gguf/targets.py``); a
string no table knows is a usage error that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable

from llmops.converters.base import TargetSpec
from llmops.core.errors import NotAvailable, UsageError

# parser(str) -> TargetSpec | None, and the names it accepts (for error messages and --help)
_PARSERS: list[tuple[Callable[[str], TargetSpec | None], list[str]]] = []


def register_targets(parser: Callable[[str], TargetSpec | None], names: list[str]) -> None:
    _PARSERS.append((parser, names))


def valid_targets() -> list[str]:
    _load_builtin()
    return [n for _, names in _PARSERS for n in names]


def parse_target(value: str) -> TargetSpec:
    """``gguf-q4`` -> TargetSpec("gguf", "Q4_K_M", ...); unknown -> UsageError listing the valid ones."""
    _load_builtin()
    for parser, _ in _PARSERS:
        spec = parser(value)
        if spec is not None:
            return spec
    fmt = value.strip().lower().split("-", 1)[0]
    if fmt in _PLANNED and fmt not in _registered:
        raise NotAvailable(f"conversion to {value} is not available in this version")
    raise UsageError(f"unknown target {value!r}; valid targets: {', '.join(valid_targets())}")


# Formats of the command-line contract whose converter may not be installed in this version.
_PLANNED = ("gptq", "onnx")


_loaded = False
_registered: set[str] = set()


def _load_builtin() -> None:
    """Each format's target table, from the format's own ``targets`` module (if installed)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for fmt in ("gguf", "gptq", "onnx"):
        try:
            mod = importlib.import_module(f"llmops.converters.{fmt}.targets")
        except ImportError:
            continue
        mod.register(register_targets)
        _registered.add(fmt)
