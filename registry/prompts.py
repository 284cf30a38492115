"""Prompts on MLflow's prompt registry, mirrored as llmops artifacts so lineage can point at them.

An unchanged template does not make a new version: adding the same text again
returns the latest version (and writes its llmops rows, should a killed add have left them out).
A version llmops makes carries its owner (``mlflow_rows.OWNER_TAG``); if its rows cannot be
written, the version is removed again, number and all.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select

from llmops.core.errors import LLMOpsError, UsageError
from llmops.core.hashing import sha256_text
from llmops.registry import artifacts
from llmops.registry.db import best_effort
from llmops.registry.mlflow_rows import owner_tags, purge_version
from llmops.registry.refs import Ref, parse_ref, validate_name
from llmops.registry.store import Store, actor
from llmops.registry.tables import Version


@dataclass
class PromptInfo:
    name: str
    version: str
    uri: str
    template: str
    sha256: str
    message: str | None
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    created: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _info(pv, created: bool = True) -> PromptInfo:  # noqa: ANN001 - mlflow PromptVersion
    template = pv.template if isinstance(pv.template, str) else str(pv.template)
    tags = {k: v for k, v in (pv.tags or {}).items() if not k.startswith(("mlflow.", "llmops."))}
    return PromptInfo(pv.name, str(pv.version), f"prompts:/{pv.name}/{pv.version}", template, sha256_text(template),
                      pv.commit_message, list(getattr(pv, "aliases", None) or []), tags, created)


def _latest(store: Store, name: str):  # noqa: ANN202
    client = store.open().mlflow
    try:
        return client.load_prompt(name, allow_missing=True)
    except Exception:  # noqa: BLE001 - no such prompt yet
        return None


def add(store: Store, name: str, template: str, message: str | None = None) -> PromptInfo:
    validate_name(name, "prompt name")
    if not template.strip():
        raise UsageError("the prompt template is empty")
    latest = _latest(store, name)
    made = None
    if latest is not None and latest.template == template:
        info = _info(latest, created=False)
    else:
        info = _info(store.mlflow.register_prompt(name=name, template=template, commit_message=message,
                                                  tags=owner_tags()))
        made = info.version
    try:
        with store.session() as s:
            art = artifacts.upsert(s, sha256=info.sha256, kind="prompt", name=name, version=info.version,
                                   uri=info.uri, size_bytes=len(template.encode()), format="prompt",
                                   meta={"stored": False}, created_by=actor())
            exists = s.scalars(select(Version).where(Version.kind == "prompt", Version.name == name,
                                                     Version.version == info.version)).first()
            if exists is None:
                s.add(Version(kind="prompt", name=name, version=info.version, artifact_id=art.id))
    except BaseException:
        if made is not None:
            best_effort(lambda: purge_version(store, store.mlflow, name, made))
        raise
    return info


def show(store: Store, ref: str | Ref) -> PromptInfo:
    ref = parse_ref(ref, kind="prompt") if isinstance(ref, str) else ref
    client = store.open().mlflow
    try:
        if ref.alias:
            pv = client.load_prompt(f"prompts:/{ref.name}@{ref.alias}")
        elif ref.version == "latest":
            pv = client.load_prompt(ref.name)
        else:
            pv = client.load_prompt(ref.name, version=int(ref.version))
    except Exception as exc:  # noqa: BLE001
        raise LLMOpsError(f"{ref} not found in the prompt registry") from exc
    if pv is None:
        raise LLMOpsError(f"{ref} not found in the prompt registry")
    return _info(pv, created=False)


def list_prompts(store: Store) -> list[dict[str, Any]]:
    client = store.open().mlflow
    out = []
    for p in client.search_prompts(max_results=1000):
        latest = _latest(store, p.name)
        out.append({"name": p.name, "latest_version": str(latest.version) if latest else None,
                    "aliases": dict(getattr(p, "aliases", None) or {}),
                    "message": latest.commit_message if latest else None})
    return sorted(out, key=lambda r: r["name"])


def diff(store: Store, name: str, v1: str, v2: str) -> str:
    a = show(store, Ref("prompt", validate_name(name, "prompt name"), str(v1)))
    b = show(store, Ref("prompt", name, str(v2)))
    return "\n".join(difflib.unified_diff(a.template.splitlines(), b.template.splitlines(),
                                          fromfile=a.uri, tofile=b.uri, lineterm=""))
