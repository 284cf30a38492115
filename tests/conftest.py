"""Shared test fixtures: stores on SQLite and PostgreSQL, tiny models, the CLI in-process."""

from __future__ import annotations

import os
from contextlib import contextmanager
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import pgtest

SHARED_WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


@dataclass
class StoreEnv:
    backend: str
    store_dir: Path
    db_url: str

    def store(self):  # noqa: ANN201
        from llmops.core.settings import resolve
        from llmops.registry.store import Store

        return Store(resolve(self.store_dir))


def _forget_engines() -> None:
    """Dispose our pooled engines so a dropped database keeps no connection of ours."""
    from llmops.registry import db

    db.dispose_all()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_env(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StoreEnv]:
    """An empty store, on SQLite (a file in the store folder) or on a fresh PostgreSQL database."""
    store_dir = tmp_path / "store"
    monkeypatch.setenv("LLMOPS_STORE", str(store_dir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    if request.param == "sqlite":
        monkeypatch.delenv("LLMOPS_DATABASE_URL", raising=False)
        yield StoreEnv("sqlite", store_dir, f"sqlite:///{store_dir / 'llmops.db'}")
        _forget_engines()
        return
    with fresh_pg_database() as url:
        monkeypatch.setenv("LLMOPS_DATABASE_URL", url)
        try:
            yield StoreEnv("postgres", store_dir, url)
        finally:
            _forget_engines()


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test (dropped afterwards, even with clients
    still connected); skips without a server, fails under CI=true."""
    problem = pgtest.unreachable()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {pgtest.PG_ADMIN_URL}: {problem}")
        pytest.skip(f"PostgreSQL not reachable: {problem}")
    with pgtest.database() as name:
        yield pgtest.url_of(name)


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self):  # noqa: ANN201
        import json

        return json.loads(self.out)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run ``llmops ARGS`` in this process (mlflow imported once for the whole session)."""
    from llmops.app.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Tiny random models, built once per session per architecture."""
    from llmops.app.tiny_models import tiny_model

    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = tiny_model(arch, root / arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def eval_text_path() -> Path:
    env = os.environ.get("LLMOPS_EVAL_TEXT")
    if env and Path(env).is_file():
        return Path(env)
    if SHARED_WIKITEXT.is_file():
        return SHARED_WIKITEXT
    if os.environ.get("CI"):  # CI always has the shared copy: its absence is a broken setup, not a skip
        pytest.fail("no eval text under CI=true: set LLMOPS_EVAL_TEXT")
    pytest.skip("no eval text: set LLMOPS_EVAL_TEXT")


@pytest.fixture(scope="session")
def eval_text(eval_text_path: Path) -> str:
    """The eval text itself (normalised as llmops reads it)."""
    from llmops.core.evaltext import load_eval_text

    return load_eval_text(eval_text_path).text


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real test model, SmolLM2-135M-Instruct as an fp32 Hugging Face checkpoint (cached)."""
    from llmops.app.fixtures import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def reference_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, unpacked from the llama-cpp-python sdist into a cache folder."""
    import subprocess
    import tarfile

    from llmops.app.reference import reference_converter_script

    try:
        return reference_converter_script()
    except (OSError, subprocess.CalledProcessError, tarfile.TarError) as e:
        if os.environ.get("CI"):
            pytest.fail(f"cannot fetch the llama-cpp-python sdist: {e}")
        pytest.skip(f"cannot fetch the llama-cpp-python sdist: {e}")
