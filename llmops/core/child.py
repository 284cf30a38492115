"""The child-process protocol: native work runs in a fresh interpreter, and any way it ends
becomes one line.

llama.cpp, torch, onnxruntime and GPTQModel load native code that can crash, run out of
memory or end the interpreter themselves (GPTQModel calls ``os._exit`` when a worker
thread fails). Running them in a child means a segfault or an OOM kill is a one-line
:class:`LLMOpsError` in the parent instead of a dead CLI.

The protocol, the same for every job:

* the parent writes the job as JSON into a work folder and starts
  ``python -c "...child_entry..." module:function JOB``; bulk data goes through files
  the job names, never through the pipe;
* the child calls ``function(job, say)`` and writes its reply (a JSON object) atomically
  beside the job; an exception becomes ``{"ok": false, "error": "<one line>"}``;
* progress: a line the child writes to stderr through ``say`` starts with :data:`MARK`
  and reaches the parent's ``progress`` callback; ``say`` is a reporter
  (``llmops.core.progress``), so the child's phases, warnings and notes cross too, encoded
  in MARK lines, and drive the parent's bar; other stderr lines are kept (the last ones
  explain a crash) and, with ``log_file``, logged;
* a child that sent no reply is described by how it ended: a signal, or its exit code
  with its last error line;
* Ctrl-C (or any exception) in the parent kills the child before propagating.

A fresh interpreter (subprocess, not multiprocessing) so that it works whatever the
caller's ``__main__`` is.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmops.core.errors import LLMOpsError
from llmops.core.progress import Reporter, as_reporter
from llmops.core.progress_events import EventReader, EventWriter

MARK = "\x1ellmops\x1e "  # starts a progress line on a child's stderr
Progress = Callable[[str], None]
_write_lock = threading.Lock()

_ENTRY = ("import sys; from llmops.core.child import child_entry; "
          "sys.exit(child_entry(sys.argv[1], sys.argv[2]))")


def say(message: str) -> None:
    """In a child: a progress line for the parent. Never raises (it may run on a library's
    worker thread, where an exception could end the interpreter)."""
    _mark_line(" ".join(str(message).split()))


def _mark_line(line: str) -> None:
    """One MARK line on stderr, as it is (an encoded event is one line already)."""
    try:
        with _write_lock:
            sys.stderr.write(MARK + line + "\n")
            sys.stderr.flush()
    except Exception:  # noqa: BLE001 - see say
        pass


def child_reporter() -> Reporter:
    """In a child: the reporter whose messages and phases reach the parent's ``progress``."""
    return EventWriter(_mark_line)


def one_line(e: BaseException) -> str:
    if isinstance(e, LLMOpsError):
        return str(e)
    if isinstance(e, MemoryError):
        return "out of memory"
    return traceback.format_exception_only(type(e), e)[-1].strip()


def child_entry(target: str, job_file: str) -> int:
    """The child's main: run ``target`` on the job, write the reply, end without waiting for
    non-daemon threads a library may have left behind."""
    import importlib

    from llmops.core.quiet import silence_import_noise

    silence_import_noise()
    job = json.loads(Path(job_file).read_text())
    try:
        module, _, func = target.partition(":")
        reply = getattr(importlib.import_module(module), func)(job, child_reporter())
        reply = {"ok": True, **(reply or {})}
    except BaseException as e:  # noqa: BLE001 - reported to the parent as one line
        if not isinstance(e, LLMOpsError | MemoryError):
            traceback.print_exc(file=sys.stderr)
        reply = {"ok": False, "error": one_line(e)}
    from llmops.core.procfs import peak_rss

    reply["peak_rss_bytes"] = peak_rss()
    tmp = Path(job["reply"] + ".tmp")
    tmp.write_text(json.dumps(reply))
    os.replace(tmp, job["reply"])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_child(target: str, job: dict[str, Any], what: str, workdir: str | Path, *,
              progress: Progress | None = None, log_file: str | Path | None = None,
              timeout: float | None = None, prefix_errors: bool = True) -> dict[str, Any]:
    """Run ``target`` ("module:function") on ``job`` in a child interpreter; its reply.

    Raises LLMOpsError("<what> failed: <error>") when the child reports an error (just the
    error with ``prefix_errors=False``), and LLMOpsError("<what> crashed (SIGSEGV)") and the
    like when it sent no reply. ``progress`` (a callable or a reporter; None: the ambient
    reporter) gets the child's messages and phases; phases the child leaves open end with it."""
    wd = Path(workdir)
    tag = f"{os.getpid()}-{id(job)}"
    job = {**job, "reply": str(wd / f"reply-{tag}.json")}
    job_file = wd / f"job-{tag}.json"
    job_file.write_text(json.dumps(job))
    events = EventReader(as_reporter(progress))
    tail: collections.deque[str] = collections.deque(maxlen=40)
    log = open(log_file, "ab") if log_file else None  # noqa: SIM115 - closed below
    timer: threading.Timer | None = None
    timed_out = False
    try:
        proc = subprocess.Popen([sys.executable, "-c", _ENTRY, target, str(job_file)], cwd=wd,
                                stdin=subprocess.DEVNULL, stdout=log or subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if timeout is not None:
            def expire() -> None:
                nonlocal timed_out
                timed_out = True
                proc.kill()

            timer = threading.Timer(timeout, expire)
            timer.daemon = True
            timer.start()
        try:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith(MARK):
                    events.feed(line[len(MARK):])
                    continue
                if log is not None:
                    log.write(raw)
                if line.strip():
                    tail.append(line.split("\r")[-1].strip())
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if proc.stderr is not None:
                proc.stderr.close()
    finally:
        events.close()
        if timer is not None:
            timer.cancel()
        if log is not None:
            log.close()
        job_file.unlink(missing_ok=True)
    if timed_out:
        raise LLMOpsError(f"{what} timed out after {timeout:.0f}s")
    reply_file = Path(job["reply"])
    if reply_file.is_file():
        reply = json.loads(reply_file.read_text())
        reply_file.unlink(missing_ok=True)
        if not reply.get("ok"):
            err = reply.get("error") or "failed"
            raise LLMOpsError(f"{what} failed: {err}" if prefix_errors else str(err))
        return reply
    raise LLMOpsError(f"{what} {exit_reason(rc, list(tail))}")


def exit_reason(rc: int, stderr_lines: list[str]) -> str:
    """How a child that sent no reply ended, in words: a signal (a native crash, or SIGKILL,
    which on Linux is usually the OOM killer) or an exit code with its last error line."""
    if rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
        return "was killed (out of memory?)" if -rc == signal.SIGKILL else f"crashed ({sig})"
    last = next((t.strip() for t in reversed(stderr_lines)
                 if t.strip() and not t.lstrip().startswith(("File ", "^", "~"))), "")
    return f"exited with code {rc}" + (f": {last[:200]}" if last else "")
