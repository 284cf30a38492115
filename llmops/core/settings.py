"""Where the store lives: one place that turns flags and environment into URIs.

The default store is a folder (``./.llmops``) holding one SQLite file with both
MLflow's tables and ours, plus an artifact folder. ``LLMOPS_DATABASE_URL``
points both at another database (PostgreSQL); ``MLFLOW_TRACKING_URI`` points
MLflow at a server while our tables stay in the store's database.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmops.core.errors import UsageError

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


def cache_dir() -> Path:
    """Where llmops keeps what it can rebuild (fixtures, baseline logits, reference tools) and
    its evaluation scratch: ``LLMOPS_CACHE``, default ``~/.cache/llmops``."""
    return Path(os.environ.get("LLMOPS_CACHE") or Path.home() / ".cache" / "llmops").expanduser()


SCRATCH_DIR = "scratch"
# A scratch folder untouched this long was left by a killed process (a clean exit removes its
# own); the next evaluation sweeps it, since the cache, unlike a tmpfs /tmp, survives reboots.
SCRATCH_STALE_S = 7 * 24 * 3600


def scratch_dir() -> Path:
    """Where evaluations write their working files (token ids, windows, logits ``.npy``):
    ``scratch/`` in the cache, created on demand. Not ``/tmp``, which is often RAM-backed
    (tmpfs) and too small for a few hundred MB of logits."""
    d = cache_dir() / SCRATCH_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def scratch(prefix: str = "llmops-") -> Iterator[Path]:
    """A fresh folder under :func:`scratch_dir`, removed with everything in it on exit."""
    root = scratch_dir()
    _sweep_stale(root)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=root) as d:
        yield Path(d)


def _sweep_stale(root: Path) -> None:
    import shutil
    import time

    cutoff = time.time() - SCRATCH_STALE_S
    for entry in root.iterdir():
        try:
            if entry.lstat().st_mtime < cutoff:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        except OSError:
            continue


LOGITS_CACHE_DIR = "logits"
LOGITS_CACHE_ENV = "LLMOPS_LOGITS_CACHE_MB"
DEFAULT_LOGITS_CACHE_MB = 4096


def logits_cache_dir() -> Path:
    """Where baseline logits are cached for KL-divergence: ``logits/`` in the cache."""
    return cache_dir() / LOGITS_CACHE_DIR


def logits_cache_limit_bytes() -> int:
    """The cap on the baseline-logits cache: ``LLMOPS_LOGITS_CACHE_MB`` (MiB, default 4096);
    0 disables the cache."""
    raw = os.environ.get(LOGITS_CACHE_ENV, "").strip()
    if not raw:
        return DEFAULT_LOGITS_CACHE_MB * 1024 * 1024
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not 0 <= mb < float("inf"):  # also rejects NaN
        raise UsageError(f"{LOGITS_CACHE_ENV}={raw!r}: give a size in MiB (0 disables the cache)")
    return int(mb * 1024 * 1024)


@contextlib.contextmanager
def env_var(key: str, value: str) -> Iterator[None]:
    """``os.environ[key] = value`` while the block runs, then what was there before (or nothing)."""
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
