"""Lineage at scale: the recursive lineage query, 10 levels deep, over 100 000 edges.

    python bench/bench_lineage.py [--edges 100000] [--depth 10] [--runs 9] [--pg-url URL]

Builds a store on SQLite (and on PostgreSQL when one answers at ``--pg-url``, default
``LLMOPS_TEST_PG_URL`` or postgresql+psycopg://postgres@127.0.0.1:5432/postgres, in a database
created and dropped here), fills it with ``edges`` edges in chains of ``depth`` levels (10 000
artifact families: checkpoint -> conversions -> ...), then times ``llmops lineage``'s query
(``llmops.registry.lineage.graph``) from the deepest node up and from a root down: the median
of ``runs`` runs after a warm-up, against the 50 ms target.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

TARGET_MS = 50.0


def fill(engine, edges: int, depth: int) -> tuple[int, int]:  # noqa: ANN001 - sqlalchemy Engine
    """Chains of ``depth`` edges; returns (a deepest node, a root) of one chain in the middle."""
    from sqlalchemy import insert

    from llmops.registry.tables import Artifact, LineageEdge

    chains = max(1, edges // depth)
    per = depth + 1
    with engine.begin() as c:
        rows = [{"id": i + 1, "kind": "model", "name": f"m{i // per}", "version": str(i % per), "uri": f"file:///m/{i}",
                 "sha256": f"{i:064x}", "size_bytes": 1, "format": "gguf", "quant": "Q4_K_M", "metadata": {}}
                for i in range(chains * per)]
        for i in range(0, len(rows), 5000):
            c.execute(insert(Artifact.__table__), rows[i:i + 5000])
        links = [{"parent_id": ch * per + k + 1, "child_id": ch * per + k + 2, "relation": "converted_from",
                  "parameters": {"target": "gguf-q4"}} for ch in range(chains) for k in range(depth)]
        for i in range(0, len(links), 5000):
            c.execute(insert(LineageEdge.__table__), links[i:i + 5000])
        if engine.dialect.name == "postgresql":
            # what autovacuum does soon after a bulk load; without statistics the planner scans
            c.exec_driver_sql("ANALYZE llmops_artifacts")
            c.exec_driver_sql("ANALYZE llmops_lineage")
    mid = chains // 2
    return mid * per + depth + 1, mid * per + 1


def measure(store, node: int, direction: str, runs: int, depth: int) -> float:  # noqa: ANN001
    from llmops.registry import lineage

    with store.session() as s:
        g = lineage.graph(s, node, direction)  # warm-up, and a check that the walk is complete
        assert len(g.edges) == depth and max(e.depth for e in g.edges) == depth, (len(g.edges), direction)
    times = []
    for _ in range(runs):
        with store.session() as s:
            t0 = time.perf_counter()
            lineage.graph(s, node, direction)
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def run(label: str, db_url: str, store_dir: Path, args: argparse.Namespace) -> None:
    os.environ["LLMOPS_DATABASE_URL"] = db_url
    from llmops.core.settings import resolve
    from llmops.registry.store import Store

    store = Store(resolve(store_dir))
    store.open()
    t0 = time.perf_counter()
    deep, root = fill(store.engine, args.edges, args.depth)
    fill_s = time.perf_counter() - t0
    up = measure(store, deep, "up", args.runs, args.depth)
    down = measure(store, root, "down", args.runs, args.depth)
    for direction, ms in (("up", up), ("down", down)):
        print(f"| {label} | {args.edges} | {args.depth} | {direction} | {ms:.2f} ms | {ms / TARGET_MS:.2f}x of 50 ms |")
    print(f"(filled in {fill_s:.1f} s)", file=sys.stderr)
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edges", type=int, default=100_000)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--pg-url", default=os.environ.get("LLMOPS_TEST_PG_URL",
                                                       "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    args = ap.parse_args()
    print("| database | edges | levels | direction | median query | against target |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="llmops-lineage-") as d:
        run("SQLite", f"sqlite:///{Path(d) / 'llmops.db'}", Path(d) / "sqlite", args)
    from sqlalchemy import create_engine

    try:
        admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        name = f"llmops_bench_{uuid.uuid4().hex[:10]}"
        with admin.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except Exception as e:  # noqa: BLE001 - no PostgreSQL here: say so and stop
        print(f"PostgreSQL not measured: {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
        return
    try:
        with tempfile.TemporaryDirectory(prefix="llmops-lineage-") as d:
            run("PostgreSQL", args.pg_url.rsplit("/", 1)[0] + f"/{name}", Path(d), args)
    finally:
        from llmops.registry import db

        db.dispose_all()
        with admin.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
