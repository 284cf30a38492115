"""Errors the CLI turns into one line on stderr and a non-zero exit."""

from __future__ import annotations


class LLMOpsError(Exception):
    """A failure the user can act on; its message is shown as-is, on one line."""

    exit_code = 1
    # True when the command already printed its JSON document (a failed gate's table):
    # the CLI then adds only the one-line reason on stderr.
    reported = False

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(LLMOpsError):
    """Bad arguments or input: exit 2, as click does for usage errors."""

    exit_code = 2


class NotAvailable(LLMOpsError):
    """A command that this version of llmops does not provide yet (exit 2, never a silent no-op)."""

    exit_code = 2


class GateFailed(LLMOpsError):
    """A promotion gate did not pass: exit 1 and nothing moved."""

    exit_code = 1
    reported = True
