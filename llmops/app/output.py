"""One way to answer: a JSON document on stdout with --json, readable text otherwise.

Logs and progress always go to stderr so that stdout stays parseable.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any


def _default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return str(obj)


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, default=_default, sort_keys=False)


def emit(json_mode: bool, data: Any, render: Callable[[Any], str] | None = None) -> None:
    if json_mode:
        sys.stdout.write(dumps(data) + "\n")
    elif render is not None:
        text = render(data)
        if text:
            sys.stdout.write(text.rstrip("\n") + "\n")
    else:
        sys.stdout.write(dumps(data) + "\n")
    sys.stdout.flush()


def redacted(text: str) -> str:
    """``text`` as the user may see it: URIs redacted, the configured database and tracking
    credentials masked (an error may quote a password without its URI)."""
    from llmops.core.settings import configured_secrets, redact_text

    return redact_text(text, *configured_secrets())


def log(message: str) -> None:
    """A line on stderr, through :func:`redacted`."""
    sys.stderr.write(redacted(message).rstrip("\n") + "\n")
    sys.stderr.flush()


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    line = lambda r: "  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip()  # noqa: E731
    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)
