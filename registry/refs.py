"""Registry references: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` and friends.

Names are restricted to a safe alphabet so a name can never become a path
(no separators, no ``..``) in the artifact store, on disk or in a URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmops.core.errors import UsageError

KINDS = {"models": "model", "prompts": "prompt", "datasets": "dataset"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REF = re.compile(r"^(?P<scheme>models|prompts|datasets):/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))?$")


def validate_name(name: str, what: str = "name") -> str:
    if not _NAME.match(name or "") or ".." in name:
        raise UsageError(
            f"invalid {what} {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Ref:
    kind: str  # model, prompt, dataset
    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        scheme = {v: k for k, v in KINDS.items()}[self.kind]
        if self.alias:
            return f"{scheme}:/{self.name}@{self.alias}"
        if self.version:
            return f"{scheme}:/{self.name}/{self.version}"
        return f"{scheme}:/{self.name}"


def is_ref(text: str) -> bool:
    return bool(re.match(r"^(models|prompts|datasets):/", text or ""))


def parse_ref(text: str, kind: str | None = None, require_version: bool = True) -> Ref:
    m = _REF.match(text or "")
    if not m:
        raise UsageError(f"invalid reference {text!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    ref_kind = KINDS[m.group("scheme")]
    if kind and ref_kind != kind:
        raise UsageError(f"expected a {kind} reference, got {text!r}")
    name = validate_name(m.group("name"))
    version, alias = m.group("version"), m.group("alias")
    if version is not None and version != "latest" and not version.isdigit():
        raise UsageError(f"invalid version {version!r} in {text!r}: expected a number, 'latest' or @ALIAS")
    if alias is not None:
        validate_name(alias, "alias")
    if require_version and version is None and alias is None:
        raise UsageError(f"reference {text!r} names no version: add /VERSION or @ALIAS")
    return Ref(ref_kind, name, version, alias)
