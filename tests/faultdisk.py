"""The fault campaign's disk faults: a small filesystem that fills up, and a preloaded library
that fails writes with EIO (the C library's write calls, for the files under a prefix, from the
N-th one on)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


# -- a small filesystem that fills up -------------------------------------------------------------------
class SmallDisk:
    """A tmpfs at ``path`` whose size is set at will (root, and a kernel that lets this container
    mount: checked by :meth:`available`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = False

    @staticmethod
    def available(probe: Path) -> bool:
        probe.mkdir(parents=True, exist_ok=True)
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], capture_output=True)
        return ok

    def mount(self, size: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)], check=True)
        self.mounted = True

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def used(self) -> int:
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def umount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)
            self.mounted = False


# -- writes that fail with EIO ---------------------------------------------------------------------------
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include <fcntl.h>

static long fail_at = -2;
static const char *prefix;
static long seen;
static int count_fd = -1;

#define NEXT(name) static __typeof__(name) *real; if (!real) real = dlsym(RTLD_NEXT, #name)

/* FAULT_EIO_PREFIX: the path the failing writes go to; FAULT_EIO_AT: the first of them to fail
   (every later one fails too, as on a failing disk); FAULT_EIO_COUNT: a file that holds how
   many writes went there so far. */
static int failing(int fd) {
    if (fail_at == -2) {
        const char *at = getenv("FAULT_EIO_AT"), *count = getenv("FAULT_EIO_COUNT");
        prefix = getenv("FAULT_EIO_PREFIX");
        fail_at = at ? atol(at) : -1;
        if (count) count_fd = open(count, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    }
    if (!prefix || fd == count_fd) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = 0;
    if (strncmp(path, prefix, strlen(prefix)) != 0) return 0;
    long now = __atomic_add_fetch(&seen, 1, __ATOMIC_SEQ_CST);
    if (count_fd >= 0) {
        char buf[32];
        int len = snprintf(buf, sizeof buf, "%ld\n", now);
        NEXT(pwrite);
        real(count_fd, buf, len, 0);
    }
    if (fail_at < 0 || now < fail_at) return 0;
    errno = EIO;
    return 1;
}

ssize_t write(int fd, const void *b, size_t n) { NEXT(write); return failing(fd) ? -1 : real(fd, b, n); }
ssize_t pwrite(int fd, const void *b, size_t n, off_t o) { NEXT(pwrite); return failing(fd) ? -1 : real(fd, b, n, o); }
ssize_t pwrite64(int fd, const void *b, size_t n, off_t o) { NEXT(pwrite64); return failing(fd) ? -1 : real(fd, b, n, o); }
ssize_t writev(int fd, const struct iovec *v, int c) { NEXT(writev); return failing(fd) ? -1 : real(fd, v, c); }
ssize_t pwritev(int fd, const struct iovec *v, int c, off_t o) { NEXT(pwritev); return failing(fd) ? -1 : real(fd, v, c, o); }
ssize_t copy_file_range(int i, off_t *io, int o, off_t *oo, size_t n, unsigned f) {
    NEXT(copy_file_range); return failing(o) ? -1 : real(i, io, o, oo, n, f); }
int fsync(int fd) { NEXT(fsync); return failing(fd) ? -1 : real(fd); }
int fdatasync(int fd) { NEXT(fdatasync); return failing(fd) ? -1 : real(fd); }
"""


def build_shim(folder: Path) -> Path | None:
    """The EIO library, compiled here (None without a C compiler)."""
    src, lib = folder / "eio.c", folder / "libeio.so"
    folder.mkdir(parents=True, exist_ok=True)
    src.write_text(SHIM)
    try:
        r = subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(lib), str(src), "-ldl"], capture_output=True)
    except OSError:
        return None
    return lib if r.returncode == 0 else None


def with_eio(env: dict[str, str], lib: Path, prefix: Path, at: int, count: Path | None = None) -> dict[str, str]:
    out = {**env, "LD_PRELOAD": str(lib), "FAULT_EIO_PREFIX": str(prefix), "FAULT_EIO_AT": str(at)}
    if count is not None:
        out["FAULT_EIO_COUNT"] = str(count)
    return out
