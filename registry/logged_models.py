"""MLflow 3 LoggedModels for registered versions: what the UI's Models tab, a run's "Logged
models" and a version's traces hang on.

llmops stores plain bytes (a GGUF file, an ONNX folder), not MLflow-flavoured models, so MLflow
never makes a LoggedModel by itself. Each registered model version gets one here, in the llmops
experiment, with the registration's run as its source run (and as the run's output, which is
what the run page lists), the version's identity as parameters (format, quant, sha256, size,
bits per weight, source) and its tags as tags.

The two are linked both ways by tags: the version's ``llmops.logged_model_id`` names the
LoggedModel, and the LoggedModel carries MLflow's own ``mlflow.modelVersions`` (the Models tab's
"registered versions" column) and ``llmops.model``/``llmops.version``. MLflow 3.17's
``create_model_version(model_id=...)`` cannot do it for us: the SQL registry store accepts the
argument but keeps nothing of it (``ModelVersion.model_id`` reads back as None), and a tracking
server given it demands a version source inside the LoggedModel's own artifact folder, which
bytes stored with the registration's run are not.

Figures measured on a version (``convert --verify``, ``llmops bench``) are logged to its
LoggedModel through the run that measured them, each with the dataset it was measured on (the
name and digest of the run's dataset input) and named by its protocol kind (``verify.ppl``,
``bench.decode_tps``); the protocol itself, in words, is a tag per metric. Results of different
protocols thus never share a name.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from llmops.registry.datasets import DatasetInfo, mlflow_digest
from llmops.registry.store import Store

# On the model version: the id of its LoggedModel.
VERSION_TAG = "llmops.logged_model_id"
# On the LoggedModel: MLflow's own list of the registered versions made from it
# (``mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS``), and ours.
MODEL_VERSIONS_TAG = "mlflow.modelVersions"
TAG_MODEL = "llmops.model"
TAG_VERSION = "llmops.version"
TAG_REGISTERED = "llmops.registered_model"
PROTOCOL_TAG = "llmops.protocol."
# MLflow's list of the prompt versions a LoggedModel uses (``TraceTagKey.LINKED_PROMPTS``).
LINKED_PROMPTS_TAG = "mlflow.linkedPrompts"
# MLflow's description of an entity (``mlflow.utils.mlflow_tags.MLFLOW_RUN_NOTE``), shown on its page.
NOTE_TAG = "mlflow.note.content"
# Version tags that are the version's identity: parameters of the LoggedModel.
PARAM_KEYS = ("format", "quant", "sha256", "size_bytes", "bits_per_weight", "source")
# Version tags that stay on the version (bookkeeping, not a property of the model).
_NOT_COPIED = (VERSION_TAG, "llmops.run_id")
MAX_PARAM = 6000
MAX_TAG = 5000


@dataclass
class Figure:
    """One figure for a LoggedModel: ``key`` as logged (``verify.ppl``), the protocol it was
    measured under and the dataset it was measured on (None: not measured on data)."""

    key: str
    value: float
    protocol: dict[str, Any] | None = None
    dataset: DatasetInfo | None = None


@dataclass
class Backfilled:
    uri: str
    model_id: str | None
    created: bool
    metrics: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Identity:
    """What a LoggedModel says about its version: parameters and tags."""

    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def identity(version_tags: dict[str, str]) -> Identity:
    """The LoggedModel's parameters (the version's identity) and tags (the rest) from the
    version's tags."""
    out = Identity()
    for k, v in version_tags.items():
        if v is None or k in _NOT_COPIED:
            continue
        if k in PARAM_KEYS:
            out.params[k] = str(v)[:MAX_PARAM]
        else:
            out.tags[k] = str(v)[:MAX_TAG]
    return out


def description(name: str, version: str, params: dict[str, str]) -> str:
    """The LoggedModel's description (markdown): what it stands for and how its figures are named."""
    what = " ".join(params[k] for k in ("format", "quant") if params.get(k) and params[k] not in ("none", "unknown"))
    sha = params.get("sha256", "")[:12]
    return (f"The {what + ' ' if what else ''}bytes registered as **models:/{name}/{version}** by llmops"
            f"{f' (sha256 `{sha}`…)' if sha else ''}. Figures are named by the protocol that measured them: "
            "`verify.*` by `llmops convert --verify`, `bench.*` by `llmops bench`, each on the dataset shown "
            "beside it; the tag `llmops.protocol.<figure>` says how it was measured.")


def version_description(experiment_id: str, model_id: str, logged_name: str) -> str:
    """The version's description (markdown), linking its LoggedModel's page: the registry's
    version page has no other link to it."""
    return (f"LoggedModel [{logged_name}](#/experiments/{experiment_id}/models/{model_id}): the version's "
            "parameters, its metrics with the datasets they were measured on, and the traces of `llmops serve`.")


def logged_name(name: str, version: str) -> str:
    return f"{name}-v{version}"


def _link_tags(name: str, version: str) -> dict[str, str]:
    return {MODEL_VERSIONS_TAG: json.dumps([{"name": name, "version": str(version)}]), TAG_MODEL: name,
            TAG_VERSION: str(version), TAG_REGISTERED: f"models:/{name}/{version}"}


# -- writing ---------------------------------------------------------------------------
def create(client, experiment_id: str, *, name: str, version: str, run_id: str | None,  # noqa: ANN001
           version_tags: dict[str, str]) -> str:
    """A PENDING LoggedModel ``NAME-vVERSION`` for a version about to be (or already) registered,
    made by ``run_id`` and listed as that run's output. Returns its id; the caller finalizes it
    (:func:`finalize`) or deletes it (:func:`discard`)."""
    from llmops.registry.mlflow_rows import owner_tags

    ident = identity(version_tags)
    tags = {**ident.tags, **_link_tags(name, version), NOTE_TAG: description(name, version, ident.params),
            **owner_tags()}
    lm = client.create_logged_model(experiment_id, name=logged_name(name, version), source_run_id=run_id,
                                    tags=tags, params=ident.params, model_type=ident.params.get("format"))
    if run_id:
        from mlflow.entities import LoggedModelOutput

        client.log_outputs(run_id, [LoggedModelOutput(lm.model_id, 0)])
    return lm.model_id


def link(client, model_id: str, name: str, version: str, params: dict[str, str] | None = None) -> None:  # noqa: ANN001
    """Name the registered version on its LoggedModel (the version number is MLflow's to give)."""
    client.set_logged_model_tags(model_id, {**_link_tags(name, version),
                                            NOTE_TAG: description(name, version, params or {})})


def link_prompt(client, model_id: str, prompt: str, version: str) -> None:  # noqa: ANN001
    """Name a prompt version the model is served with on its LoggedModel, in MLflow's own tag
    (``mlflow.linkedPrompts``), so the model's page lists it under Prompts. (MLflow's
    ``link_prompt_version_to_model`` reads the process-wide tracking store, not the client's.)"""
    current = client.get_logged_model(model_id).tags.get(LINKED_PROMPTS_TAG)
    linked = json.loads(current) if current else []
    entry = {"name": prompt, "version": str(version)}
    if entry not in linked:
        client.set_logged_model_tags(model_id, {LINKED_PROMPTS_TAG: json.dumps(linked + [entry])})


def finalize(client, model_id: str) -> None:  # noqa: ANN001
    client.finalize_logged_model(model_id, "READY")


def discard(client, model_id: str | None) -> None:  # noqa: ANN001
    """Delete a LoggedModel of a registration that did not happen (MLflow's delete is a soft one:
    it leaves every search and lookup, as a deleted run does)."""
    if model_id:
        client.delete_logged_model(model_id)


def log_figures(client, model_id: str | None, run_id: str, figures: list[Figure],  # noqa: ANN001
                run_metrics: dict[str, float] | None = None) -> None:
    """The figures on the LoggedModel (through ``run_id``, the run that measured them, which
    shows them too), with their datasets, and their protocols as tags; ``run_metrics``: further
    metrics for the run alone, in the same batch. Without a LoggedModel, the figures go to the run."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = []
    for f in figures:
        if f.value != f.value:  # NaN: nothing was measured
            continue
        ds = dict(dataset_name=f.dataset.name, dataset_digest=mlflow_digest(f.dataset)) if f.dataset else {}
        metrics.append(Metric(f.key, float(f.value), ts, 0, model_id=model_id, **ds))
    metrics += [Metric(k, float(v), ts, 0) for k, v in (run_metrics or {}).items() if v is not None and v == v]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    if model_id:
        tags = {PROTOCOL_TAG + f.key: _protocol_text(f) for f in figures if f.protocol}
        if tags:
            client.set_logged_model_tags(model_id, tags)


def _protocol_text(f: Figure) -> str:
    """``bench ppl, 16 chunks x 512, against 1a2b…, llama.cpp, 2 threads, cpu [protocol 0f3e…]``."""
    from llmops.registry import protocols

    metric = f.key.split(".", 1)[-1]
    key = protocols.short(protocols.protocol_key(f.protocol))
    return f"{protocols.summary(f.protocol, metric)} [protocol {key}]"[:MAX_TAG]


def figures_of(measurements, dataset: DatasetInfo | None) -> list[Figure]:  # noqa: ANN001 - results.Measurement
    """Measurements as figures named by their protocol's kind; the dataset only on those measured
    on it (accuracy), not on file sizes, load times or speeds."""
    out = []
    for m in measurements:
        p = m.protocol or {}
        kind = str(p.get("kind") or "unknown")
        out.append(Figure(f"{kind}.{m.metric}", m.value, p or None,
                          dataset if p.get("family") == "accuracy" else None))
    return out


# -- finding (and creating for versions registered before LoggedModels) -------------------------
def model_id_of(mv) -> str | None:  # noqa: ANN001 - mlflow ModelVersion
    return (getattr(mv, "tags", None) or {}).get(VERSION_TAG) or None


def for_version(store: Store, name: str, version: str, run_id: str | None = None) -> str | None:
    """The LoggedModel of ``models:/NAME/VERSION``, created (with its parameters, tags and the
    version's recorded results) if the version predates them. None where the tracking store
    cannot hold LoggedModels: callers treat the link as a convenience."""
    client = store.open().mlflow
    mv = client.get_model_version(name, str(version))
    if model_id_of(mv):
        return model_id_of(mv)
    try:
        return _ensure(store, name, str(version), run_id).model_id
    except Exception as exc:  # noqa: BLE001 - the link is a convenience; tags still name the version
        sys.stderr.write(f"warning: no LoggedModel for models:/{name}/{version}: {exc}\n")
        return None


def _alive(client, model_id: str) -> bool:  # noqa: ANN001
    try:
        client.get_logged_model(model_id)
        return True
    except Exception:  # noqa: BLE001 - deleted or never there
        return False


def _ensure(store: Store, name: str, version: str, run_id: str | None = None, *, check: bool = False) -> Backfilled:
    """Under the model's lock: the version's LoggedModel, created when it has none (or, with
    ``check``, when the one it names is gone)."""
    from llmops.registry.locks import named_lock
    from llmops.registry.versions import run_of

    client = store.mlflow
    uri = f"models:/{name}/{version}"
    with named_lock(store, f"logged-model:{name}"):
        mv = client.get_model_version(name, version)
        existing = model_id_of(mv)
        if existing and (not check or _alive(client, existing)):
            return Backfilled(uri, existing, False)
        run = run_id or run_of(mv)
        if run and not _run_active(client, run):
            run = None
        model_id = create(client, store.experiment_id, name=name, version=version, run_id=run,
                          version_tags=dict(mv.tags or {}))
        try:
            n = _log_recorded_results(store, client, model_id, name, version, run) if run else 0
            finalize(client, model_id)
            client.set_model_version_tag(name, version, VERSION_TAG, model_id)
            if not mv.description:
                client.update_model_version(name, version, version_description(
                    store.experiment_id, model_id, logged_name(name, version)))
        except BaseException:
            _quietly(lambda: discard(client, model_id))
            raise
        return Backfilled(uri, model_id, True, n)


def _run_active(client, run_id: str) -> bool:  # noqa: ANN001
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # noqa: BLE001 - gone
        return False


def _log_recorded_results(store: Store, client, model_id: str, name: str, version: str, run_id: str) -> int:  # noqa: ANN001
    """The version's newest recorded result per protocol kind and metric, with its dataset."""
    from llmops.registry import results
    from llmops.registry.datasets import info_for_artifact
    from llmops.registry.versions import artifact_for

    art = artifact_for(store, "model", name, version)
    if art is None:
        return 0
    figures: dict[str, Figure] = {}
    with store.session() as s:
        for r in results.history(s, art.id):  # newest first
            key = f"{r.kind}.{r.metric}"
            if key in figures:
                continue
            ds = info_for_artifact(s, r.eval_dataset_id) if r.eval_dataset_id and \
                r.protocol.get("family") == "accuracy" else None
            figures[key] = Figure(key, r.value, r.protocol, ds)
    log_figures(client, model_id, run_id, list(figures.values()))
    return len(figures)


def backfill(store: Store, *, dry_run: bool = False) -> list[Backfilled]:
    """A LoggedModel for every registered model version llmops knows that lacks one (or names one
    that is gone): stores written before LoggedModels keep working. Running it again changes nothing."""
    from sqlalchemy import select

    from llmops.registry.tables import Version

    store.open()
    client = store.mlflow
    with store.session() as s:
        known = [(v.name, v.version) for v in s.scalars(select(Version).where(Version.kind == "model")
                                                       .order_by(Version.name, Version.id))]
    out: list[Backfilled] = []
    for name, version in known:
        uri = f"models:/{name}/{version}"
        try:
            mv = client.get_model_version(name, version)
        except Exception:  # noqa: BLE001 - our row outlived MLflow's version (deleted by hand)
            continue
        existing = model_id_of(mv)
        if existing and _alive(client, existing):
            out.append(Backfilled(uri, existing, False))
            continue
        if dry_run:
            out.append(Backfilled(uri, None, True))
            continue
        try:
            out.append(_ensure(store, name, version, check=True))
        except Exception as exc:  # noqa: BLE001 - one version's failure does not stop the others
            out.append(Backfilled(uri, None, False, error=f"{type(exc).__name__}: {exc}"))
    return out


def _quietly(step) -> None:  # noqa: ANN001
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - the original error is what matters
        sys.stderr.write(f"warning: could not remove a LoggedModel: {exc}\n")
