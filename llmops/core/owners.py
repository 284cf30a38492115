"""Who owns a piece of unfinished work, and whether that owner is still alive.

A process killed with SIGKILL runs no clean-up: what it staged stays behind (a half-written
output, bytes on their way into the store, an MLflow run left RUNNING). Telling that debris from
the work of a process still running must not guess, so every such thing carries its owner:

- a staged file or folder is *held*: its owner keeps an exclusive ``flock`` on it for as long as
  it lives (:func:`create_held_folder`, :func:`hold`). The kernel drops the lock when the owner
  dies, however it dies, so a lock that can be taken (:func:`claim`) means nobody owns it any
  more. The lock is taken on the open file, so it travels with renames, and on NFS Linux maps it
  to a lock the server arbitrates between hosts.
- a database record (an MLflow run) carries an *owner token* (:func:`token`): host, boot, process
  id and the process's start time, so that neither a reboot nor a reused process id makes a dead
  owner look alive. Only this host can say whether a process of its own is alive
  (:func:`alive` answers None for another host's token).

The owner takes its lock right after creating the file or folder, and a checker may come between
the two: whoever takes the lock first wins. A checker that wins removes the item while holding
the lock; the owner, which then gets the lock on a file that no longer has its name, sees that
(:func:`hold` returns False) and starts again under a new name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import secrets
import socket
import stat
from collections.abc import Iterator
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "-"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22); None
    when there is no such process. "-" where /proc is missing (the process exists)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return "-" if pid_alive(pid) else None
    fields = raw.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie has finished: its owner only has to reap it
        return None
    return fields[19]


def host() -> str:
    return socket.gethostname()


def token(pid: int | None = None) -> str:
    """``HOST/BOOT/PID/START``: this process (or ``pid`` on this host) as an owner."""
    pid = os.getpid() if pid is None else pid
    return f"{host()}/{_boot_id()}/{pid}/{_start_time(pid) or '-'}"


def alive(owner: str) -> bool | None:
    """Whether the process an owner token names still runs: None when the token is another
    host's (or not a token): this host cannot tell."""
    parts = owner.rsplit("/", 3)
    if len(parts) != 4 or parts[0] != host():
        return None
    _, boot, pid, start = parts
    if boot != _boot_id():
        return False  # that boot is over, and every process of it
    if not pid.isdigit():
        return None
    now = _start_time(int(pid))
    return now is not None and (start == "-" or now == "-" or now == start)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- held files and folders ---------------------------------------------------------------
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def hold(fd: int, path: Path) -> bool:
    """Take the owner's lock on ``fd`` (a file or folder just created at ``path``): True when
    ``path`` still names it, False when a checker removed it first (start again elsewhere)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        # a filesystem without locks: held all the same, and :func:`claim` there never takes it
        if exc.errno not in _NO_LOCKS:
            raise
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def release(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _open_for_lock(path: Path, is_dir: bool) -> int:
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    if is_dir:
        flags |= getattr(os, "O_DIRECTORY", 0)
    return os.open(path, flags)


def create_held_folder(parent: Path, prefix: str, suffix: str = "", mode: int = 0o777) -> tuple[Path, int]:
    """A new folder with a fresh name under ``parent``, held by this process (see :func:`hold`):
    (its path, the descriptor that holds it; close it with :func:`release` once the folder is
    gone or is no longer staged)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(5)}{suffix}"
        try:
            os.mkdir(path, mode)  # the mode less the umask, as for any new folder
        except FileExistsError:
            continue
        fd = _open_for_lock(path, True)
        if hold(fd, path):
            return path, fd
        release(fd)  # a checker took it away before the lock: another name


def held_by_someone(path: Path) -> bool:
    """Whether a live process holds ``path`` (without claiming it)."""
    with claim(path) as fd:
        return fd is None and path.exists()


@contextlib.contextmanager
def claim(path: Path) -> Iterator[int | None]:
    """Try to take ``path`` from its owner: yields a descriptor holding it when no live process
    holds it (the caller may remove it meanwhile), None when one does (or it is gone)."""
    try:
        st = os.lstat(path)
        fd = _open_for_lock(path, stat.S_ISDIR(st.st_mode))
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held (EWOULDBLOCK), or no locks here: either way not ours to take
            yield None
            return
        here = os.fstat(fd)
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            yield None
            return
        yield fd if (now.st_dev, now.st_ino) == (here.st_dev, here.st_ino) else None
    finally:
        release(fd)
