"""Progress of long phases: one bar per phase on a terminal, a few lines elsewhere, nothing under --json.

Why a reporter and not lines: a 70B conversion has thousands of tensors, and a line per tensor
buries the lines that matter (the destination, a warning, the verification). The library
functions keep their ``progress: Callable[[str], None]`` parameter, so a plain ``say(msg)`` still
works; a :class:`Reporter` is such a callable too, and also takes phases::

    rep = as_reporter(progress)
    rep("converting ...")                      # a message, as before
    with rep.phase("convert", total=n, unit="tensor", total_bytes=size) as bar:
        bar.advance(0, nbytes=len(buf))        # part of an item
        bar.advance(note="[1/n] blk.0 ...")    # an item done; the note is a verbose-only line
    rep.warn("...")                            # shown even when quiet

How phases are shown is the caller's choice, made once at the top (the CLI):
:class:`StreamReporter` draws a bar redrawn in place on a terminal, prints a start line,
25/50/75 % lines for phases that take a while and an end line with totals and rate elsewhere,
only warnings when quiet, and notes when verbose. :class:`CallbackReporter` turns everything into
messages for a plain callable (a library caller, a test), notes included, as the per-item lines
used to be.

Child processes cannot hand a reporter over: ``progress_events.EventWriter`` encodes every call as one line
(plain messages as they are, the rest as :data:`EVENT` + JSON) and ``EventReader`` replays
those lines on the parent's reporter (``llmops.core.child`` carries them).

No third-party dependency: the bar is a line of text.
"""

from __future__ import annotations

import contextlib
import contextvars
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from llmops.core.settings import configured_secrets, redact_text

Say = Callable[[str], None]
EVENT = "\x1fprogress "  # starts an encoded progress event (see EventWriter)
MILESTONES = (25, 50, 75)  # percentages a non-terminal stream reports for a phase that takes a while


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _plural(unit: str, n: float | None) -> str:
    return unit if n == 1 else unit + "s"


class Phase:
    """One long phase of work: how far it got, since when. Close it (or use it as a context
    manager) so a terminal bar ends its line even when the work fails."""

    def __init__(self, reporter: Reporter, name: str, total: int | None, unit: str,
                 total_bytes: int | None) -> None:
        self.reporter = reporter
        self.name = name
        self.total = total
        self.unit = unit
        self.total_bytes = total_bytes
        self.done = 0
        self.nbytes = 0
        self.started = time.monotonic()
        self.closed = False
        self.ok = True
        self._lock = threading.Lock()  # GPTQModel reports from its worker threads

    def advance(self, n: int = 1, *, nbytes: int = 0, note: str | None = None) -> None:
        """``n`` more items done (0: part of one), ``nbytes`` more bytes; ``note`` describes the item."""
        if self.closed:
            return
        with self._lock:
            self.done += n
            self.nbytes += nbytes
        self.reporter._advanced(self, note)

    def close(self, ok: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        self.ok = ok
        self.reporter._closed(self)

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(ok=exc_type is None)

    # -- text
    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def fraction(self) -> float | None:
        if self.total:
            return min(1.0, self.done / self.total)
        if self.total_bytes:
            return min(1.0, self.nbytes / self.total_bytes)
        return None

    def count(self) -> str:
        if self.total is None:
            return f"{self.done} {_plural(self.unit, self.done)}"
        return f"{self.done}/{self.total} {_plural(self.unit, self.total)}"

    def rate(self) -> str:
        s = self.elapsed
        if s <= 0:
            return ""
        if self.nbytes:
            return f"{self.nbytes / s / 1e6:.1f} MB/s"
        if not self.done:
            return ""
        per = self.done / s
        return f"{per:.1f} {self.unit}/s" if per >= 1 else f"{s / self.done:.1f} s/{self.unit}"

    def eta(self) -> str:
        f = self.fraction
        if not f or f >= 1:
            return ""
        return f"eta {self.elapsed * (1 - f) / f:.0f}s"

    def start_line(self) -> str:
        what = self.count() if self.total is None else f"{self.total} {_plural(self.unit, self.total)}"
        if self.total is None and not self.done:
            what = "started"
        return f"{self.name}: {what}" + (f", {_mb(self.total_bytes)}" if self.total_bytes else "")

    def status(self) -> str:
        parts = [self.count()]
        f = self.fraction
        if f is not None:
            parts[0] += f" ({f * 100:.0f}%)"
        if self.nbytes:
            parts.append(_mb(self.nbytes))
        parts += [x for x in (self.rate(), self.eta()) if x]
        return f"{self.name}: " + ", ".join(parts)

    def summary(self) -> str:
        """The end line: totals, time and rate."""
        if not self.ok:
            return f"{self.name}: stopped at {self.count()} after {self.elapsed:.1f} s"
        text = f"{self.name}: {self.count()}"
        if self.nbytes:
            text += f", {_mb(self.nbytes)}"
        text += f" in {self.elapsed:.1f} s"
        rate = self.rate()
        return text + (f" ({rate})" if rate else "")


class Reporter:
    """Messages, warnings, verbose-only details and phases; this base drops them all.

    Calling a reporter is :meth:`info`, so it is a ``Callable[[str], None]`` wherever one was."""

    def __call__(self, message: str) -> None:
        self.info(message)

    def info(self, message: str) -> None:
        """What is happening ("converting X to Y -> Z"): not shown when quiet."""

    def warn(self, message: str) -> None:
        """Something the user should know even under --json (a fallback, a smaller sample)."""

    def detail(self, message: str) -> None:
        """A line for --verbose only (a row of the per-tensor table)."""

    def phase(self, name: str, total: int | None = None, *, unit: str = "item",
              total_bytes: int | None = None) -> Phase:
        p = Phase(self, name, total, unit, total_bytes)
        self._started(p)
        return p

    # -- what subclasses show
    def _started(self, phase: Phase) -> None:
        pass

    def _advanced(self, phase: Phase, note: str | None) -> None:
        if note is not None:
            self.detail(note)

    def _closed(self, phase: Phase) -> None:
        pass


NULL = Reporter()


class CallbackReporter(Reporter):
    """Everything as messages to a plain callable: a phase's start and end lines and every note,
    so a library caller gets the per-item lines it always got. An exception the callable raises
    (a caller's Ctrl-C, say) propagates; a phase closed by it does not call it again."""

    def __init__(self, say: Say) -> None:
        self.say = say

    def info(self, message: str) -> None:
        self.say(message)

    warn = detail = info

    def _started(self, phase: Phase) -> None:
        self.say(phase.start_line())

    def _closed(self, phase: Phase) -> None:
        if phase.ok:
            self.say(phase.summary())


class StreamReporter(Reporter):
    """Progress on a text stream (stderr): a bar redrawn in place with ``\\r`` when ``tty``; else
    a start line, a line at 25/50/75 % once a phase has run ``milestone_after`` seconds, and an
    end line; only warnings when ``quiet``; notes too when ``verbose``."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None, quiet: bool = False, verbose: bool = False,
                 min_interval: float = 0.1, milestone_after: float = 5.0) -> None:
        self.stream = stream
        if tty is None:
            isatty = getattr(stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self.quiet = quiet
        self.verbose = verbose
        self.min_interval = min_interval
        self.milestone_after = milestone_after
        self._lock = threading.RLock()
        self._active: list[Phase] = []  # the bar shows the newest
        self._drawn = 0  # width of the bar on screen (0: none)
        self._last_draw = 0.0
        self._milestone: dict[int, int] = {}  # id(phase) -> index of the next milestone

    def info(self, message: str) -> None:
        if not self.quiet:
            self._line(message)

    def warn(self, message: str) -> None:
        self._line(f"warning: {message}")

    def detail(self, message: str) -> None:
        if self.verbose and not self.quiet:
            self._line(message)

    def _write(self, text: str) -> None:
        # A phase's label or a warning may quote a database or tracking URI (a failed connection, a
        # remote store's artifact path): the same redaction as every other line the CLI prints.
        text = redact_text(text, *configured_secrets())
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not fail the work
            pass

    def _line(self, text: str) -> None:
        with self._lock:
            self._erase()
            self._write(text.rstrip("\n") + "\n")
            self._draw(force=True)

    # -- the bar
    def _erase(self) -> None:
        if self._drawn:
            self._write("\r" + " " * self._drawn + "\r")
            self._drawn = 0

    def _bar_text(self, p: Phase) -> str:
        f = p.fraction
        width = 24
        bar = "" if f is None else "[" + "#" * int(f * width) + "-" * (width - int(f * width)) + "] "
        text = f"{p.name} {bar}{p.count()}"
        if f is not None:
            text += f" {f * 100:3.0f}%"
        extra = [x for x in (_mb(p.nbytes) if p.nbytes else "", p.rate(), p.eta(), f"{p.elapsed:.0f}s") if x]
        text += "  " + "  ".join(extra)
        columns = shutil.get_terminal_size((80, 24)).columns
        return text[:max(20, columns - 1)]

    def _draw(self, force: bool = False) -> None:
        if not (self.tty and self._active) or self.quiet:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        text = self._bar_text(self._active[-1])
        self._write("\r" + text + " " * max(0, self._drawn - len(text)))
        self._drawn = len(text)

    # -- phases
    def _started(self, phase: Phase) -> None:
        if self.quiet:
            return
        with self._lock:
            self._active.append(phase)
            if self.tty:
                self._erase()
                self._draw(force=True)
            else:
                self._milestone[id(phase)] = 0
                self._write(phase.start_line() + "\n")

    def _advanced(self, phase: Phase, note: str | None) -> None:
        if note is not None:
            self.detail(note)
        if self.quiet:
            return
        with self._lock:
            if self.tty:
                self._draw()
                return
            i = self._milestone.get(id(phase))
            f = phase.fraction
            if i is None or f is None or i >= len(MILESTONES) or phase.elapsed < self.milestone_after:
                return
            if f * 100 >= MILESTONES[i]:
                while i < len(MILESTONES) and f * 100 >= MILESTONES[i]:
                    i += 1
                self._milestone[id(phase)] = i
                if f < 1:
                    self._write(phase.status() + "\n")

    def _closed(self, phase: Phase) -> None:
        if self.quiet:
            return
        with self._lock:
            self._milestone.pop(id(phase), None)
            if phase not in self._active:
                return
            if self.tty:
                # the phase's last state stays on screen as its own line
                self._erase()
                self._write(self._bar_text(phase) + "\n")
                self._active.remove(phase)
                self._draw(force=True)
            else:
                self._active.remove(phase)
                self._write(phase.summary() + "\n")


def as_reporter(progress: Say | Reporter | None) -> Reporter:
    """The reporter behind a ``progress`` argument: itself, a plain callable wrapped, or for None
    the ambient one (:func:`reporting`), which is silent unless someone set it."""
    if isinstance(progress, Reporter):
        return progress
    if progress is None:
        return ambient()
    return CallbackReporter(progress)


# -- the ambient reporter: for work started through a layer that does not pass one down
_AMBIENT: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("llmops_progress", default=None)


def ambient() -> Reporter:
    return _AMBIENT.get() or NULL


@contextlib.contextmanager
def reporting(progress: Say | Reporter | None) -> Iterator[Reporter]:
    """Make ``progress`` the ambient reporter: child processes started meanwhile without an explicit
    ``progress`` (a benchmark's runner, started by code that predates reporters) relay to it."""
    rep = as_reporter(progress)
    token = _AMBIENT.set(rep)
    try:
        yield rep
    finally:
        _AMBIENT.reset(token)


# The cross-process side (a child's events, replayed in the parent) is in progress_events.
