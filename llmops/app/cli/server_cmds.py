"""``llmops ui``, ``llmops db`` and ``llmops fixtures``."""

from __future__ import annotations


import click

from llmops.app.cli.base import _state, cli, common, out
from llmops.app.output import log
from llmops.core.errors import UsageError


# -- ui / db / fixtures -------------------------------------------------------------------
@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless you say otherwise).")
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--serve-artifacts", is_flag=True, help="Be the shared tracking server: clients upload and download "
              "artifacts through it (use with a PostgreSQL LLMOPS_DATABASE_URL). It has no authentication: on a "
              "non-loopback --host anyone who reaches the port can read and write the store.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Server worker processes.")
@common
def ui(host: str, port: int, serve_artifacts: bool, workers: int) -> None:
    """Serve the MLflow UI on this store (or, with --serve-artifacts, a shared tracking server).

    The database URI reaches the server through its environment, never its command line."""
    from llmops.app.server import serve

    state = _state()
    raise SystemExit(serve(state.store(), host=host, port=port, json_mode=state.json,
                           serve_artifacts=serve_artifacts, workers=workers))


@cli.group("db")
def db_group() -> None:
    """The llmops tables' migrations."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@common
def db_upgrade(revision: str) -> None:
    """Create or migrate the store's tables (MLflow's and llmops')."""
    from llmops.registry import db

    store = _state().store()
    store.open()
    rev = db.upgrade(store.engine, revision)
    out({**store.describe(), "revision": rev, "head": db.head_revision()}, lambda d: f"llmops tables at revision {d['revision']}")


@db_group.command("current")
@common
def db_current() -> None:
    """Print the llmops tables' revision."""
    from llmops.registry import db

    store = _state().store()
    store.open()
    rev = db.current_revision(store.engine)
    out({**store.describe(), "revision": rev, "head": db.head_revision()},
        lambda d: f"{d['revision']}{' (head)' if d['revision'] == d['head'] else ''}")


@cli.group()
def fixtures() -> None:
    """Build the models the tests and the demo use."""


@fixtures.command("smollm2")
@click.argument("dest", required=False, type=click.Path(file_okay=False))
@common
def fixtures_smollm2(dest: str | None) -> None:
    """SmolLM2-135M-Instruct as an fp32 Hugging Face checkpoint (cached)."""
    from llmops.app.fixtures import smollm2_checkpoint

    path = smollm2_checkpoint(dest, progress=log)
    out({"path": str(path)}, lambda d: d["path"])


@fixtures.command("tiny")
@click.argument("arch")
@click.argument("dest", type=click.Path(file_okay=False))
@common
def fixtures_tiny(arch: str, dest: str) -> None:
    """A tiny random-weight model (llama, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe, gemma2, phi3, gpt2)."""
    from llmops.app.tiny_models import ARCHITECTURES, tiny_model

    if arch not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    out({"path": str(tiny_model(arch, dest))}, lambda d: d["path"])
