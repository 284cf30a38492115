"""Request traces read back from MLflow: what ``llmops monitor`` prints and what ``prod_*`` gates measure.

``llmops serve`` turns every request into an MLflow trace in the store's experiment (MLflow's
tracing API, exported asynchronously by MLflow's own queue). This module holds the names a
trace carries, so writer and readers agree, and reads them back with MLflow's
``search_traces`` (trace info only, no spans):

* tags (searchable): ``llmops.kind`` (``request`` or ``swap``), ``llmops.model``,
  ``llmops.version``, ``llmops.alias`` (empty when a pinned version or a path is served),
  ``llmops.status`` and ``llmops.endpoint``;
* metadata (numbers as text, as MLflow keeps metadata): latency, time to first token, queue
  wait (arrival to a free sequence slot of the batching engine), generation time, token
  counts, tokens/s, and the moment the request was given its version
  (``llmops.acquired_ms``), which orders requests into phases exactly as the server switched
  them.

The figures (percentiles, error rate, phases) are computed here because MLflow's trace
search returns records, not aggregates; its own metrics API is for runs, not traces.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from llmops.core.errors import LLMOpsError, UsageError
from llmops.registry.logged_models import VERSION_TAG
from llmops.registry.refs import validate_name
from llmops.registry.store import Store

# -- the names a trace carries -------------------------------------------------------------
TAG_KIND = "llmops.kind"
TAG_MODEL = "llmops.model"
TAG_VERSION = "llmops.version"
TAG_ALIAS = "llmops.alias"
TAG_STATUS = "llmops.status"
TAG_ENDPOINT = "llmops.endpoint"

KIND_REQUEST = "request"
KIND_SWAP = "swap"

# request statuses: ok; error (the server failed); cancelled (the client left mid-stream);
# rejected (a 4xx found once a version had the request, e.g. a prompt longer than the context)
STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_CANCELLED = "cancelled"
STATUS_REJECTED = "rejected"
# swap statuses
SWAP_OK = "ok"
SWAP_FAILED = "failed"

META_LATENCY_MS = "llmops.latency_ms"
META_TTFT_MS = "llmops.ttft_ms"
META_QUEUE_MS = "llmops.queue_ms"
META_GENERATION_MS = "llmops.generation_ms"
META_PROMPT_TOKENS = "llmops.prompt_tokens"
META_COMPLETION_TOKENS = "llmops.completion_tokens"
META_TOKENS_PER_S = "llmops.tokens_per_s"
META_ACQUIRED_MS = "llmops.acquired_ms"
META_HTTP_STATUS = "llmops.http_status"
META_FROM_VERSION = "llmops.from_version"
META_TO_VERSION = "llmops.to_version"
META_ERROR = "llmops.error"
META_LOAD_S = "llmops.load_s"

# The model version's tag naming the MLflow LoggedModel its traces are linked to.
LOGGED_MODEL_TAG = VERSION_TAG

PAGE = 1000
MAX_TRACES = 200_000

GATE_PREFIX = "prod_"


# -- records -------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    version: str
    alias: str
    status: str
    endpoint: str
    timestamp_ms: int
    acquired_ms: int
    latency_ms: float | None
    ttft_ms: float | None
    generation_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    queue_ms: float | None = None  # arrival to a sequence slot


@dataclass
class SwapRecord:
    timestamp_ms: int
    alias: str
    from_version: str | None
    to_version: str
    status: str
    error: str | None
    load_s: float | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["time"] = _iso(self.timestamp_ms)
        return d


@dataclass
class VersionSummary:
    version: str
    requests: int  # every request the version was handed, whatever came of it
    served: int  # answered in full or failed by the server: what the error rate is over
    errors: int
    cancelled: int
    rejected: int
    error_rate: float  # server failures over served requests
    client_error_rate: float  # requests refused as invalid (4xx) over all
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    p50_ttft_ms: float | None
    p95_ttft_ms: float | None
    tokens_per_s: float | None
    prompt_tokens: int
    completion_tokens: int
    first: str
    last: str
    p50_queue_ms: float | None = None  # waits for a sequence slot, over completed requests
    p95_queue_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Phase:
    version: str
    start: str
    end: str
    requests: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    model: str
    alias: str | None
    since: str
    requests: int
    versions: list[VersionSummary] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    swaps: list[SwapRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "alias": self.alias, "since": self.since, "requests": self.requests,
                "versions": [v.to_dict() for v in self.versions], "phases": [p.to_dict() for p in self.phases],
                "swaps": [s.to_dict() for s in self.swaps]}


# -- time ----------------------------------------------------------------------------------
_SPAN = re.compile(r"^\s*(?P<n>\d+(\.\d+)?)\s*(?P<unit>s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> int:
    """``--since``: a span back from now (``90s``, ``30m``, ``1h``, ``2d``, ``1w``) or an ISO
    time (``2025-06-01T12:00``, UTC unless it says otherwise); epoch milliseconds."""
    now = time.time() if now is None else now
    m = _SPAN.match(text or "")
    if m:
        return int((now - float(m.group("n")) * _UNITS[m.group("unit")]) * 1000)
    try:
        dt = datetime.fromisoformat((text or "").strip())
    except ValueError:
        raise UsageError(f"--since {text!r}: give a span such as 30m, 1h or 2d, or an ISO time "
                         "such as 2025-06-01T12:00") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


# -- reading -------------------------------------------------------------------------------
def _num(meta: dict[str, str], key: str) -> float | None:
    raw = meta.get(key)
    if raw in (None, ""):
        return None
    try:
        return float(raw)
    except ValueError:
        return None


def _search(store: Store, filter_string: str) -> list[Any]:
    """Trace infos matching ``filter_string`` in the store's experiment, oldest first (paged)."""
    client = store.open().mlflow
    infos: list[Any] = []
    token = None
    while len(infos) < MAX_TRACES:
        page = client.search_traces(locations=[store.experiment_id], filter_string=filter_string,
                                    max_results=PAGE, order_by=["timestamp_ms ASC"], page_token=token,
                                    include_spans=False)
        infos += [t.info for t in page]
        token = getattr(page, "token", None)
        if not token or not page:
            break
    return infos


def _filter(name: str, kind: str, since_ms: int, alias: str | None, version: str | None = None) -> str:
    parts = [f"tags.`{TAG_KIND}` = '{kind}'", f"tags.`{TAG_MODEL}` = '{name}'", f"trace.timestamp_ms >= {int(since_ms)}"]
    if alias is not None:
        parts.append(f"tags.`{TAG_ALIAS}` = '{alias}'")
    if version is not None:
        parts.append(f"tags.`{TAG_VERSION}` = '{version}'")
    return " AND ".join(parts)


def _check_names(name: str, alias: str | None, version: str | None = None) -> None:
    validate_name(name, "model name")
    if alias is not None:
        validate_name(alias, "alias")
    if version is not None and not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", version):
        raise UsageError(f"invalid version {version!r}")


def read_requests(store: Store, name: str, since_ms: int, alias: str | None = None,
                  version: str | None = None) -> list[RequestRecord]:
    """Request traces of model ``name`` since ``since_ms``, through ``alias`` (None: any alias, or none)."""
    _check_names(name, alias, version)
    out = []
    for info in _search(store, _filter(name, KIND_REQUEST, since_ms, alias, version)):
        tags, meta = dict(info.tags or {}), dict(info.trace_metadata or {})
        ts = int(info.request_time or 0)
        acquired = _num(meta, META_ACQUIRED_MS)
        latency = _num(meta, META_LATENCY_MS)
        if latency is None and info.execution_duration is not None:
            latency = float(info.execution_duration)
        pt, ct = _num(meta, META_PROMPT_TOKENS), _num(meta, META_COMPLETION_TOKENS)
        out.append(RequestRecord(
            version=tags.get(TAG_VERSION, "?"), alias=tags.get(TAG_ALIAS, ""),
            status=tags.get(TAG_STATUS, STATUS_OK), endpoint=tags.get(TAG_ENDPOINT, ""),
            timestamp_ms=ts, acquired_ms=int(acquired) if acquired is not None else ts,
            latency_ms=latency, ttft_ms=_num(meta, META_TTFT_MS), generation_ms=_num(meta, META_GENERATION_MS),
            prompt_tokens=int(pt) if pt is not None else None, completion_tokens=int(ct) if ct is not None else None,
            queue_ms=_num(meta, META_QUEUE_MS),
        ))
    return out


def read_swaps(store: Store, name: str, since_ms: int, alias: str | None = None) -> list[SwapRecord]:
    _check_names(name, alias)
    out = []
    for info in _search(store, _filter(name, KIND_SWAP, since_ms, alias)):
        tags, meta = dict(info.tags or {}), dict(info.trace_metadata or {})
        out.append(SwapRecord(
            timestamp_ms=int(info.request_time or 0), alias=tags.get(TAG_ALIAS, ""),
            from_version=meta.get(META_FROM_VERSION) or None, to_version=meta.get(META_TO_VERSION, tags.get(TAG_VERSION, "?")),
            status=tags.get(TAG_STATUS, SWAP_OK), error=meta.get(META_ERROR) or None, load_s=_num(meta, META_LOAD_S),
        ))
    return out


# -- figures -------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between closest ranks (numpy's default)."""
    vs = sorted(v for v in values if v is not None)
    if not vs:
        return None
    pos = (len(vs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(vs) - 1)
    return vs[lo] + (vs[hi] - vs[lo]) * (pos - lo)


def _round(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def summarize_version(version: str, recs: list[RequestRecord]) -> VersionSummary:
    """Figures of one version. Error rate: server failures over the requests the server served
    (completed or failed); requests a client cut short or sent invalid are counted apart and in
    neither side of it, so a client cannot move a gate on the rate by sending over-long prompts
    or hanging up. Latency percentiles over completed requests; tokens/s: completion tokens
    over the generation time (from the slot being free to the last token) of all of them."""
    done = [r for r in recs if r.status == STATUS_OK]
    errors = sum(r.status == STATUS_ERROR for r in recs)
    served = len(done) + errors
    rejected = sum(r.status == STATUS_REJECTED for r in recs)
    gen_s = sum((r.generation_ms or 0) for r in done) / 1000.0
    toks = sum((r.completion_tokens or 0) for r in done)
    return VersionSummary(
        version=version, requests=len(recs), served=served, errors=errors,
        cancelled=sum(r.status == STATUS_CANCELLED for r in recs), rejected=rejected,
        error_rate=round(errors / served, 6) if served else 0.0,
        client_error_rate=round(rejected / len(recs), 6) if recs else 0.0,
        p50_latency_ms=_round(percentile([r.latency_ms for r in done], 50)),
        p95_latency_ms=_round(percentile([r.latency_ms for r in done], 95)),
        p50_ttft_ms=_round(percentile([r.ttft_ms for r in done], 50)),
        p95_ttft_ms=_round(percentile([r.ttft_ms for r in done], 95)),
        tokens_per_s=round(toks / gen_s, 2) if gen_s > 0 else None,
        prompt_tokens=sum((r.prompt_tokens or 0) for r in recs), completion_tokens=toks,
        first=_iso(min(r.acquired_ms for r in recs)) if recs else "", last=_iso(max(r.acquired_ms for r in recs)) if recs else "",
        p50_queue_ms=_round(percentile([r.queue_ms for r in done], 50)),
        p95_queue_ms=_round(percentile([r.queue_ms for r in done], 95)),
    )


def phases(recs: list[RequestRecord]) -> list[Phase]:
    """Consecutive runs of one version, in the order the server handed versions out."""
    out: list[Phase] = []
    cur: list[RequestRecord] = []
    for r in sorted(recs, key=lambda r: r.acquired_ms):
        if cur and r.version != cur[0].version:
            out.append(Phase(cur[0].version, _iso(cur[0].acquired_ms), _iso(cur[-1].acquired_ms), len(cur)))
            cur = []
        cur.append(r)
    if cur:
        out.append(Phase(cur[0].version, _iso(cur[0].acquired_ms), _iso(cur[-1].acquired_ms), len(cur)))
    return out


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), "") if v.isdigit() else (1 << 62, v)


def report(store: Store, name: str, *, alias: str | None = "production", since: str = "1h") -> Report:
    since_ms = parse_since(since)
    recs = read_requests(store, name, since_ms, alias)
    swaps = read_swaps(store, name, since_ms, alias)
    by_version: dict[str, list[RequestRecord]] = {}
    for r in recs:
        by_version.setdefault(r.version, []).append(r)
    versions = [summarize_version(v, by_version[v]) for v in sorted(by_version, key=_version_key)]
    return Report(model=name, alias=alias, since=_iso(since_ms), requests=len(recs), versions=versions,
                  phases=phases(recs), swaps=swaps)


def gate_metrics(store: Store, name: str, version: str, *, alias: str | None = None,
                 since: str = "24h") -> dict[str, float]:
    """``prod_*`` figures of one version from its served requests (through ``alias``, or any),
    for promotion gates: ``prod_requests`` (served: completed or failed by the server),
    ``prod_error_rate`` (server failures over those), ``prod_client_error_rate`` (requests
    refused as invalid, over all), ``prod_cancelled``, ``prod_p50_latency_ms``,
    ``prod_p95_latency_ms``, ``prod_p50_ttft_ms``, ``prod_p95_ttft_ms``, ``prod_tokens_per_s``,
    ``prod_p95_queue_ms`` (the wait for a sequence slot).
    A version never served yields no figures (a gate on one then fails with a hint); a
    store that cannot be searched for traces yields none either."""
    try:
        recs = read_requests(store, name, parse_since(since), alias, str(version))
    except LLMOpsError:
        raise
    except Exception:  # noqa: BLE001 - gates on other metrics must not fail because traces cannot be read
        return {}
    s = summarize_version(str(version), recs)
    if not s.served:
        return {}
    figures = {
        "requests": float(s.served), "error_rate": s.error_rate, "client_error_rate": s.client_error_rate,
        "cancelled": float(s.cancelled),
        "p50_latency_ms": s.p50_latency_ms, "p95_latency_ms": s.p95_latency_ms,
        "p50_ttft_ms": s.p50_ttft_ms, "p95_ttft_ms": s.p95_ttft_ms, "tokens_per_s": s.tokens_per_s,
        "p95_queue_ms": s.p95_queue_ms,
    }
    return {GATE_PREFIX + k: float(v) for k, v in figures.items() if v is not None}


# -- the link between a version and its traces ------------------------------------------------
def logged_model_for(store: Store, name: str, version: str, run_id: str | None = None) -> str | None:
    """The MLflow LoggedModel that the traces of ``models:/NAME/VERSION`` are linked to (trace
    metadata ``mlflow.modelId``): the one its registration made (``llmops.registry.logged_models``),
    or, for a version registered before LoggedModels, one made now the same way. The MLflow UI
    then lists the version's traces on that model's page, and ``search_traces(model_id=...)``
    finds them. None where the tracking store cannot hold LoggedModels."""
    from llmops.registry.logged_models import for_version

    return for_version(store, name, version, run_id)
