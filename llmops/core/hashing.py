"""Content hashes: one definition of "the same bytes" for files and folders.

A folder's hash is the sha256 of a manifest (relative path, size, sha256 of each
file, sorted), so the same checkpoint copied elsewhere hashes the same, and a
single changed byte anywhere changes it. A symbolic link in a folder counts as the
file it points to, under the link's own path (``core.walk``): a Hugging Face cache
snapshot hashes as the same files copied out of it, and its copy in the store as
the snapshot.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from llmops.core.atomic import start_writeback
from llmops.core.walk import files_of

CHUNK = 1 << 20
MAP_WINDOW = 64 << 20


def _hash_mapped(h: Any, fd: int, off: int, n: int) -> None:
    """Add bytes ``[off, off + n)`` of ``fd`` to ``h`` where they lie in the page cache: no copy
    into Python bytes (a memcpy of the whole file, a fifth of the hash's time), and the range's
    pages mapped in one go (``MAP_POPULATE``): faulting them in one by one took more CPU than the
    hash itself and made a 4 GiB registration 3x slower."""
    import mmap

    start = off - off % mmap.ALLOCATIONGRANULARITY
    with _map_window(fd, start, off + n - start) as mm, memoryview(mm) as view:
        h.update(view[off - start:])


def _map_window(fd: int, start: int, n: int) -> Any:
    """Bytes ``[start, start + n)`` of ``fd`` mapped read-only, every page mapped in one go
    (``MAP_POPULATE``); ``start`` a multiple of the allocation granularity."""
    import mmap

    return mmap.mmap(fd, n, offset=start, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, hashed a mapped window at a time (``_hash_mapped``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            for off in range(0, size, MAP_WINDOW):
                _hash_mapped(h, f.fileno(), off, min(MAP_WINDOW, size - off))
            return h.hexdigest()
        except (OSError, ValueError):  # not mappable (a pipe, a special file): read it
            h = hashlib.sha256()
            f.seek(0)
            while block := f.read(CHUNK):
                h.update(block)
    return h.hexdigest()


def folder_manifest(path: str | os.PathLike[str]) -> list[dict[str, object]]:
    return [{"path": e.rel, "size": e.size, "sha256": sha256_file(e.path)} for e in files_of(path)]


def manifest_sha256(entries: list[dict[str, object]]) -> str:
    """A folder's hash from its manifest (``folder_manifest``'s entries, in its order)."""
    manifest = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(manifest.encode()).hexdigest()


def sha256_path(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, or of a folder's manifest."""
    p = Path(path)
    if p.is_dir():
        return manifest_sha256(folder_manifest(p))
    return sha256_file(p)


def size_of(path: str | os.PathLike[str]) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(e.size for e in files_of(p))
    return p.stat().st_size


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- copying with the hash ---------------------------------------------------------
_FICLONE = 0x40049409  # Linux ioctl: share the source's extents (btrfs, XFS, bcachefs); no bytes move
COPY_BLOCK = 8 << 20
DIRECT_MIN = 16 << 20  # smaller files go through the page cache: a direct write waits for the device
DIRECT_ALIGN = 4096  # a multiple of every device's logical block size that direct I/O asks for


def _reflink(src_fd: int, dst_fd: int) -> bool:
    import fcntl

    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
        return True
    except OSError:
        return False


def copy_file_hashing(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, fsync: bool = True) -> str:
    """Copy ``src`` to ``dst`` and return the sha256 of the bytes written, in about the time of
    the copy alone.

    Registration copies a multi-GB artifact into the store and must know its hash: hashing and
    then copying reads it twice. Here the kernel copies block by block (``copy_file_range``: no
    trip through user space, as ``cp`` does it) while a second thread hashes each block already
    copied, read back from the destination's page cache (hashlib releases the GIL), so the hash
    is of the bytes stored and costs no second pass; on a filesystem with reflinks the copy
    shares extents and only the hash reads; a large file goes by direct I/O (``_copy_direct``:
    hashed from the source's page cache, written from it by the device, no copy by the CPU).
    Where the kernel cannot copy between the two files, blocks go through user space, hashed on
    the way."""
    import threading
    from queue import Queue

    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "w+b") as fout:
        if _reflink(fin.fileno(), fout.fileno()):
            if fsync:
                os.fsync(fout.fileno())
            return sha256_file(dst)
        size = os.fstat(fin.fileno()).st_size
        if size >= DIRECT_MIN and (digest := _copy_direct(fin.fileno(), fout.fileno(), size, fsync, src)) is not None:
            return digest
        blocks: Queue[tuple[int, int] | bytes | None] = Queue(maxsize=8)
        failure: list[BaseException] = []

        def hasher() -> None:
            try:
                while (b := blocks.get()) is not None:
                    if isinstance(b, tuple):  # (offset, length) of a block the kernel copied
                        _hash_mapped(h, fout.fileno(), *b)
                    else:
                        h.update(b)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the copying thread
                failure.append(exc)
                while blocks.get() is not None:  # let the copier finish its puts
                    pass

        worker = threading.Thread(target=hasher, name="llmops-hash", daemon=True)
        worker.start()
        try:
            _copy_blocks(fin, fout, blocks)
            fout.flush()
            if fsync:  # while the hasher finishes the last blocks
                os.fsync(fout.fileno())
        finally:
            blocks.put(None)
            worker.join()
        if failure:
            raise failure[0]
    return h.hexdigest()


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _copy_direct(fin: int, fout: int, size: int, fsync: bool, src: str | os.PathLike[str]) -> str | None:
    """Copy with direct I/O from the source's page cache: each window of the source is mapped,
    hashed, and written to ``fout`` straight from the mapping (``O_DIRECT``: the device reads the
    pages itself), so the bytes are read once, by the hash, and never copied by the CPU. The
    kernel copy moves every byte through a memcpy into newly allocated page cache, which costs
    as much CPU as the hash (4 GiB: 2.3 s) and, on a virtual machine whose free memory goes back
    to its host, page faults in the host besides (a 4 GiB copy measured 5.5-7.8 s against 2.8 s
    here). Not a whole block at the end: written through the page cache.

    The destination holds the hashed bytes unless the source changed meanwhile (hash and write
    read it at different moments): a changed size or time stamp fails the copy. None where the
    filesystem takes no direct I/O (the caller copies through the page cache)."""
    import contextlib
    import errno
    import fcntl
    import mmap
    import threading
    from queue import Queue

    from llmops.core.errors import LLMOpsError

    flags = fcntl.fcntl(fout, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fout, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return None
    before = _identity(os.fstat(fin))
    h = hashlib.sha256()
    windows: Queue[tuple[mmap.mmap, int, int] | None] = Queue(maxsize=2)
    failure: list[BaseException] = []

    def write(mm: mmap.mmap, off: int, n: int) -> None:
        with memoryview(mm) as view:
            body, done = n - n % DIRECT_ALIGN, 0
            while done < body:
                done += os.pwrite(fout, view[done:body], off + done)
            if body < n:
                fcntl.fcntl(fout, fcntl.F_SETFL, flags)
                while body < n:
                    body += os.pwrite(fout, view[body:n], off + body)

    def writer() -> None:
        while (item := windows.get()) is not None:
            mm, off, n = item
            try:
                if not failure:
                    write(mm, off, n)
            except BaseException as exc:  # noqa: BLE001 - handled by the hashing thread
                failure.append(exc)
            finally:
                mm.close()

    def read_ahead(off: int) -> None:
        # a source not in the page cache: the next windows are read while this one is hashed
        # and written (mapping them with MAP_POPULATE alone reads each window only when it comes,
        # a few pages at a time: a 4 GiB registration from a cold cache took 11.5 s, now 7.9-9.2 s,
        # against cp + sync 5.7 s; reading further ahead measured no better)
        if off < size and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(fin, off, min(2 * MAP_WINDOW, size - off), os.POSIX_FADV_WILLNEED)

    worker = threading.Thread(target=writer, name="llmops-direct-write", daemon=True)
    worker.start()
    read_ahead(0)
    try:
        for off in range(0, size, MAP_WINDOW):
            if failure:
                break
            n = min(MAP_WINDOW, size - off)
            read_ahead(off + MAP_WINDOW)
            try:
                mm = _map_window(fin, off, n)
            except (OSError, ValueError):
                if off:
                    raise
                failure.append(OSError(errno.EINVAL, "not mappable"))
                break
            with memoryview(mm) as view:
                h.update(view)
            windows.put((mm, off, n))
    finally:
        windows.put(None)
        worker.join()
    if failure:
        exc = failure[0]
        if isinstance(exc, OSError) and exc.errno == errno.EINVAL:  # the device wants other alignment
            fcntl.fcntl(fout, fcntl.F_SETFL, flags)
            os.ftruncate(fout, 0)
            return None
        raise exc
    if fsync:
        os.fsync(fout)
    if _identity(os.fstat(fin)) != before:
        raise LLMOpsError(f"{src} changed while it was being copied; nothing was stored")
    return h.hexdigest()


def _copy_blocks(fin, fout, blocks) -> None:  # noqa: ANN001 - open binary files, a Queue
    """Copy ``fin`` into ``fout``, queueing what was copied for the hasher: ``(offset, length)``
    of kernel-copied ranges, or the bytes themselves when copying through user space."""
    off = 0
    step = 8 * COPY_BLOCK
    try:
        # the files' own positions, not explicit offsets: with offsets the same calls run five
        # times slower on ext4 (4 GiB: 6.4 s against 1.2 s, measured here)
        while n := os.copy_file_range(fin.fileno(), fout.fileno(), step):
            blocks.put((off, n))
            # the copied block starts on its way to disk now: the fsync at the end waits for the
            # tail only, and the kernel never throttles the copy for a page cache full of dirt
            start_writeback(fout.fileno(), off, n)
            off += n
        return
    except OSError:
        if off:  # failed midway: finish the rest through user space
            fin.seek(off)
            fout.seek(off)
    while block := fin.read(COPY_BLOCK):
        fout.write(block)
        blocks.put(block)


def link_file_hashing(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> str | None:
    """Hard-link ``src`` at ``dst`` and return the sha256 of its bytes: no byte moves and the file
    is read once, to hash it. None where no link can be made (another filesystem, one without
    hard links), for the caller to copy instead. The two names are then one file: a change to
    it in place (not a rewrite under a new name) changes both, which a hash check then reports."""
    try:
        # the file itself, never a symbolic link to it: Linux's link() links the link, and a
        # relative one stored elsewhere points nowhere
        os.link(os.path.realpath(src), dst)
    except OSError:
        return None
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)  # the bytes are the store's now: on disk before the name is recorded
    finally:
        os.close(fd)
    return sha256_file(dst)


def copy_path_hashing(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, fsync: bool = True,
                      link: bool = False) -> str:
    """Copy a file or folder to ``dst`` (which must not exist) and return ``sha256_path`` of it,
    reading each source byte once. ``link``: hard-link each file instead where the filesystem
    allows (``link_file_hashing``), copying the rest. Symbolic links are followed (``core.walk``):
    the copy holds the bytes they point to, as real files."""
    s, d = Path(src), Path(dst)
    if not s.is_dir():
        d.parent.mkdir(parents=True, exist_ok=True)
        if link and (digest := link_file_hashing(s, d)) is not None:
            return digest
        return copy_file_hashing(s, d, fsync=fsync)
    entries = []
    d.mkdir(parents=True, exist_ok=True)
    for e in files_of(s):
        out = d / e.rel
        out.parent.mkdir(parents=True, exist_ok=True)
        digest = (link_file_hashing(e.path, out) if link else None) or copy_file_hashing(e.path, out, fsync=fsync)
        entries.append({"path": e.rel, "size": out.stat().st_size, "sha256": digest})
    return manifest_sha256(entries)
