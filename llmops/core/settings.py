"""Where the store lives: one place that turns flags and environment into URIs.

The default store is a folder (``./.llmops``) holding one SQLite file with both
MLflow's tables and ours, plus an artifact folder. ``LLMOPS_DATABASE_URL``
points both at another database (PostgreSQL); ``MLFLOW_TRACKING_URI`` points
MLflow at a server while our tables stay in the store's database.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
import urllib.parse
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

    def secrets(self) -> tuple[str, ...]:
        """The secret values in this store's URIs, for :func:`redact_text`."""
        return tuple(dict.fromkeys(s for u in (self.db_url, self.tracking_uri, self.registry_uri)
                                   for s in uri_secrets(u)))


def resolve(store: str | os.PathLike[str] | None = None) -> Settings:
    store_dir = Path(store or os.environ.get("LLMOPS_STORE") or DEFAULT_STORE).expanduser().resolve()
    db_url = os.environ.get("LLMOPS_DATABASE_URL") or f"sqlite:///{store_dir / DB_FILE}"
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or db_url
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or tracking
    return Settings(store_dir=store_dir, db_url=db_url, tracking_uri=tracking, registry_uri=registry)


# -- credentials: what a URI or a message quoting one must not show --------------------------
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# A URI inside free text runs to the next whitespace or quote, less the punctuation of the
# sentence around it ("(see URI), ...").
_URI_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]*[^\s'\"<>`.,;:!?)\]}]")
# A query (or path) parameter of a URI: ?name=value, &name=value, ;name=value.
_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#?]+)=(?P<value>[^&;#]*)")
# name=value outside a URI (a libpq conninfo string in a driver's message); stricter names,
# since a log line may well say "tokens=512".
_KEY_VALUE = re.compile(r"(?<![\w.-])(?P<name>[A-Za-z_][\w-]*)=(?P<value>'[^']*'|\"[^\"]*\"|[^\s,;&'\"]+)")
_SECRET_WORDS = ("pass", "pwd", "token", "secret", "signature", "credential", "auth", "apikey", "api_key")
_STRICT_NAMES = frozenset({"password", "passwd", "pwd", "pass", "sslpassword", "secret", "client_secret", "token",
                           "access_token", "refresh_token", "auth_token", "id_token", "api_key", "apikey"})
_STRICT_SUFFIXES = ("_password", "_passwd", "_token", "_secret", "_api_key")
MASK = "***"
# Where the configured secrets come from: the URIs of :func:`resolve` and MLflow's own
# credentials for a tracking server.
_SECRET_ENV = ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
_SECRET_VALUE_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def _secret_param(name: str) -> bool:
    """Whether a URI parameter carries a credential: loose (over-masking a URI costs nothing)."""
    n = urllib.parse.unquote_plus(name).strip().lower().replace("-", "_")
    return any(w in n for w in _SECRET_WORDS) or n in ("sig", "key") or n.endswith("_key")


def _strict_secret_name(name: str) -> bool:
    n = name.lower().replace("-", "_")
    return n in _STRICT_NAMES or n.endswith(_STRICT_SUFFIXES)


def _userinfo_end(rest: str) -> int:
    """Where the user info of ``rest`` (a URI after its ``scheme://``) ends (its last ``@``), or -1.

    Not ``urllib.parse``: drivers take passwords that are not valid URI text ('/', '?', ' ',
    even '@' unencoded: SQLAlchemy reads the password up to the next '@'), and the mask must cover
    all of it. So the user info is a name without ':', '/', '?', '#', then a password after ':'
    that runs to the last '@' before the query."""
    first = rest.find("@")
    if first < 0 or rest.startswith("/"):  # sqlite:////path, file:///path: no authority
        return -1
    stop = next((i for i, c in enumerate(rest[:first]) if c in "/?#"), -1)
    if stop >= 0 and ":" not in rest[:stop]:  # an '@' in the path or query, not a user
        return -1
    query = next((i for i in (rest.find("?", first), rest.find("#", first)) if i >= 0), len(rest))
    return rest.rfind("@", 0, query)


def _mask_params(text: str) -> str:
    return _PARAM.sub(lambda m: f"{m['lead']}{m['name']}={MASK}" if _secret_param(m["name"]) else m[0], text)


def redact(uri: str) -> str:
    """Hide credentials in a URI before it reaches a log or --json output: the user info
    (``user:password@`` becomes ``***@``) and the values of password-like parameters
    (``?password=``, ``token``, ``secret``, ``api_key``...)."""
    m = _SCHEME.match(uri)
    if m is None:
        return _mask_params(uri)
    head, rest = uri[:m.end()], uri[m.end():]
    end = _userinfo_end(rest)
    if end >= 0:
        rest = MASK + rest[end:]
    return head + _mask_params(rest)


def unencoded_at(uri: str) -> bool:
    """Whether the user info of ``uri`` holds a raw ``@``, which SQLAlchemy cannot read (it ends the
    password at the first ``@`` and takes the rest for the host)."""
    m = _SCHEME.match(uri)
    if m is None:
        return False
    rest = uri[m.end():]
    return "@" in rest[:max(0, _userinfo_end(rest))]


def uri_secrets(uri: str | None) -> list[str]:
    """The secret values of a URI as written in it: its password, its password-like parameters."""
    if not uri:
        return []
    found: list[str] = []
    m = _SCHEME.match(uri)
    rest = uri[m.end():] if m else uri
    end = _userinfo_end(rest) if m else -1
    if end >= 0:
        _, colon, password = rest[:end].partition(":")
        if colon and password:
            found.append(password)
        rest = rest[end:]
    found += [p["value"] for p in _PARAM.finditer(rest) if p["value"] and _secret_param(p["name"])]
    return found


def redact_text(text: str, *known_secrets: str | None) -> str:
    """``text`` (an exception's message, a log line) with every URI in it redacted
    (:func:`redact`), ``password=...``-like pairs masked, and each of ``known_secrets`` masked
    wherever it appears, as given, percent-encoded or decoded: a driver's message may quote a
    password without its URI. Pass :func:`configured_secrets` (or :meth:`Settings.secrets`)."""
    variants: set[str] = set()
    for secret in known_secrets:
        if secret:
            decoded = urllib.parse.unquote(secret)
            variants |= {secret, decoded, urllib.parse.unquote_plus(secret),
                         urllib.parse.quote(decoded, safe=""), urllib.parse.quote_plus(decoded)}
    for secret in sorted((v for v in variants if v), key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _URI_IN_TEXT.sub(lambda m: redact(m[0]), text)
    return _KEY_VALUE.sub(lambda m: f"{m['name']}={MASK}" if _strict_secret_name(m["name"]) else m[0], text)


def configured_secrets() -> tuple[str, ...]:
    """The secrets this process was configured with: those of ``LLMOPS_DATABASE_URL``,
    ``MLFLOW_TRACKING_URI`` and ``MLFLOW_REGISTRY_URI``, and MLflow's tracking password and token;
    what :func:`redact_text` masks in every line the CLI prints."""
    return _secrets_of(tuple(os.environ.get(k) for k in _SECRET_ENV),
                       tuple(os.environ.get(k) for k in _SECRET_VALUE_ENV))


@functools.lru_cache(maxsize=8)
def _secrets_of(uris: tuple[str | None, ...], values: tuple[str | None, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([s for u in uris for s in uri_secrets(u)] + [v for v in values if v]))


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
