"""The artifact folder's side of ``llmops doctor``: bytes nothing owns, staging of dead processes.

The folder holds one sub-folder per MLflow run (``RUN_ID/artifacts/...``; under an experiment's
folder on a tracking server's store), ``models/MODEL_ID`` per LoggedModel, MLflow's ``traces``,
and registrations' staging folders (``.incoming-*``, held by their process: ``core.owners``).
A file is owned when it lies in the folder of a run or LoggedModel that is not deleted, or is (or
lies in) bytes a version, dataset or MLflow model version records. Anything else is an orphan:
the copy of a registration killed before its rows were written, the folder of a run that was
deleted, a stray file. Nothing here guesses about formats: ownership is the records'.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from llmops.core import owners
from llmops.registry.doctor import Facts, Finding, path_of
from llmops.registry.intake import INCOMING

RUN_DIR = re.compile(r"[0-9a-f]{32}")
MLFLOW_OWN = ("traces",)  # MLflow's own areas, with their own bookkeeping


def _units(root: Path) -> Iterator[tuple[str, Path]]:
    """(what, path) for each entry of the artifact folder that stands for one owner."""
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if name.startswith(INCOMING):
            yield "incoming", entry
        elif name in MLFLOW_OWN:
            continue
        elif name == "models" and entry.is_dir() and not entry.is_symlink():
            for m in sorted(entry.iterdir()):
                yield "logged", m
        elif RUN_DIR.fullmatch(name):
            yield "run", entry
        elif name.isdigit() and entry.is_dir() and not entry.is_symlink():
            yield from _units(entry)  # an experiment's folder (a tracking server's layout)
        else:
            yield "other", entry


def protected(facts: Facts) -> list[Path]:
    """Every path whose bytes something records: stored artifacts, MLflow versions' sources, the
    folders of live runs and LoggedModels."""
    store = facts.store
    uris = [a["uri"] for a in facts.artifacts.values() if a["meta"].get("stored")]
    for mv in facts.mlflow_versions.values():
        uris += [mv.source, getattr(mv, "storage_location", None)]
    uris += [r.info.artifact_uri for r in facts.runs.values() if r.info.lifecycle_stage != "deleted"]
    uris += [lm.artifact_location for lm in facts.logged]
    paths = {p for u in uris if (p := path_of(store, u)) is not None}
    return sorted(Path(os.path.abspath(p)) for p in paths)


def _files(top: Path) -> list[Path]:
    if top.is_symlink() or not top.is_dir():
        return [top]
    out = []
    for dirpath, dirs, files in os.walk(top):
        out += [Path(dirpath) / f for f in files]
        out += [Path(dirpath) / d for d in dirs if (Path(dirpath) / d).is_symlink()]
    return out


def _owned(path: Path, keep: list[Path]) -> bool:
    return any(path == k or k in path.parents or path in k.parents for k in keep)


def _run_alive(facts: Facts, run_id: str) -> bool:
    run = facts.runs.get(run_id)
    if run is None:  # made after the facts were read, or another experiment's: ask
        try:
            run = facts.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - no such run
            return False
    return run.info.lifecycle_stage != "deleted"


def orphans(facts: Facts, unit: Path, what: str, keep: list[Path]) -> list[Path]:
    """The files of one entry that nothing owns (none when its run or LoggedModel is alive)."""
    if what == "run" and _run_alive(facts, unit.name):
        return []
    if what == "logged" and unit.name in {lm.model_id for lm in facts.logged}:
        return []
    return [f for f in _files(unit) if not _owned(Path(os.path.abspath(f)), keep)]


def check(facts: Facts) -> list[Finding]:
    root = facts.store.settings.artifact_root
    if not root.is_dir():
        return []
    keep = protected(facts)
    out: list[Finding] = []
    for what, unit in _units(root):
        if what == "incoming":
            with owners.claim(unit) as fd:
                if fd is not None:
                    out.append(Finding("staged-leftover", str(unit), "bytes on their way into the store, left by a "
                                       "registration whose process is gone", "remove it", None,
                                       {"path": str(unit), "what": what}))
            continue
        files = orphans(facts, unit, what, keep)
        if files:
            size = sum(f.lstat().st_size for f in files if f.exists() or f.is_symlink())
            why = {"run": "of a run that is deleted or gone", "logged": "of a LoggedModel that is deleted or gone",
                   "other": "not in any run's folder"}[what]
            out.append(Finding("orphan-bytes", str(unit), f"{len(files)} file(s), {size} bytes {why}, that no "
                               "version or dataset records", "remove them", None, {"path": str(unit), "what": what}))
    return out
