"""GPTQ targets: the ``--to gptq-*`` strings and what each one means.

Only the bit width is part of the target name; group size, act-order, symmetry,
damping and calibration data are options (``TargetSpec.options``), because they
are tuning knobs of one format rather than different formats.
"""

from __future__ import annotations

from collections.abc import Callable

from llmops.converters.base import TargetSpec

TARGETS: dict[str, int] = {"gptq-4bit": 4, "gptq-8bit": 8}
ALIASES: dict[str, str] = {"gptq-4": "gptq-4bit", "gptq-8": "gptq-8bit"}


def gptq_target(name: str) -> TargetSpec | None:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    bits = TARGETS.get(key)
    if bits is None:
        return None
    return TargetSpec("gptq", f"{bits}bit", {"bits": bits, "target": key})


def register(add: Callable[[Callable[[str], TargetSpec | None], list[str]], None]) -> None:
    # Only the canonical names are listed (help text, error messages); aliases still parse.
    add(gptq_target, list(TARGETS))
