"""Uploading a version's bytes through a tracking server, hashed as they are read for the upload.

Behind a tracking server the bytes leave this machine through MLflow's artifact repository,
and their recorded identity must be that of the bytes sent: a hash taken before (the
converter's, or a pass of our own) names other bytes if the file changed in between. So each
file is read once, and every block read goes both to the hash and into the request. A server
that serves artifacts (``mlflow-artifacts:``, one HTTP PUT per file, as MLflow's own client
sends it) gets each file streamed so; any other artifact store gets a private copy, made while
hashing (``core.hashing.copy_file_hashing``) where nothing else writes, and uploaded by
MLflow's client. Folders go file by file as ``core.walk`` lists them (symbolic links followed),
so the folder's hash is the manifest of what was sent.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import posixpath
from pathlib import Path
from typing import Any, BinaryIO

from llmops.core.errors import LLMOpsError
from llmops.core.hashing import CHUNK, copy_file_hashing, manifest_sha256
from llmops.core.settings import scratch
from llmops.core.walk import files_of


class _HashingBody:
    """A file as a request body of a fixed length: every block read is hashed on the way. A
    retried request rewinds it (``seek(0)``), which starts the hash again."""

    def __init__(self, f: BinaryIO, size: int, name: str) -> None:
        self._f, self._size, self._name = f, size, name
        self.h = hashlib.sha256()
        self.sent = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Any:
        while block := self.read(CHUNK):
            yield block

    def read(self, n: int = -1) -> bytes:
        want = self._size - self.sent if n is None or n < 0 else min(n, self._size - self.sent)
        block = self._f.read(want) if want > 0 else b""
        if want > 0 and not block:
            raise LLMOpsError(f"{self._name} became shorter while it was being uploaded; nothing registered")
        self.h.update(block)
        self.sent += len(block)
        return block

    def tell(self) -> int:
        return self.sent

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if (offset, whence) == (0, os.SEEK_SET):
            self._f.seek(0)
            self.h, self.sent = hashlib.sha256(), 0
        elif (offset, whence) != (self.sent, os.SEEK_SET):
            raise OSError(f"{self._name}: an upload body is read from its start only")
        return self.sent


def _put(repo: Any, path: Path, artifact_dir: str, name: str) -> tuple[str, int]:
    """Upload one file to an HTTP artifact repository: (sha256 of the bytes sent, their count)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

    endpoint = posixpath.join("/", artifact_dir, name)
    headers = {"Content-Type": mimetypes.guess_type(name)[0] or "application/octet-stream"}
    with open(path, "rb") as f:
        body = _HashingBody(f, os.fstat(f.fileno()).st_size, str(path))
        resp = http_request(get_default_host_creds(repo.artifact_uri), endpoint, "PUT", data=body,
                            extra_headers=headers)
        augmented_raise_for_status(resp)
        if body.sent != len(body):
            raise LLMOpsError(f"{path}: the upload ended after {body.sent} of {len(body)} bytes; nothing registered")
        return body.h.hexdigest(), body.sent


def _copy_and_log(repo: Any, path: Path, artifact_dir: str, name: str) -> tuple[str, int]:
    """Upload one file to any other artifact repository, through a private copy that was hashed
    as it was written."""
    with scratch("llmops-upload-") as tmp:
        copy = tmp / name
        digest = copy_file_hashing(path, copy, fsync=False)
        repo.log_artifact(str(copy), artifact_dir)
        return digest, copy.stat().st_size


def upload_hashing(artifact_uri: str, tracking_uri: str | None, src: Path, artifact_path: str) -> str:
    """Upload ``src`` (a file or folder) under ``artifact_path`` of ``artifact_uri``; return
    ``core.hashing.sha256_path`` of the bytes sent."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

    repo = get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
    send = _put if isinstance(repo, HttpArtifactRepository) else _copy_and_log
    if not src.is_dir():
        return send(repo, src, artifact_path, src.name)[0]
    entries = []
    for e in files_of(src):
        folder, name = posixpath.split(e.rel)
        digest, size = send(repo, e.path, posixpath.join(artifact_path, folder) if folder else artifact_path, name)
        entries.append({"path": e.rel, "size": size, "sha256": digest})
    return manifest_sha256(entries)


def delete_uploaded(artifact_uri: str, tracking_uri: str | None, artifact_path: str) -> None:
    """Remove what a failed registration uploaded (where the artifact store allows deletes)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    get_artifact_repository(artifact_uri, tracking_uri=tracking_uri).delete_artifacts(artifact_path)
