"""Atomic output: every file or folder llmops hands out appears whole, or not at all.

An output is written under a hidden temporary name beside its destination (same
filesystem, so the final rename is atomic), and is *staged* until :meth:`Staged.commit`
renames it into place. Between the two, the caller may check it (``convert --verify``
runs the staged artifact in its runtime): a check that fails discards the staged copy
and leaves whatever was at the destination before untouched.

Commit flushes the bytes to disk (``fsync`` of every file, then of the folder holding
the new name) before and after the rename, so a power cut never leaves a destination
name pointing at a file whose blocks were not written yet. Any exception or Ctrl-C
while staged removes the temporary copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmops.core.errors import LLMOpsError

PARTIAL = ".partial"


def umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def fsync_path(path: Path) -> None:
    """Flush one file, or every file of a folder and the folders themselves, to disk."""
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and not p.is_symlink():
                _fsync_fd(p, os.O_RDONLY)
        for d in sorted({p.parent for p in path.rglob("*")} | {path}, key=lambda q: len(q.parts), reverse=True):
            _fsync_dir(d)
    else:
        _fsync_fd(path, os.O_RDONLY)


def _fsync_fd(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2


@functools.lru_cache(maxsize=1)
def _sync_file_range() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` of ``fd`` to disk now, without
    waiting (Linux ``sync_file_range``; elsewhere nothing). A streaming writer calls it as it goes,
    so the ``fsync`` at commit finds most pages on their way to disk already and waits for the tail
    only, instead of for the whole file after the last byte. Durability is still the fsync's."""
    fn = _sync_file_range()
    if fn is not None and nbytes > 0:
        fn(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse to fsync a directory
        _fsync_fd(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


class Staged:
    """A file or folder written under a temporary name, waiting to be renamed to ``dest``."""

    def __init__(self, tmp: Path, dest: Path, *, is_dir: bool, cleanup: Path | None = None) -> None:
        self.tmp = tmp
        self.dest = dest
        self.is_dir = is_dir
        self._cleanup = cleanup  # a private work folder around ``tmp``, removed at the end
        self.done = False

    def commit(self) -> Path:
        """Rename into place (replacing an earlier output of the same name) and flush to disk."""
        if self.done:
            return self.dest
        mode = (0o755 if self.is_dir else 0o644) & ~umask()
        os.chmod(self.tmp, mode)
        fsync_path(self.tmp)
        old: Path | None = None
        try:
            if self.is_dir and self.dest.exists():
                # a folder cannot be replaced by rename: move the old one aside first, and put
                # it back if the new one cannot take its place
                old = self.dest.with_name(f".{self.dest.name}.replaced-{os.getpid()}")
                os.replace(self.dest, old)
            try:
                os.replace(self.tmp, self.dest)
            except BaseException:
                if old is not None and not self.dest.exists():
                    os.replace(old, self.dest)
                    old = None
                raise
            _fsync_dir(self.dest.parent)
        except OSError as e:
            self.discard()
            raise LLMOpsError(f"cannot write {self.dest}: {e.strerror or e}") from None
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        self.done = True
        self._remove_cleanup()
        return self.dest

    def discard(self) -> None:
        """Remove the staged copy; the destination keeps what it had."""
        if self.done:
            return
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                self.tmp.unlink()
        self._remove_cleanup()
        self.done = True

    def _remove_cleanup(self) -> None:
        if self._cleanup is not None:
            shutil.rmtree(self._cleanup, ignore_errors=True)


def _make_parent(dest: Path) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LLMOpsError(f"cannot write to {dest.parent}: {e.strerror or e}") from None


@contextlib.contextmanager
def staged_file(dest: Path) -> Iterator[Staged]:
    """Yield a Staged whose ``tmp`` is an empty file beside ``dest``; removed if the block raises.

    The block writes ``tmp``; committing is the caller's choice (:func:`atomic_file` commits)."""
    _make_parent(dest)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=PARTIAL, dir=dest.parent)
        os.close(fd)
    except OSError as e:
        raise LLMOpsError(f"cannot write to {dest.parent}: {e.strerror or e}") from None
    staged = Staged(Path(tmp), dest, is_dir=False)
    try:
        yield staged
    except BaseException:
        staged.discard()
        raise


@contextlib.contextmanager
def staged_folder(dest: Path) -> Iterator[tuple[Staged, Path]]:
    """Yield (Staged, work): ``Staged.tmp`` is an empty folder to fill, ``work`` a private scratch
    folder beside it (same filesystem) for the writer's own temporary files. Both go on any error;
    ``work`` also goes at commit or discard."""
    if dest.exists() and not dest.is_dir():
        raise LLMOpsError(f"{dest} exists and is a file; this output is a folder")
    _make_parent(dest)
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=PARTIAL, dir=dest.parent))
    except OSError as e:
        raise LLMOpsError(f"cannot write to {dest.parent}: {e.strerror or e}") from None
    out = work / "out"
    out.mkdir()
    staged = Staged(out, dest, is_dir=True, cleanup=work)
    try:
        yield staged, work
    except BaseException:
        staged.discard()
        raise


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path; it becomes ``dest`` when the block ends without an error."""
    with staged_file(dest) as staged:
        yield staged.tmp
    staged.commit()


def write_bytes_atomic(dest: Path, data: bytes) -> None:
    with atomic_file(dest) as tmp:
        tmp.write_bytes(data)
