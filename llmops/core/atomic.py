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

A process killed outright (SIGKILL, a power cut) cleans nothing up. So a staged copy is held by
its process for as long as it is staged (``core.owners``): :func:`leftovers` finds the staged
copies whose process is gone, and a folder moved aside by a commit that never finished, and
:func:`clean_leftover` removes them (or puts the moved-aside folder back where it was).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.core import owners
from llmops.core.errors import LLMOpsError
from llmops.core.walk import files_of

PARTIAL = ".partial"
REPLACED = ".replaced-"


def new_file(folder: Path, prefix: str, suffix: str = "", mode: int = 0o666) -> tuple[int, Path]:
    """Like ``tempfile.mkstemp`` (a new file with a fresh name in ``folder``, opened for writing),
    but with the permissions an ordinary new file gets: ``mode`` less the umask, applied by the
    kernel as it creates the file. Not mkstemp's private 0o600 widened afterwards: that needs the
    umask, and reading it means setting it, process-wide, for a moment, in which files that
    other threads create get no umask at all."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(tempfile.TMP_MAX):
        path = folder / f"{prefix}{secrets.token_hex(5)}{suffix}"
        try:
            return os.open(path, flags, mode), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder))


def new_folder(folder: Path, prefix: str, suffix: str = "", mode: int = 0o777) -> Path:
    """Like ``tempfile.mkdtemp``, with ``mode`` less the umask (see :func:`new_file`)."""
    for _ in range(tempfile.TMP_MAX):
        path = folder / f"{prefix}{secrets.token_hex(5)}{suffix}"
        try:
            os.mkdir(path, mode)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder))


def fsync_path(path: Path) -> None:
    """Flush one file, or every file of a folder and the folders themselves, to disk. A file a
    symbolic link in the folder points to is flushed too: the output's readers read it."""
    if path.is_dir():
        for entry in files_of(path, strict=False):
            _fsync_fd(entry.path, os.O_RDONLY)
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

    def __init__(self, tmp: Path, dest: Path, *, is_dir: bool, cleanup: Path | None = None,
                 mode: int | None = None, held: int | None = None) -> None:
        self.tmp = tmp
        self.mode = mode  # what commit sets: whatever the writer did to ``tmp``, it ends with this
        self.dest = dest
        self.is_dir = is_dir
        self._cleanup = cleanup  # a private work folder around ``tmp``, removed at the end
        self._held = held  # the descriptor that holds the staged copy (``core.owners``) until the end
        self.done = False

    def commit(self) -> Path:
        """Rename into place (replacing an earlier output of the same name) and flush to disk."""
        if self.done:
            return self.dest
        if self.mode is not None:
            os.chmod(self.tmp, self.mode)
        fsync_path(self.tmp)
        old: Path | None = None
        try:
            if self.is_dir and self.dest.exists():
                # a folder cannot be replaced by rename: move the old one aside first, and put
                # it back if the new one cannot take its place
                old = self.dest.with_name(f".{self.dest.name}{REPLACED}{os.getpid()}")
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
                _remove(old)
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
        owners.release(self._held)
        self._held = None


def _remove(path: Path) -> None:
    """Remove a file, a folder, or a symbolic link (never what the link points to)."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


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
        while True:
            fd, tmp = new_file(dest.parent, f".{dest.name}.", PARTIAL, 0o644)
            if owners.hold(fd, tmp):
                break
            os.close(fd)  # removed by a clean-up before it was held: another name
        mode = os.fstat(fd).st_mode & 0o777
    except OSError as e:
        raise LLMOpsError(f"cannot write to {dest.parent}: {e.strerror or e}") from None
    staged = Staged(tmp, dest, is_dir=False, mode=mode, held=fd)
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
        work, fd = owners.create_held_folder(dest.parent, f".{dest.name}.", PARTIAL, 0o700)
    except OSError as e:
        raise LLMOpsError(f"cannot write to {dest.parent}: {e.strerror or e}") from None
    try:
        out = work / "out"
        out.mkdir(mode=0o755)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        owners.release(fd)
        raise
    staged = Staged(out, dest, is_dir=True, cleanup=work, mode=out.stat().st_mode & 0o777, held=fd)
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


# -- what killed processes leave ------------------------------------------------------------
_STAGED_NAME = re.compile(r"^\.(?P<dest>.+)\.[A-Za-z0-9_]{6,}" + re.escape(PARTIAL) + "$")
_REPLACED_NAME = re.compile(r"^\.(?P<dest>.+)" + re.escape(REPLACED) + r"(?P<pid>[0-9]+)$")


@dataclass(frozen=True)
class Leftover:
    """A staged copy whose process is gone, or an earlier output a commit moved aside and never
    removed (``restore``: its destination is missing, so it goes back there)."""

    path: Path
    dest: Path
    kind: str  # "staged" or "replaced"
    restore: bool = False

    def describe(self) -> str:
        if self.kind == "staged":
            return f"staged copy of {self.dest.name} left by a process that is gone"
        if self.restore:
            return f"earlier {self.dest.name} moved aside by a commit that never finished ({self.dest} is missing)"
        return f"earlier {self.dest.name} moved aside by a commit and never removed"


def _leftover(entry: Path) -> Leftover | None:
    if (m := _REPLACED_NAME.match(entry.name)) is not None:
        if owners.pid_alive(int(m["pid"])) and int(m["pid"]) != os.getpid():
            return None
        dest = entry.with_name(m["dest"])
        return Leftover(entry, dest, "replaced", restore=not dest.exists() and not dest.is_symlink())
    if (m := _STAGED_NAME.match(entry.name)) is not None:
        with owners.claim(entry) as held:
            if held is None:
                return None
        return Leftover(entry, entry.with_name(m["dest"]), "staged")
    return None


def leftovers(folder: Path) -> list[Leftover]:
    """What killed writers left in ``folder`` (not below it): staged copies no live process holds,
    folders moved aside by a commit whose process is gone."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    return [x for e in entries if (x := _leftover(e)) is not None]


def clean_leftover(item: Leftover) -> bool:
    """Remove a leftover (a moved-aside output whose destination is missing goes back in its
    place); False when it is no longer one (its owner turned out to be alive, or it is gone)."""
    if item.kind == "replaced":
        current = _leftover(item.path)
        if current is None:
            return False
        if current.restore:
            os.replace(item.path, item.dest)
            _fsync_dir(item.dest.parent)
        else:
            _remove(item.path)
        return True
    with owners.claim(item.path) as held:
        if held is None:
            return False
        _remove(item.path)
    return True
