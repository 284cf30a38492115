"""The ``llmops`` command line: thin commands over the library.

Only click is imported at start-up; every command imports what it needs
(torch, transformers, mlflow) inside its body, so ``llmops --help`` is instant.
Errors become one line on stderr (and ``{"error": ...}`` on stdout with
--json) and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

import click

from llmops.app.cli import convert_cmds, fleet_cmds, maint_cmds, registry_cmds, serve_cmds, server_cmds  # noqa: F401 - they register commands
from llmops.app.cli.base import cli
from llmops.app.output import emit, log, redacted
from llmops.core.errors import LLMOpsError
from llmops.core.quiet import silence_import_noise

__all__ = ["Terminated", "cli", "main", "run"]


# -- entry point ----------------------------------------------------------------------------
class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager's or CI's stop, ``kill``), raised where the command is, so that
    it unwinds exactly as Ctrl-C does: staged outputs discarded, children killed, scratch folders
    removed. A KeyboardInterrupt, so every cleanup that handles Ctrl-C handles it too."""


# Commands with their own shutdown on SIGTERM: they stop their server (uvicorn's graceful drain,
# MLflow's process group) and end with status 0.
OWN_SHUTDOWN = ("serve", "ui")
TERMINATED_EXIT = 128 + signal.SIGTERM


def _command_name(args: list[str]) -> str | None:
    """The command ``args`` name, after the group's own options (``--store DIR``, ``--json``)."""
    with_value = {o for p in cli.params if isinstance(p, click.Option) and not p.is_flag for o in p.opts}
    it = iter(args)
    for arg in it:
        if arg == "--":
            return next(it, None)
        if arg in with_value:
            next(it, None)
        elif not arg.startswith("-"):
            return arg
    return None


@contextlib.contextmanager
def _sigterm_unwinds(args: list[str]) -> Iterator[None]:
    """While the command runs, SIGTERM raises :class:`Terminated` (once: a second one while the
    first unwinds is ignored, so the cleanup is not cut short). Signal handlers belong to the main
    thread; elsewhere, and for :data:`OWN_SHUTDOWN`, nothing changes."""
    if _command_name(args) in OWN_SHUTDOWN or threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = _TERMINATED

    def terminate(signum: int, _frame: object) -> None:
        if not fired:
            fired.append(signum)
            raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(message: str, code: int, json_mode: bool) -> int:
    message = " ".join(redacted(message).split())
    if json_mode:
        emit(True, {"error": message})
    log(f"error: {message}")
    return code


# SIGTERM seen while the command ran: a library that catches the KeyboardInterrupt it raised and
# raises its own (Ray's wait does) still ends the command as terminated
_TERMINATED: list[int] = []


def _interrupted(exc: BaseException, json_mode: bool) -> int:
    if isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated) or _TERMINATED:  # click wraps it in Abort
        return _fail("terminated", TERMINATED_EXIT, json_mode)
    return _fail("interrupted", 130, json_mode)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    silence_import_noise()
    json_mode = "--json" in args
    _TERMINATED.clear()
    try:
        with _sigterm_unwinds(args):
            cli.main(args=args, prog_name="llmops", standalone_mode=False)
        return 0
    except LLMOpsError as exc:
        return _fail(str(exc), exc.exit_code, json_mode and not exc.reported)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code, json_mode)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        return _interrupted(exc, json_mode)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one line, not a traceback
        if os.environ.get("LLMOPS_DEBUG"):
            # the traceback, through the same redaction as every line: a frame's message may quote a URI
            import traceback

            log(traceback.format_exc())
        return _fail(f"{type(exc).__name__}: {exc} (set LLMOPS_DEBUG=1 for a traceback)", 1, json_mode)


def run() -> None:
    """The ``llmops`` console script: :func:`main`, then a quick exit.

    By the time a command returns, everything it wrote is closed and durable (outputs committed
    by rename and fsync, registry rows by their transactions). What a normal interpreter exit
    adds is tearing down every module imported: with MLflow, SQLAlchemy and matplotlib loaded,
    0.3 to 0.7 s, longer than some whole commands. So the exit does what shutdown does that
    matters (non-daemon threads joined, exit handlers run, streams flushed) and then ends the
    process without the teardown.

    The cyclic garbage collector runs a tenth as often: a command builds a few hundred thousand
    small objects that hold no cycles (JSON of a tokenizer, its vocabulary, a registry query),
    and at the default thresholds a conversion spent 30-50 ms of its first second on 150
    collections that found nothing to free.

    numpy's OpenBLAS starts a thread per core when numpy is imported, and by default each spins
    for a while before it sleeps: ~0.13 s of a core's time at the start of every command that
    imports numpy (8 % of an F16 conversion's CPU, taken from the tokenizer child beside it),
    though no command does BLAS work then. A short spin timeout (log2 of cycles, OpenBLAS's
    smallest) keeps BLAS threaded for whoever calls it later and only lets idle threads sleep at
    once; a value the user set wins. Children inherit it, to the same effect."""
    import gc

    gc.set_threshold(7000, 10, 10)
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    _exit_now(main())


def _exit_now(code: int) -> None:
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None:  # an interpreter without it: the ordinary exit
        sys.exit(code)
    shutdown()  # joins non-daemon threads (idle pool workers included), as interpreter exit does first
    atexit._run_exitfuncs()  # logging.shutdown and the libraries' hooks
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to say
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
