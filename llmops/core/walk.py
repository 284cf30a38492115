"""The files of a folder, as hashing, copying, counting and flushing see them.

Every reader of a folder walks it here, so the bytes hashed, copied into the store, counted
and flushed are one set. A symbolic link stands for what it points to: a link to a file is
that file under the link's own name (a Hugging Face cache snapshot is nothing but links into
``../../blobs/``; a folder whose weights are a link to elsewhere holds those weights), a link
to a folder is that folder's files under the link's name. A walk that skipped links
registered a checkpoint without its weights as if it were whole.

A link that leads nowhere (its target missing, a loop of links, a folder link back into one
of its own parents) is refused with one line naming it, before anything is written: there is
no honest way to register it. Other special files (fifos, sockets, devices) are skipped, as
they always were. Entries come in the order ``sorted(root.rglob("*"))`` gave them (by path
components), so a folder without links hashes as it always did.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from llmops.core.errors import LLMOpsError


class BrokenLink(LLMOpsError):
    """A symbolic link inside a folder that leads to no file or folder."""


@dataclass(frozen=True)
class FileEntry:
    rel: str  # the path below the root, with "/": a linked file's is the link's own
    path: Path  # where to read it (a link: opening it reads its target)
    size: int


def _link_problem(link: str, exc: OSError | None = None) -> BrokenLink:
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    if exc is None:
        why = "a link to one of its own parent folders (a cycle)"
    elif exc.errno == errno.ELOOP:
        why = "a loop of symbolic links"
    elif exc.errno in (errno.ENOENT, errno.ENOTDIR):
        why = "its target does not exist"
    else:
        why = exc.strerror or str(exc)
    return BrokenLink(f"{link}: symbolic link to {target} cannot be followed ({why})")


def files_of(root: str | os.PathLike[str], *, strict: bool = True) -> list[FileEntry]:
    """The regular files under ``root`` (followed through symbolic links), sorted by path
    components. ``strict=False`` skips broken links instead of refusing them (flushing a
    staged output to disk, where the file is not being read for its identity)."""
    base = Path(root)
    found: list[tuple[tuple[str, ...], FileEntry]] = []

    def visit(folder: str, rel: tuple[str, ...], parents: frozenset[tuple[int, int]]) -> None:
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            raise LLMOpsError(f"{folder}: cannot list this folder: {exc.strerror or exc}") from None
        for entry in entries:
            parts = (*rel, entry.name)
            if entry.is_symlink():
                try:
                    st = os.stat(entry.path)
                except OSError as exc:
                    if strict:
                        raise _link_problem(entry.path, exc) from None
                    continue
                if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) in parents:
                    if strict:
                        raise _link_problem(entry.path)
                    continue
            else:
                st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                visit(entry.path, parts, parents | {(st.st_dev, st.st_ino)})
            elif stat.S_ISREG(st.st_mode):
                found.append((parts, FileEntry("/".join(parts), Path(entry.path), st.st_size)))

    top = os.stat(base)
    visit(str(base), (), frozenset({(top.st_dev, top.st_ino)}))
    found.sort(key=lambda item: item[0])
    return [entry for _, entry in found]

