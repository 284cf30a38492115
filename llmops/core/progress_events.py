"""Progress across a process boundary: a runner child reports its phases as lines on its
stderr (:class:`EventWriter`), the parent replays them on its own reporter (:class:`EventReader`).

Kept apart from :mod:`llmops.core.progress` (the reporters themselves) because this side reads
what another process wrote, and so must assume nothing about it.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from llmops.core.progress import EVENT, Phase, Reporter, Say

class EventWriter(Reporter):
    """A reporter that writes each call as one line through ``write`` (a child's stderr): a message
    as it is, warnings, notes and phases as :data:`EVENT` + JSON. Never raises: it may run on a
    library's worker thread, where an exception could end the interpreter."""

    def __init__(self, write: Say) -> None:
        self._write_line = write
        self._ids: dict[int, int] = {}
        self._next = 0
        self._lock = threading.Lock()

    def _send(self, event: dict[str, Any]) -> None:
        try:
            self._write_line(EVENT + json.dumps(event, separators=(",", ":")))
        except Exception:  # noqa: BLE001 - see the class docstring
            pass

    def info(self, message: str) -> None:
        try:
            self._write_line(" ".join(str(message).split()))
        except Exception:  # noqa: BLE001
            pass

    def warn(self, message: str) -> None:
        self._send({"e": "warn", "msg": str(message)})

    def detail(self, message: str) -> None:
        self._send({"e": "detail", "msg": str(message)})

    def _started(self, phase: Phase) -> None:
        with self._lock:
            self._next += 1
            pid = self._ids[id(phase)] = self._next
        self._send({"e": "phase", "id": pid, "name": phase.name,
                    "total": phase.total, "unit": phase.unit, "total_bytes": phase.total_bytes})

    def _advanced(self, phase: Phase, note: str | None) -> None:
        # totals, not increments: events sent from two threads may arrive out of order
        ev: dict[str, Any] = {"e": "advance", "id": self._ids.get(id(phase)), "done": phase.done,
                              "nbytes": phase.nbytes}
        if note is not None:
            ev["note"] = note
        self._send(ev)

    def _closed(self, phase: Phase) -> None:
        with self._lock:
            pid = self._ids.pop(id(phase), None)
        self._send({"e": "close", "id": pid, "ok": phase.ok})


class EventReader:
    """Replays an :class:`EventWriter`'s lines on ``reporter``; :meth:`close` ends the phases
    a child left open (it crashed, or was killed) so a bar does not stay half drawn.

    A child's stderr also carries what its libraries print, so a line may look like an event
    and not be one (or be a forged one): what cannot be read as an event of the writer's shape
    (bad JSON, a field of the wrong type, a count out of range, an unknown kind) is dropped,
    never raised, since an exception here would end the job the child is doing."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self._phases: dict[int | str, Phase] = {}

    def feed(self, line: str) -> None:
        if not line.startswith(EVENT):
            self.reporter.info(line)
            return
        try:
            ev = json.loads(line[len(EVENT):])
        except (ValueError, RecursionError):  # also the digit limit of huge integers
            return
        if isinstance(ev, dict):
            self._replay(ev)

    def _replay(self, ev: dict[str, Any]) -> None:
        kind, pid = ev.get("e"), ev.get("id")
        if kind in ("warn", "detail"):
            msg = ev.get("msg")
            if isinstance(msg, str):
                (self.reporter.warn if kind == "warn" else self.reporter.detail)(msg)
            return
        if isinstance(pid, bool) or not isinstance(pid, (int, str)):
            return
        if kind == "phase":
            name, unit = ev.get("name"), ev.get("unit")
            if not isinstance(name, str):
                return
            previous = self._phases.pop(pid, None)
            if previous is not None:  # an id used twice: the first phase ends here
                previous.close(ok=False)
            self._phases[pid] = self.reporter.phase(
                name, _count(ev.get("total")), unit=unit if isinstance(unit, str) and unit else "item",
                total_bytes=_count(ev.get("total_bytes")))
        elif kind == "advance":
            p = self._phases.get(pid)
            done, nbytes, note = _count(ev.get("done", 0)), _count(ev.get("nbytes", 0)), ev.get("note")
            if p is None or done is None or nbytes is None:
                return
            p.advance(max(0, done - p.done), nbytes=max(0, nbytes - p.nbytes),
                      note=note if isinstance(note, str) else None)
        elif kind == "close":
            p = self._phases.pop(pid, None)
            ok = ev.get("ok", True)
            if p is not None:
                p.close(ok=ok if isinstance(ok, bool) else False)

    def close(self) -> None:
        phases, self._phases = list(self._phases.values()), {}
        for p in phases:
            p.close(ok=False)


MAX_COUNT = 1 << 63  # no phase counts past this many items or bytes


def _count(value: Any) -> int | None:
    """A count as an :class:`EventWriter` sends it (an int from 0 up), else None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_COUNT:
        return None
    return value
