"""The store: llmops' tables and MLflow's registry behind one object.

Opening a store creates what is missing (the folder, MLflow's tables, ours)
under a file lock, so two processes opening a fresh store at once do not race
each other's migrations.
"""

from __future__ import annotations

import fcntl
import getpass
import logging
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from llmops.core.settings import (EXPERIMENT, Settings, configured_secrets, redact, redact_text, resolve,
                                  unencoded_at)
from llmops.core.errors import LLMOpsError
from llmops.registry import db

if TYPE_CHECKING:
    from mlflow import MlflowClient


# The secrets of every store this process opened, masked in MLflow's log records.
_LOG_SECRETS: set[str] = set()


class _Redacting(logging.Filter):
    """Passes every record, its message (with its traceback, if any) through :func:`redact_text`."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        record.msg, record.args = redact_text(text, *_LOG_SECRETS, *configured_secrets()), ()
        record.exc_info = record.exc_text = None
        return True


def actor() -> str:
    """Who did it: the CI's user where one is set, else the local login."""
    for var in ("GITHUB_ACTOR", "GITLAB_USER_LOGIN", "BUILDKITE_BUILD_CREATOR", "USER", "USERNAME"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


class Store:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or resolve()
        self._opened = False
        # Where a new experiment keeps its artifacts; None: the store's own folder when MLflow
        # talks to the database directly, the server's default behind a tracking server.
        self.artifact_location: str | None = None

    # -- opening ---------------------------------------------------------
    @contextmanager
    def _init_lock(self) -> Iterator[None]:
        self.settings.store_dir.mkdir(parents=True, exist_ok=True)
        with open(self.settings.store_dir / ".init.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def open(self) -> Store:
        if self._opened:
            return self
        if unencoded_at(self.settings.db_url):
            # SQLAlchemy ends the password at its first '@' and takes the rest for the host name,
            # which the driver's error then quotes: refuse before connecting.
            raise LLMOpsError(f"cannot open store {redact(self.settings.db_url)}: its password holds an '@'; "
                              "write it percent-encoded, as %40")
        try:
            with self._init_lock():
                # First our own connection: on SQLite it sets WAL and the busy timeout (WAL persists
                # in the file, so MLflow's connections get it too); elsewhere it fails at once on a
                # wrong URL, where MLflow's engine would retry for a minute and a half.
                with self.engine.connect():
                    pass
                self._ensure_mlflow()
                db.upgrade(self.engine)
        except LLMOpsError:
            raise
        except Exception as exc:  # noqa: BLE001 - one line for the user, whatever the driver raised
            # The driver's message may quote the URI or its password; the cause is not chained, so
            # that a logged traceback does not show it either.
            detail = redact_text(f"{type(exc).__name__}: {exc}", *self.settings.secrets())
            raise LLMOpsError(f"cannot open store {redact(self.settings.db_url)}: {detail}") from None
        self._opened = True
        return self

    def _ensure_mlflow(self) -> None:
        """Let MLflow create or check its own tables, then our experiment."""
        self.experiment_id  # noqa: B018 - creating the client and experiment is the point

    @cached_property
    def engine(self) -> Engine:
        return db.engine_for(self.settings.db_url)

    @cached_property
    def mlflow(self) -> MlflowClient:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # Behind a tracking server MLflow prints run links on stdout, which --json reserves.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        from mlflow import MlflowClient

        mlflow_logger = logging.getLogger("mlflow")
        mlflow_logger.setLevel(logging.WARNING)
        # Its warnings quote driver errors (a failed connection is retried ten times, each logged).
        _LOG_SECRETS.update(self.settings.secrets())
        for handler in mlflow_logger.handlers:
            if not any(isinstance(f, _Redacting) for f in handler.filters):
                handler.addFilter(_Redacting())
        return MlflowClient(tracking_uri=self.settings.tracking_uri, registry_uri=self.settings.registry_uri)

    @cached_property
    def experiment_id(self) -> str:
        exp = self.mlflow.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        location = self.artifact_location
        if location is None and self.settings.tracking_is_local_db:
            self.settings.artifact_root.mkdir(parents=True, exist_ok=True)
            location = self.settings.artifact_root.as_uri()
        try:
            return self.mlflow.create_experiment(EXPERIMENT, artifact_location=location)
        except Exception:  # noqa: BLE001 - another process created it first
            exp = self.mlflow.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                raise
            return exp.experiment_id

    @contextmanager
    def session(self) -> Iterator[Session]:
        self.open()
        with db.session_scope(self.engine) as s:
            yield s

    def describe(self) -> dict[str, Any]:
        return {
            "store": str(self.settings.store_dir),
            "database": redact(self.settings.db_url),
            "tracking_uri": redact(self.settings.tracking_uri),
        }
