"""Multi-step jobs behind the CLI: convert (then verify and register)."""

from __future__ import annotations

from typing import Any

from llmops.errors import NotAvailable


def run_convert(state, *, source: str, target: str, output: str | None, register_name: str | None, verify: bool,  # noqa: ANN001
                calibration: str | None, device: str, eval_text: str | None, allow_nonfinite: bool) -> dict[str, Any]:
    raise NotAvailable("llmops convert is not available in this version of llmops")
