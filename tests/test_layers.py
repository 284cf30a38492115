"""The house's floors: imports run downward only (scripts/check_layers.py, run as a program)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_layers.py"
FOLDERS = ("llmops", "registry", "converters", "benchmarks", "alembic")


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--graph", "--root", str(root)], capture_output=True,
                          text=True, timeout=120)


def test_imports_run_downward_only() -> None:
    r = _check(ROOT)
    assert r.returncode == 0, r.stderr
    edges = {tuple(line.split()[0:3:2]) for line in r.stdout.splitlines()}
    # the middle floor uses the core, and nothing of its siblings or of the application
    assert ("llmops.converters", "llmops.core") in edges
    assert not any(src in ("llmops.converters", "llmops.benchmarks", "llmops.registry", "llmops.core")
                   and dst == "llmops.app" for src, dst in edges)


def _copy(tmp_path: Path) -> Path:
    for f in FOLDERS:
        shutil.copytree(ROOT / f, tmp_path / f, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_a_sideways_import_is_caught(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    target = root / "converters" / "base.py"
    target.write_text(target.read_text() + "\n\ndef _f():\n    from llmops.benchmarks import metrics  # noqa\n")
    r = _check(root)
    assert r.returncode == 1
    assert "converters/base.py" in r.stderr and "llmops.benchmarks.metrics (llmops.benchmarks)" in r.stderr


def test_an_upward_import_from_the_core_is_caught(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    target = root / "llmops" / "core" / "hashing.py"
    target.write_text(target.read_text() + "\nfrom llmops.registry.store import Store  # noqa\n")
    r = _check(root)
    assert r.returncode == 1 and "llmops/core/hashing.py" in r.stderr
