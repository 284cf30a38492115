"""``--to`` values: every conversion target the converters know, parsed into a TargetSpec.

Each format contributes its own table (GGUF's is in ``gguf/targets.py``); a
string no table knows is a usage error that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable

from llmops.converters.base import TargetSpec
from llmops.errors import UsageError

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
    raise UsageError(f"unknown target {value!r}; valid targets: {', '.join(valid_targets())}")


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from llmops.converters.gguf.targets import ALIASES, TARGETS, gguf_target

    register_targets(gguf_target, [*TARGETS, *ALIASES])
