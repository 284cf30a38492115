"""``llmops serve``, ``llmops monitor`` and ``llmops rollback``."""

from __future__ import annotations
