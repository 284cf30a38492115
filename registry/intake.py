"""A version's bytes on their way into the store, hashed as they go.

Registration (``registration.py``) records the sha256 of the bytes stored, never of bytes read
at another moment: on a local store they are copied into the run's artifact folder while they
are hashed (``EarlyCopy``, started before MLflow is even imported), behind a tracking server
they are hashed while they are read for the upload (``upload``). A symbolic link is read
through (``core.walk``): the store holds real files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llmops.core import owners
from llmops.core.errors import LLMOpsError, UsageError
from llmops.core.hashing import copy_path_hashing, sha256_path
from llmops.registry import artifacts
from llmops.registry import upload as _upload
from llmops.registry.store import Store
from llmops.registry.tables import Artifact
from llmops.registry.versions import ARTIFACT_PATH


INCOMING = ".incoming-"


class EarlyCopy:
    """A copy of the bytes into the store's artifact folder, hashed on the way, on a thread of its
    own: started before MLflow is imported and the run exists, moved into the run's folder by a
    rename once it does (same filesystem; a copy across filesystems otherwise). Its staging
    folder is held by this process (``core.owners``): ``llmops gc`` removes one whose process is
    gone, never one still being filled."""

    def __init__(self, src: Path, root: Path, link: bool = False) -> None:
        import threading

        root.mkdir(parents=True, exist_ok=True)
        self.dir, self._held = owners.create_held_folder(root, INCOMING, mode=0o700)
        self.path = self.dir / src.name
        self._src = src
        self._link = link
        self._sha: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="llmops-register-copy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._sha = copy_path_hashing(self._src, self.path, link=self._link)
        except BaseException as exc:  # noqa: BLE001 - re-raised by result()
            self._error = exc

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._sha is not None
        return self._sha

    def move_to(self, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.path), str(dest))
        self.discard()

    def discard(self) -> None:
        """Remove the staging folder; a copy still running writes on into unlinked files and ends."""
        shutil.rmtree(self.dir, ignore_errors=True)
        owners.release(self._held)
        self._held = None


def identify_and_copy(store: Store, src: Path, sha256: str | None, artifact_uri: str,
                       early: EarlyCopy | None = None, link: bool = False) -> tuple[str, Artifact | None, bool]:
    """(sha256, the stored artifact with these bytes or None, whether they are now in this run's
    artifacts).

    A multi-GB artifact must be read once, not hashed and then copied: where the run's artifact
    folder is local (the store's own folder), the bytes are copied into it while they are hashed
    (``core.hashing.copy_path_hashing``; a reflink where the filesystem has them) and MLflow's
    copy is skipped. Behind a tracking server they are hashed while they are read for the upload
    (``upload.upload_hashing``). Either way the sha256 recorded is that of the bytes stored. Bytes
    already stored (same sha256) are one copy: a copy made before the hash was known is removed
    again; behind a server the file is hashed first when no hash is given, so that bytes stored
    already are not uploaded again. A hash given by the caller (the converter's), or that first
    hash, is checked against the bytes stored, so a file changed since it was hashed is refused
    rather than registered under the wrong identity."""
    local = artifacts.local_path(artifact_uri)
    if early is not None and local is None:  # not a local run folder after all: MLflow uploads
        early.discard()
        early = None

    def stored_with(sha: str) -> Artifact | None:
        with store.session() as s:
            existing = artifacts.by_sha(s, sha)
            return existing if existing is not None and existing.meta.get("stored") else None

    if local is None:
        claimed = sha256 or sha256_path(src)
        if (stored := stored_with(claimed)) is not None:
            return claimed, stored, False
        got = _upload.upload_hashing(artifact_uri, store.settings.tracking_uri, src, ARTIFACT_PATH)
        _unchanged(src, got, claimed)
        return got, None, True
    if sha256 is not None and (stored := stored_with(sha256)) is not None:
        if early is not None:
            early.discard()
        return sha256, stored, False
    dest = local / ARTIFACT_PATH if src.is_dir() else local / ARTIFACT_PATH / src.name
    if early is not None:
        got = early.result()
        early.move_to(dest)
    else:
        got = copy_path_hashing(src, dest, link=link)
    if sha256 is not None:
        _unchanged(src, got, sha256)
    elif (stored := stored_with(got)) is not None:
        shutil.rmtree(local / ARTIFACT_PATH, ignore_errors=True)
        return got, stored, False
    return got, None, True


def _unchanged(src: Path, got: str, recorded: str) -> None:
    if got != recorded:
        raise LLMOpsError(f"{src}: its bytes changed after they were hashed (now sha256 {got[:12]}…, "
                          f"recorded {recorded[:12]}…); nothing registered")


def source_path(path: str | Path) -> Path:
    """The absolute path to register. A symbolic link named as the source keeps its own name (a
    Hugging Face blob is named by its hash, the link by the file it is) and is read through."""
    p = Path(path).expanduser().absolute()
    src = p.parent.resolve() / p.name if p.is_symlink() else p.resolve()
    if not src.exists():
        if src.is_symlink():
            raise UsageError(f"{path}: symbolic link to {os.readlink(src)} cannot be followed "
                             "(its target does not exist, or a loop of links)")
        raise UsageError(f"{path}: no such file or folder")
    return src
