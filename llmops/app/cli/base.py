"""The ``llmops`` command group, its global options and the helpers every command uses.

Only click is imported at start-up; every command imports what it needs
(torch, transformers, mlflow) inside its body, so ``llmops --help`` is instant.
Errors become one line on stderr (and ``{"error": ...}`` on stdout with
--json) and a non-zero exit. How progress shows on stderr (a redrawn bar on a terminal, a few
lines elsewhere, nothing but warnings under --json, the per-item table with -v) is decided here,
once, by :meth:`State.reporter`, and handed down to the library.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from llmops import __version__
from llmops.app.output import emit

if TYPE_CHECKING:
    from llmops.core.progress import Reporter

NOT_YET = "is not available in this version of llmops"


class State:
    def __init__(self) -> None:
        self.json = False
        self.verbose = False
        self.store_dir: str | None = None

    def reporter(self) -> Reporter:
        """Progress for this command on stderr: a bar redrawn in place when stderr is a terminal,
        a start, a few milestone and an end line per phase when it is not (CI, a pipe), only
        warnings under --json (stdout holds the document, stderr stays almost empty); per-item
        lines (the per-tensor table) too with -v, unless --json, where the table is in the document."""
        from llmops.core.progress import StreamReporter

        return StreamReporter(sys.stderr, quiet=self.json, verbose=self.verbose)

    def store(self):  # noqa: ANN201 - llmops.registry.store.Store, imported lazily
        from llmops.core.settings import resolve
        from llmops.registry.store import Store

        return Store(resolve(self.store_dir))


def _state() -> State:
    ctx = click.get_current_context()
    obj = ctx.find_object(State)
    if obj is None:
        obj = ctx.ensure_object(State)
    return obj


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(State).json = True


def _set_verbose(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(State).verbose = True


def verbose_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """-v/--verbose: the per-item lines of long phases (a conversion's per-tensor table)."""
    return click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_set_verbose,
                        help="Print a line per item of long phases (the per-tensor table of a conversion).")(f)


def _set_store(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(State).store_dir = value


def common(f: Callable[..., Any]) -> Callable[..., Any]:
    """--json and --store after the command too (`llmops models show REF --json`)."""
    f = click.option("--json", "json_", is_flag=True, expose_value=False, is_eager=True, callback=_set_json,
                     help="Print one JSON document on stdout.")(f)
    f = click.option("--store", type=click.Path(file_okay=False), expose_value=False, callback=_set_store,
                     help="Store folder (default $LLMOPS_STORE or ./.llmops).")(f)
    return f


def out(data: Any, render: Callable[[Any], str] | None = None) -> None:
    emit(_state().json, data, render)


class DefaultGroup(click.Group):
    """A group whose first argument may be an argument of its default command
    (``llmops bench ARTIFACT...`` beside ``llmops bench compare REF...``)."""

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "ARTIFACT... [OPTIONS] | compare REF... [OPTIONS]")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--json", "json_", is_flag=True, expose_value=False, is_eager=True, callback=_set_json,
              help="Print one JSON document on stdout (logs stay on stderr).")
@click.option("--store", type=click.Path(file_okay=False), expose_value=False, callback=_set_store,
              help="Store folder (default $LLMOPS_STORE or ./.llmops).")
@click.version_option(__version__, prog_name="llmops")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Convert checkpoints to GGUF, GPTQ and ONNX, benchmark them, and version them in an MLflow registry
    with lineage in SQL."""
    ctx.ensure_object(State)
