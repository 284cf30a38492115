"""The debris outside the store that ``llmops doctor`` and ``llmops gc`` look at: staged outputs
beside the destinations of a killed ``convert`` (``core.atomic.leftovers``), and in the cache the
half-fetched copies of a killed ``llmops serve`` (``serve/.download-*``, ``serve/.removing-*``),
the scratch folders of killed evaluations (``scratch/*``) and the temporary files of a killed
baseline-logits writer (``logits/*.tmpPID``).

The serve cache and the scratch folders carry no owner of their own: a folder there belongs to
a process that is gone when no process of this host that may be running llmops uses this cache
(``llmops serve``, a benchmark's runner children, a fleet worker, and any Python interpreter:
llmops' API in a notebook or a test run evaluates into the same scratch folder). While one does,
they are left alone: their owner cannot be told apart, and removing a live evaluation's scratch
would break it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from llmops.core import atomic, owners
from llmops.core.settings import SCRATCH_DIR, cache_dir
from llmops.registry.doctor import Finding
from llmops.registry.repair import Action

SERVE_TEMP = (".download-", ".removing-")
LOGITS_TEMP = re.compile(r"\.tmp(?P<pid>[0-9]+)$")


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return []


def _may_run_llmops(argv: list[str]) -> bool:
    """The command line of ``llmops`` (the console script, or Python running it), of a runner child
    it started, of a fleet worker, or of any Python interpreter (which may have imported llmops)."""
    head = [os.path.basename(a) for a in argv[:2]]
    return ("llmops" in head or any(h.startswith("python") for h in head[:1])
            or any(a.startswith("ray::") or "llmops.core.child" in a or "llmops.app" in a for a in argv))


def _cache_of(pid: int) -> Path | None:
    """The cache folder a process uses (None: its environment cannot be read)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    env = dict(e.decode("utf-8", "replace").split("=", 1) for e in raw if b"=" in e)
    base = env.get("LLMOPS_CACHE") or (Path(env.get("HOME", "/")) / ".cache" / "llmops")
    return Path(os.path.abspath(os.path.expanduser(str(base))))


def cache_users(cache: Path) -> list[int]:
    """Live processes of this host that may run llmops with ``cache`` (:func:`_may_run_llmops`), this one
    aside."""
    me = os.getpid()
    cache = Path(os.path.abspath(cache))
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        if not _may_run_llmops(_argv(int(entry.name))):
            continue
        theirs = _cache_of(int(entry.name))
        if theirs is None or theirs == cache:
            found.append(int(entry.name))
    return found


def _cache_findings(cache: Path) -> list[Finding]:
    out: list[Finding] = []
    logits = cache / "logits"
    for f in sorted(logits.glob("*.tmp*")) if logits.is_dir() else []:
        m = LOGITS_TEMP.search(f.name)
        if m and not owners.pid_alive(int(m["pid"])):
            out.append(Finding("cache-leftover", str(f), "a baseline-logits file a killed writer left",
                               "remove it", None, {"path": str(f)}))
    if cache_users(cache):
        return out  # a live process may own what is left below: nothing to tell
    serve = cache / "serve"
    for d in sorted(serve.iterdir()) if serve.is_dir() else []:
        if d.name.startswith(SERVE_TEMP):
            out.append(Finding("cache-leftover", str(d), "a copy a killed `llmops serve` was fetching or removing",
                               "remove it", None, {"path": str(d)}))
    scratch = cache / SCRATCH_DIR
    for d in sorted(scratch.iterdir()) if scratch.is_dir() else []:
        out.append(Finding("cache-leftover", str(d), "the scratch folder of a killed evaluation", "remove it",
                           None, {"path": str(d)}))
    return out


def _output_findings(folders: list[Path]) -> list[Finding]:
    out: list[Finding] = []
    for folder in dict.fromkeys(Path(os.path.abspath(f)) for f in folders):
        for item in atomic.leftovers(folder):
            out.append(Finding("staged-leftover", str(item.path), item.describe(),
                               f"put it back as {item.dest.name}" if item.restore else "remove it", None,
                               {"path": str(item.path), "leftover": item}))
    return out


def check(outputs: list[Path] | None = None) -> list[Finding]:
    """Leftovers in the cache and beside outputs (``outputs``: the folders to look in; default the
    current folder, where ``convert`` writes by default)."""
    return _cache_findings(cache_dir()) + _output_findings(outputs or [Path.cwd()])


def clean(outputs: list[Path] | None = None, *, dry_run: bool = False) -> list[Action]:
    actions = []
    for f in check(outputs):
        if dry_run:
            actions.append(Action(f.kind, f.subject, f.repair or "", False))
            continue
        try:
            if "leftover" in f.data:
                done = atomic.clean_leftover(f.data["leftover"])
            else:
                done = _remove(Path(f.data["path"]))
            actions.append(Action(f.kind, f.subject, f.repair or "", done))
        except OSError as exc:
            actions.append(Action(f.kind, f.subject, f.repair or "", False, str(exc)))
    return actions


def _remove(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    return True
