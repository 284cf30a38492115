"""Where the store lives: one place that turns flags and environment into URIs.

The default store is a folder (``./.llmops``) holding one SQLite file with both
MLflow's tables and ours, plus an artifact folder. ``LLMOPS_DATABASE_URL``
points both at another database (PostgreSQL); ``MLFLOW_TRACKING_URI`` points
MLflow at a server while our tables stay in the store's database.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STORE = ".llmops"
DB_FILE = "llmops.db"
ARTIFACT_DIR = "artifacts"
EXPERIMENT = "llmops"


@dataclass(frozen=True)
class Settings:
    store_dir: Path
    db_url: str
    tracking_uri: str
    registry_uri: str

    @property
    def artifact_root(self) -> Path:
        return self.store_dir / ARTIFACT_DIR

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")

    @property
    def tracking_is_local_db(self) -> bool:
        """MLflow talks to our database directly (no server in between)."""
        return self.tracking_uri == self.db_url


def resolve(store: str | os.PathLike[str] | None = None) -> Settings:
    store_dir = Path(store or os.environ.get("LLMOPS_STORE") or DEFAULT_STORE).expanduser().resolve()
    db_url = os.environ.get("LLMOPS_DATABASE_URL") or f"sqlite:///{store_dir / DB_FILE}"
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or db_url
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or tracking
    return Settings(store_dir=store_dir, db_url=db_url, tracking_uri=tracking, registry_uri=registry)


_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+)(:(?P<pw>[^@/\s]*))?@")


def redact(uri: str) -> str:
    """Hide credentials in a URI before it reaches a log or --json output."""
    return _CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", uri)
