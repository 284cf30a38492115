"""What a hostile or unlucky environment cannot do: forge a child's progress lines to abort its
job, stop a run with SIGTERM and leave staged outputs or scratch folders behind, widen the
permissions of files other threads create, or make the lineage query explode on a graph whose
paths fork and meet again."""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

LLMOPS = str(Path(sys.executable).with_name("llmops"))


# -- forged progress lines ------------------------------------------------------------------------
def _forged_lines() -> list[str]:
    from llmops.core.progress import EVENT

    # ids from 101: an EventWriter numbers its phases from 1, and the real ones must stay readable
    events: list[Any] = [
        {"e": "phase", "id": 101, "name": "real", "total": 4, "unit": "chunk", "total_bytes": 100},
        {"e": "advance", "id": 101, "done": "three", "nbytes": 0},
        {"e": "advance", "id": 101, "done": None},
        {"e": "advance", "id": 101, "done": 1e400},
        {"e": "advance", "id": 101, "done": 10 ** 30, "nbytes": -5},
        {"e": "advance", "id": 101, "done": 2, "note": {"not": "text"}},
        {"e": "advance", "id": [101], "done": 1},
        {"e": "advance", "id": {"x": 101}, "done": 1},
        {"e": "advance", "id": 99, "done": 1},
        {"e": "close", "id": 99},
        {"e": "close", "id": [101]},
        {"e": "phase", "id": [102], "name": "unhashable"},
        {"e": "phase", "id": 103, "name": ["not", "a", "name"], "total": 2},
        {"e": "phase", "id": 104, "name": "wrong types", "total": "many", "unit": 7, "total_bytes": "lots"},
        {"e": "phase", "id": 105, "name": "huge", "total": 10 ** 300, "total_bytes": 1e308},
        {"e": "advance", "id": 104, "done": 1, "nbytes": 10},
        {"e": "advance", "id": 105, "done": 10 ** 200},
        {"e": "phase", "id": 106, "name": "negative", "total": -3},
        {"e": "advance", "id": 106, "done": 1},
        {"e": "phase", "id": 105, "name": "the same id again"},
        {"e": "no-such-kind", "id": 101},
        {"e": "warn", "msg": ["not", "text"]},
        {"e": "detail", "msg": None},
        {"e": "warn"},
        {"e": ["phase"], "id": 101},
        {"id": 101, "done": 3},
        {"e": "close", "id": 101, "ok": "yes"},
        {"e": "close", "id": True},
    ]
    lines = [EVENT + json.dumps(e) for e in events]
    lines += [EVENT + "{not json", EVENT + "[1, 2, 3]", EVENT + '"text"', EVENT + "42", EVENT + "null",
              EVENT + '{"e": "advance", "id": 101, "done": NaN}',
              EVENT + '{"e": "advance", "id": 101, "done": Infinity}',
              EVENT + '{"e": "phase", "id": 107, "name": "digits", "total": ' + "9" * 5000 + "}",
              EVENT + "[" * 100_000 + "]" * 100_000, EVENT, EVENT + "\x00\x1f"]
    return lines


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("kind", ["tty", "lines", "callback", "verbose"])
def test_forged_progress_events_are_ignored(kind: str) -> None:
    """Lines that look like progress events and are not (bad JSON, wrong types, huge numbers,
    unknown phases, missing fields) change nothing; the events around them still work."""
    from llmops.core.progress import StreamReporter, as_reporter
    from llmops.core.progress_events import EventReader, EventWriter

    said: list[str] = []
    stream = _TTY() if kind == "tty" else io.StringIO()
    reporter = (as_reporter(said.append) if kind == "callback"
                else StreamReporter(stream, min_interval=0, milestone_after=0, verbose=kind == "verbose"))
    reader = EventReader(reporter)
    for line in _forged_lines():
        reader.feed(line)
    real: list[str] = []
    with EventWriter(real.append).phase("after", total=2, unit="step") as bar:
        bar.advance(note="step 1")
        bar.advance()
    for line in real:
        reader.feed(line)
    reader.close()
    text = "\n".join(said) if kind == "callback" else stream.getvalue()
    assert "after: 2/2 steps" in text or "after [" in text
    assert "not json" not in text


def forging_job(job: dict, say: Callable[[str], None]) -> dict:
    """Runs in a child interpreter: prints forged progress lines on its stderr, as a library
    (or a model's own text) might, between real ones."""
    from llmops.core.child import MARK
    from llmops.core.progress import as_reporter

    with as_reporter(say).phase("real", total=2, unit="chunk") as bar:
        bar.advance()
        for line in _forged_lines():
            sys.stderr.write(MARK + line + "\n")
        sys.stderr.flush()
        bar.advance()
    return {"done": job["n"]}


def test_a_child_forging_progress_lines_finishes_its_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmops.core.child import run_child
    from llmops.core.progress import StreamReporter

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                    os.environ.get("PYTHONPATH")])))
    stream = io.StringIO()
    reply = run_child("test_hardening:forging_job", {"n": 7}, "forging job", tmp_path,
                      progress=StreamReporter(stream, min_interval=0))
    assert reply["done"] == 7
    assert "real: 2/2 chunks" in stream.getvalue()


# -- SIGTERM unwinds like Ctrl-C ------------------------------------------------------------------
def _env(root: Path, marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI")}
    env.update(TMPDIR=str(root / "tmp"), LLMOPS_STORE=str(root / "store"), LLMOPS_CACHE=str(root / "cache"),
               LLMOPS_TEST_RUN=marker)
    return env


def _wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        assert proc.poll() is None, f"{what}: the command ended first ({proc.returncode}): {proc.communicate()[1]}"
        time.sleep(0.02)
    assert condition(), f"{what}: not within {timeout:.0f} s"


def _processes_with(marker: str) -> list[int]:
    """Processes still running whose environment carries ``marker`` (the command's children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"LLMOPS_TEST_RUN={marker}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state not in ("Z", "X"):
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def bigger_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmops.app.tiny_models import tiny_model

    # Big enough (~400 MB of F32) that the write is still running when the signal comes.
    return tiny_model("llama", tmp_path_factory.mktemp("bigger") / "m",
                      overrides={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8})


def _assert_terminated(proc: subprocess.Popen, root: Path, marker: str) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == ["error: terminated"], err
    assert "Traceback" not in err
    assert list((root / "out").iterdir()) == [], "staged output left behind"
    assert list((root / "tmp").iterdir()) == [], "stray temporary files"
    scratch = root / "cache" / "scratch"
    assert not scratch.exists() or list(scratch.iterdir()) == [], "scratch folder left behind"
    deadline = time.time() + 30
    while _processes_with(marker) and time.time() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker) == [], "a child process outlived the command"


def _start(root: Path, marker: str, *args: object) -> subprocess.Popen:
    for d in ("out", "tmp"):
        (root / d).mkdir()
    return subprocess.Popen([LLMOPS, *map(str, args)], env=_env(root, marker), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_while_writing_leaves_nothing(bigger_model: Path, tmp_path: Path) -> None:
    """SIGTERM in the middle of a conversion (a service manager's stop): exit 143 with one line,
    the staged output removed, nothing registered."""
    marker = uuid.uuid4().hex
    proc = _start(tmp_path, marker, "convert", bigger_model, "--to", "gguf-f16", "-o", tmp_path / "out" / "m.gguf",
                  "--no-verify", "--register", "terminated")
    _wait_for(lambda: any((tmp_path / "out").iterdir()), "the conversion started writing", proc)
    proc.send_signal(signal.SIGTERM)
    _assert_terminated(proc, tmp_path, marker)
    r = subprocess.run([LLMOPS, "--json", "models", "list"], env=_env(tmp_path, marker), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr


def test_sigterm_while_verifying_leaves_nothing(tiny_models, eval_text_path: Path, tmp_path: Path) -> None:
    """SIGTERM while the staged output is being verified (a child process running it, a scratch
    folder in the cache): the child is stopped, the scratch folder and the staged output removed."""
    marker = uuid.uuid4().hex
    scratch = tmp_path / "cache" / "scratch"
    proc = _start(tmp_path, marker, "convert", tiny_models("llama"), "--to", "gguf-q8_0",
                  "-o", tmp_path / "out" / "m.gguf", "--eval-text", eval_text_path)
    _wait_for(lambda: scratch.is_dir() and any(scratch.iterdir()) and bool(_processes_with(marker)[1:]),
              "the verification started", proc)
    proc.send_signal(signal.SIGTERM)
    _assert_terminated(proc, tmp_path, marker)


def test_serve_and_ui_keep_their_own_sigterm_handling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`serve` and `ui` stop their servers on SIGTERM and exit 0: the command's handler is not theirs.
    Any other command's is installed while it runs and removed after it."""
    from llmops.app.cli import OWN_SHUTDOWN, _command_name, main

    assert set(OWN_SHUTDOWN) == {"serve", "ui"}
    assert _command_name(["--store", "ui", "--json", "serve", "models:/m@prod"]) == "serve"
    assert _command_name(["--store=s", "ui", "--port", "5000"]) == "ui"
    assert _command_name(["--json", "convert", "ui"]) == "convert"
    assert _command_name(["--json"]) is None
    monkeypatch.setenv("LLMOPS_STORE", str(tmp_path / "s"))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["--json", "models", "list"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before
    assert json.loads(capsys.readouterr().out) == []


# -- no umask(0) window ---------------------------------------------------------------------------
@pytest.fixture
def umask_027() -> Iterator[int]:
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _modes_meanwhile(work: Callable[[], None], probe_dir: Path) -> list[int]:
    """Run ``work``; after every call into native code it makes, create a file as another thread
    could at that moment (``open`` with mode 0o666) and record the permissions it got."""
    modes: list[int] = []
    counter = itertools.count()

    def probe(_frame: Any, event: str, _arg: Any) -> None:
        if event == "c_return":
            path = probe_dir / f"probe-{next(counter)}"
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o666))
            modes.append(stat.S_IMODE(os.stat(path).st_mode))
            os.unlink(path)

    sys.setprofile(probe)
    try:
        work()
    finally:
        sys.setprofile(None)
    return modes


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_staged_outputs_get_their_modes_without_touching_the_umask(tmp_path: Path, umask_027: int) -> None:
    from llmops.core import atomic

    (tmp_path / "probes").mkdir()

    def work() -> None:
        with atomic.staged_file(tmp_path / "model.gguf") as staged:
            staged.tmp.write_bytes(b"gguf")
        staged.commit()
        with atomic.staged_folder(tmp_path / "model-onnx") as (folder, _work):
            (folder.tmp / "model.onnx").write_bytes(b"onnx")
        folder.commit()
        atomic.write_bytes_atomic(tmp_path / "small.bin", b"x")

    modes = _modes_meanwhile(work, tmp_path / "probes")
    assert modes and set(modes) == {0o666 & ~umask_027}
    assert _mode(tmp_path / "model.gguf") == 0o644 & ~umask_027
    assert _mode(tmp_path / "small.bin") == 0o644 & ~umask_027
    assert _mode(tmp_path / "model-onnx") == 0o755 & ~umask_027
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-onnx", "model.gguf", "probes", "small.bin"]


def test_the_downloaded_eval_text_gets_its_mode_without_touching_the_umask(
        tmp_path: Path, umask_027: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmops.core import evaltext

    src = Path(os.environ.get(evaltext.ENV_VAR) or
               Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw")
    if not src.is_file():
        pytest.skip("no local copy of wikitext-2-raw test (set LLMOPS_EVAL_TEXT)")
    text = src.read_bytes().decode("utf-8").replace("\r\n", "\n")
    archive = tmp_path / "wikitext-2-raw-v1.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(evaltext.ZIP_MEMBER, text.encode("utf-8"))
    (tmp_path / "probes").mkdir()
    dest = tmp_path / "cache" / "wiki.test.raw"
    modes = _modes_meanwhile(lambda: evaltext.download_wikitext2(dest, sources=[archive.as_uri()]),
                             tmp_path / "probes")
    assert modes and set(modes) == {0o666 & ~umask_027}
    assert _mode(dest) == 0o666 & ~umask_027
    assert [p.name for p in dest.parent.iterdir()] == ["wiki.test.raw"]


def test_a_fixture_build_gets_its_mode_without_touching_the_umask(tmp_path: Path, umask_027: int) -> None:
    from llmops.app import fixtures

    (tmp_path / "probes").mkdir()
    target = tmp_path / "fixtures" / "model"

    def work() -> None:
        with fixtures._staging_dir(target) as staging:
            (staging / fixtures.MARKER).write_text(json.dumps({"format_version": fixtures.FORMAT_VERSION}))

    modes = _modes_meanwhile(work, tmp_path / "probes")
    assert modes and set(modes) == {0o666 & ~umask_027}
    assert _mode(target) == 0o777 & ~umask_027
    assert [p.name for p in target.parent.iterdir()] == ["model"]


# -- lineage through diamonds ---------------------------------------------------------------------
LEVELS = 30


def _diamonds(engine: Any) -> tuple[list[int], list[tuple[int, int]]]:  # noqa: ANN401 - sqlalchemy Engine
    """A chain of ``LEVELS`` 2-way diamonds: n0 -> a1, b1 -> n1 -> a2, b2 -> n2 ... (2^LEVELS paths
    from one end to the other); the main nodes' ids and the (parent, child) edges."""
    from sqlalchemy import insert

    from llmops.registry.tables import Artifact, LineageEdge

    ids = itertools.count(1)
    main = [next(ids)]
    edges: list[tuple[int, int]] = []
    for _ in range(LEVELS):
        a, b, n = next(ids), next(ids), next(ids)
        edges += [(main[-1], a), (main[-1], b), (a, n), (b, n)]
        main.append(n)
    rows = [{"id": i, "kind": "model", "name": f"m{i}", "version": "1", "uri": f"file:///m/{i}", "sha256": f"{i:064x}",
             "size_bytes": 1, "format": "gguf", "quant": "Q4_K_M", "metadata": {}} for i in range(1, main[-1] + 1)]
    with engine.begin() as c:
        c.execute(insert(Artifact.__table__), rows)
        c.execute(insert(LineageEdge.__table__), [{"parent_id": p, "child_id": ch, "relation": "converted_from",
                                                  "parameters": {"edge": f"{p}-{ch}"}} for p, ch in edges])
    return main, edges


def _shortest(edges: list[tuple[int, int]], start: int, direction: str) -> dict[tuple[int, int], int]:
    """Each edge reachable from ``start`` and its depth (1 + the shortest distance to its near end)."""
    dist, frontier, out = {start: 0}, [start], {}
    while frontier:
        nxt = []
        for node in frontier:
            for p, c in edges:
                near, far = (c, p) if direction == "up" else (p, c)
                if near == node:
                    out.setdefault((p, c), dist[node] + 1)
                    if far not in dist:
                        dist[far] = dist[node] + 1
                        nxt.append(far)
        frontier = nxt
    return out


@contextmanager
def _bounded_work(session: Any) -> Iterator[None]:  # noqa: ANN401 - sqlalchemy Session
    """A fixed budget of work for the queries in the block, so that a walk that expands path by
    path fails within it instead of filling memory (SQLite queues every path) or the disk
    (PostgreSQL's temporary files) before any time limit: SQLite's virtual machine may run some
    20 million instructions, PostgreSQL 256 MB of temporary files and 50 s."""
    conn = session.connection()
    if conn.dialect.name != "sqlite":
        conn.exec_driver_sql("SET LOCAL statement_timeout = '50s'")
        conn.exec_driver_sql("SET LOCAL temp_file_limit = '256MB'")
        yield
        return
    raw = conn.connection.driver_connection
    calls = itertools.count()
    raw.set_progress_handler(lambda: next(calls) > 20_000, 1000)  # non-zero: interrupt the query
    try:
        yield
    finally:
        raw.set_progress_handler(None, 0)


@pytest.mark.timeout(60)
def test_lineage_through_a_chain_of_diamonds(store_env) -> None:  # noqa: ANN001 - conftest.StoreEnv
    """2^30 paths lead from one end to the other: the walk meets each edge once, at its shortest
    depth, and the graph has each node once."""
    from llmops.registry import lineage

    store = store_env.store()
    store.open()
    main, edges = _diamonds(store.engine)
    for start, direction in ((main[-1], "up"), (main[0], "down"), (main[LEVELS // 2], "up")):
        with store.session() as s, _bounded_work(s):
            g = lineage.graph(s, start, direction)
        expected = _shortest(edges, start, direction)
        got = {(e.parent, e.child): e.depth for e in g.edges}
        assert len(g.edges) == len(got) == len(expected)
        assert got == expected
        assert all(e.parameters == {"edge": f"{e.parent}-{e.child}"} and e.relation == "converted_from"
                   for e in g.edges)
        assert [(e.depth, e.parent, e.child) for e in g.edges] == sorted((e.depth, e.parent, e.child) for e in g.edges)
        assert set(g.nodes) == {start} | {n for pc in expected for n in pc}
    assert max(e.depth for e in g.edges) == 2 * (LEVELS // 2)  # from the middle up: 2 edges a diamond
