"""Artifact rows: content-addressed records of bytes, wherever they live."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from sqlalchemy import select
from sqlalchemy.orm import Session

from llmops.core.errors import LLMOpsError
from llmops.core.hashing import sha256_path, size_of
from llmops.registry.db import add_unique
from llmops.registry.tables import Artifact


def by_sha(session: Session, sha256: str) -> Artifact | None:
    return session.scalars(select(Artifact).where(Artifact.sha256 == sha256)).first()


def upsert(session: Session, *, sha256: str, **fields: Any) -> Artifact:
    """The artifact for these bytes, created on first sight (a sha256 seen before is the same artifact).

    On PostgreSQL two writers may meet the same new bytes at once: the loser of the insert reads
    the winner's row, inside a savepoint so that its own transaction stays alive."""
    row = by_sha(session, sha256)
    if row is not None:
        return row
    row = Artifact(sha256=sha256, meta=fields.pop("meta", None) or {}, **fields)
    return add_unique(session, row, lambda: by_sha(session, sha256))  # type: ignore[return-value]


def local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and uri.startswith("/"):
        return Path(uri)
    return None


@contextmanager
def materialize(uri: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """A local path holding the artifact's bytes (downloaded when it lives behind a server)."""
    path = local_path(uri)
    if path is not None:
        if not path.exists():
            raise LLMOpsError(f"stored bytes are missing: {path}")
        yield path
        return
    import mlflow.artifacts

    tmp = tempfile.mkdtemp(prefix="llmops-verify-")
    try:
        yield Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rehash(uri: str, tracking_uri: str | None = None) -> tuple[str, int]:
    with materialize(uri, tracking_uri) as path:
        return sha256_path(path), size_of(path)
