"""The fault campaign's worlds: a store and how to reach it, for each kind of fault (a SQLite
store, a PostgreSQL one behind a proxy that can cut it off, a shared tracking server, a store on
a small disk that fills up)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import faultdisk
import faultenv as fe
from fault_scenarios import BIG
from faultkit import Runner, World, base_env


def sqlite_world(root: Path, runner: Runner) -> World:
    return _local_world(root, runner, None)


def _local_world(root: Path, runner: Runner, db_url: str | None) -> World:
    """A store in ``root``: its rows in SQLite there, or in the database ``db_url``."""
    store, cache, out, tmp = root / "store", root / "cache", root / "out", root / "tmp"
    for d in (out, tmp):
        d.mkdir(parents=True, exist_ok=True)
    env = {**base_env(), "LLMOPS_STORE": str(store), "LLMOPS_CACHE": str(cache), "TMPDIR": str(tmp)}
    if db_url is not None:
        env["LLMOPS_DATABASE_URL"] = db_url
    world = World(root, runner, env, db_url or f"sqlite:///{store / 'llmops.db'}", store, outputs=[out])
    world.must("db", "upgrade")
    return world


@contextlib.contextmanager
def world_of(kind: str, root: Path, runner: Runner, quick: bool = False) -> Iterator[World]:
    """A world for faults of ``kind``: ``sqlite``, ``pg`` (with a proxy that can cut the database
    off), ``server`` (a shared tracking server: on PostgreSQL in the full campaign, on SQLite in
    the quick sample, which spares it MLflow's first migration of a PostgreSQL database), ``disk``."""
    if kind == "sqlite":
        yield sqlite_world(root, runner)
    elif kind == "pg":
        with fe.pg_database() as db:
            world = _local_world(root, runner, fe.pg_url(db))
            proxy = fe.Proxy()
            world.extra.update(db=db, proxy=proxy,
                               proxied_env={**world.env, "LLMOPS_DATABASE_URL": fe.pg_url(db, proxy.port)})
            try:
                yield world
            finally:
                proxy.close()
    elif kind == "server":
        if not quick and fe.pg_reachable():
            with fe.pg_database() as db:
                yield from _server_world(root, runner, fe.pg_url(db))
        else:
            yield from _server_world(root, runner, None)
    elif kind == "disk":
        disk = faultdisk.SmallDisk(root / "disk") if faultdisk.SmallDisk.available(root / "probe") else None
        if disk is not None:
            disk.mount(BIG)
        try:
            world = sqlite_world(root, runner)
            if disk is not None:  # the store itself on the small disk
                store = disk.path / "store"
                world.env["LLMOPS_STORE"], world.store_dir = str(store), store
                world.db_url = f"sqlite:///{store / 'llmops.db'}"
                world.must("db", "upgrade")
            world.extra["disk"] = disk
            yield world
        finally:
            if disk is not None:
                disk.umount()
    else:
        raise ValueError(kind)


def _server_world(root: Path, runner: Runner, pg: str | None) -> Iterator[World]:
    server_store = root / "server-store"
    server_env = {**base_env(), "LLMOPS_STORE": str(server_store), "LLMOPS_CACHE": str(root / "server-cache")}
    if pg is not None:
        server_env["LLMOPS_DATABASE_URL"] = pg
    server = fe.TrackingServer(server_env, root / "server.log")
    server.start()
    try:
        db_url = pg or f"sqlite:///{server_store / 'llmops.db'}"
        client = root / "client"
        for d in (client / "out", client / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        env = {**base_env(), "LLMOPS_STORE": str(client / "store"), "LLMOPS_CACHE": str(client / "cache"),
               "TMPDIR": str(client / "tmp"), "MLFLOW_TRACKING_URI": server.url, "LLMOPS_DATABASE_URL": db_url,
               # a client gives up on a server that stays away (MLflow's default retries for minutes)
               "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
        # doctor and gc on the server's own store (its artifact folder is there); doctor through the
        # server as a client sees it too
        yield World(root, runner, env, db_url, server_store, check_env=server_env, outputs=[client / "out"],
                    extra={"server": server, "also_doctor": [env]})
    finally:
        server.stop()
