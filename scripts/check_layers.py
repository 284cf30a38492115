#!/usr/bin/env python3
"""Check that llmops' imports run downward only, and print the import graph between floors.

    python scripts/check_layers.py [--graph]

The floors (ARCHITECTURE.md):

    app         llmops.app.*                         may import everything below
    middle      llmops.registry.*  llmops.converters.*  llmops.benchmarks.*
                                                     each may import itself and the core, never a sibling
                llmops.migrations.*                  the registry's migrations: the registry and the core
    core        llmops.core.*                        imports nothing else of llmops

Every import is counted, including those inside functions (lazy imports are still
dependencies). Exit status 1 lists each import that goes up or sideways.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# installed package -> folder in the repository (pyproject's package-dir mapping)
FOLDERS = {
    "llmops.registry": "registry",
    "llmops.converters": "converters",
    "llmops.benchmarks": "benchmarks",
    "llmops.migrations": "alembic",
    "llmops.core": "llmops/core",
    "llmops.app": "llmops/app",
    "llmops": "llmops",
}
ALLOWED = {
    "llmops.core": {"llmops.core"},
    "llmops.registry": {"llmops.registry", "llmops.core"},
    "llmops.converters": {"llmops.converters", "llmops.core"},
    "llmops.benchmarks": {"llmops.benchmarks", "llmops.core"},
    "llmops.migrations": {"llmops.migrations", "llmops.registry", "llmops.core"},
    "llmops.app": {"llmops.app", "llmops.registry", "llmops.converters", "llmops.benchmarks", "llmops.core",
                   "llmops.migrations", "llmops"},
    "llmops": set(),  # the package's __init__ holds the version and nothing else
}


def floor_of(module: str) -> str | None:
    """The floor a module belongs to (the longest matching package), None if not llmops."""
    for pkg in sorted(FOLDERS, key=len, reverse=True):
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return None


def modules(root: Path) -> dict[str, Path]:
    """Every module of the installed package, by its dotted name."""
    out: dict[str, Path] = {}
    for pkg, folder in FOLDERS.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = list(rel.parts)
            if pkg == "llmops" and parts and parts[0] in ("core", "app"):
                continue  # their own entries
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([pkg, *parts])
            out[name] = path
    return out


def imports_of(path: Path, module: str) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None or floor_of(target) is not None and target in FOLDERS:
                # "from llmops.registry import datasets": the names are modules of that package
                found += [(f"{target}.{a.name}", node.lineno) for a in node.names]
            else:
                found.append((target, node.lineno))
    return found


def check(root: Path = ROOT) -> tuple[list[str], Counter[tuple[str, str]]]:
    violations: list[str] = []
    graph: Counter[tuple[str, str]] = Counter()
    for module, path in modules(root).items():
        src = floor_of(module)
        for target, line in imports_of(path, module):
            dst = floor_of(target)
            if dst is None or src is None:
                continue
            if dst != src:
                graph[(src, dst)] += 1
            if dst not in ALLOWED[src] and dst != src:
                violations.append(f"{path.relative_to(root)}:{line}: {module} ({src}) imports {target} ({dst})")
    return violations, graph


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", action="store_true", help="print the floor-to-floor import graph")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository to check (default: this one)")
    args = ap.parse_args(argv)
    violations, graph = check(args.root.resolve())
    if args.graph or violations:
        for (src, dst), n in sorted(graph.items()):
            print(f"{src:20} -> {dst:20} {n:4} import(s)")
    for v in violations:
        print(v, file=sys.stderr)
    if violations:
        print(f"{len(violations)} import(s) go up or sideways", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
