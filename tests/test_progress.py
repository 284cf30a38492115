"""Progress: a bar per phase on a terminal, a few lines elsewhere, nothing under --json, the table with -v."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from llmops.core.progress import CallbackReporter, StreamReporter, as_reporter, reporting
from llmops.core.progress_events import EventReader, EventWriter


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


# -- the renderers ----------------------------------------------------------------------------
def test_tty_bar_redraws_in_place_and_ends_with_a_newline() -> None:
    stream = FakeTTY()
    rep = StreamReporter(stream, min_interval=0)
    assert rep.tty
    with rep.phase("convert", total=4, unit="tensor", total_bytes=4_000_000) as bar:
        for _ in range(4):
            bar.advance(nbytes=1_000_000, note="a tensor")  # notes are -v only
    text = stream.getvalue()
    assert text.count("\r") >= 5  # the first draw and one redraw per tensor
    assert "\n" not in text[:-1].split("\r")[-1] and text.endswith("\n")
    assert text.count("\n") == 1  # all of it one line on screen: redrawn, never scrolled
    final = text.split("\r")[-1]
    assert "4/4 tensors" in final and "100%" in final and "4.0 MB" in final and "MB/s" in final
    assert "a tensor" not in text


def test_tty_message_while_a_bar_is_drawn_goes_above_it() -> None:
    stream = FakeTTY()
    rep = StreamReporter(stream, min_interval=0, verbose=True)
    with rep.phase("score", total=2, unit="chunk") as bar:
        bar.advance(note="chunk one")
        rep.warn("something to know")
        bar.advance()
    lines = stream.getvalue().split("\n")
    # each message ends a line of its own after the bar was wiped with \r
    assert any(line.endswith("\rchunk one") for line in lines)
    assert any(line.endswith("\rwarning: something to know") for line in lines)
    assert lines[-1] == "" and "2/2 chunks" in lines[-2].split("\r")[-1]


def test_a_failed_phase_still_ends_its_line() -> None:
    stream = FakeTTY()
    rep = StreamReporter(stream, min_interval=0)
    with pytest.raises(RuntimeError):
        with rep.phase("convert", total=10, unit="tensor") as bar:
            bar.advance()
            raise RuntimeError("disk full")
    assert stream.getvalue().endswith("\n") and "1/10 tensors" in stream.getvalue().split("\r")[-1]


def test_plain_stream_prints_start_milestones_and_end() -> None:
    stream = io.StringIO()
    rep = StreamReporter(stream, milestone_after=0)
    assert not rep.tty
    with rep.phase("convert", total=100, unit="tensor") as bar:
        for _ in range(100):
            bar.advance(note="per tensor")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "convert: 100 tensors"
    assert [re.search(r"\((\d+)%\)", ln).group(1) for ln in lines[1:-1]] == ["25", "50", "75"]
    assert lines[-1].startswith("convert: 100/100 tensors in ") and "\r" not in stream.getvalue()


def test_plain_stream_skips_milestones_of_a_quick_phase_and_quiet_prints_only_warnings() -> None:
    stream = io.StringIO()
    rep = StreamReporter(stream)  # milestones only once a phase has run a while
    with rep.phase("convert", total=100, unit="tensor") as bar:
        for _ in range(100):
            bar.advance()
    assert len(stream.getvalue().splitlines()) == 2
    quiet = io.StringIO()
    rep = StreamReporter(quiet, quiet=True, verbose=True)
    rep("converting")
    with rep.phase("convert", total=3) as bar:
        bar.advance(note="row")
    rep.warn("fallback")
    assert quiet.getvalue() == "warning: fallback\n"


def test_a_plain_callable_gets_every_line() -> None:
    said: list[str] = []
    rep = as_reporter(said.append)
    assert isinstance(rep, CallbackReporter) and as_reporter(rep) is rep
    rep("hello")
    with rep.phase("convert", total=2, unit="tensor") as bar:
        bar.advance(note="[1/2] a")
        bar.advance(note="[2/2] b")
    rep.warn("careful")
    assert said[0] == "hello" and said[1] == "convert: 2 tensors" and said[2:4] == ["[1/2] a", "[2/2] b"]
    assert said[4].startswith("convert: 2/2 tensors in ") and said[5] == "careful"


# -- across the child protocol ----------------------------------------------------------------
def test_events_round_trip_to_the_parents_reporter() -> None:
    lines: list[str] = []
    child = EventWriter(lines.append)
    child("plain message   with  spaces")
    with child.phase("GPTQ", total=2, unit="layer") as bar:
        bar.advance(note="layer 1/2: done")
        bar.advance(nbytes=10)
    child.warn("calibration shorter")
    said: list[str] = []
    reader = EventReader(as_reporter(said.append))
    for line in lines:
        reader.feed(line)
    assert said[0] == "plain message with spaces"
    assert said[1] == "GPTQ: 2 layers" and said[2] == "layer 1/2: done"
    assert said[3].startswith("GPTQ: 2/2 layers") and said[4] == "calibration shorter"


def child_job(job: dict, say: Callable[[str], None]) -> dict:
    """Runs in a child interpreter (see test_a_childs_phase_drives_the_parents_bar)."""
    with as_reporter(say).phase("score", total=job["n"], unit="chunk") as bar:
        for i in range(job["n"]):
            bar.advance(note=f"chunk {i}")
    say("child done")
    if job.get("crash"):
        import os

        with as_reporter(say).phase("never ends", total=3):
            os._exit(3)
    return {"n": job["n"]}


def test_a_childs_phase_drives_the_parents_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmops.core.child import run_child
    from llmops.core.errors import LLMOpsError

    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                    os.environ.get("PYTHONPATH")])))
    stream = FakeTTY()
    rep = StreamReporter(stream, min_interval=0)
    assert run_child("test_progress:child_job", {"n": 3}, "test job", tmp_path, progress=rep)["n"] == 3
    text = stream.getvalue()
    assert "3/3 chunks" in text and "\r" in text and "child done\n" in text and text.endswith("\n")
    # an ambient reporter reaches children started without one; a phase left open by a crash is closed
    plain = io.StringIO()
    with reporting(StreamReporter(plain)):
        with pytest.raises(LLMOpsError, match="exited with code 3"):
            run_child("test_progress:child_job", {"n": 1, "crash": True}, "test job", tmp_path)
    lines = plain.getvalue().splitlines()
    assert lines[0] == "score: 1 chunk" and lines[-1].startswith("never ends: stopped at 0/3")


# -- the command line -------------------------------------------------------------------------
@pytest.fixture
def tiny(tiny_models: Callable[[str], Path]) -> Path:
    return tiny_models("llama")


def _n_tensors(gguf_path: Path) -> int:
    import gguf

    return len(gguf.GGUFReader(gguf_path).tensors)


def test_convert_prints_a_few_lines_not_one_per_tensor(cli, tiny: Path, tmp_path: Path) -> None:
    r = cli("convert", tiny, "--to", "gguf-q8_0", "-o", tmp_path / "m.gguf", "--no-verify")
    assert r.code == 0, r.err
    n = _n_tensors(tmp_path / "m.gguf")
    lines = r.err.splitlines()
    assert n > 10 and len(lines) <= 6, r.err
    assert "\r" not in r.err  # stderr is not a terminal
    assert f"{n} tensors" in r.err and f"{n}/{n} tensors" in r.err and "MB/s" in r.err
    assert not any(line.startswith("[") for line in lines)


def test_verbose_prints_the_per_tensor_table(cli, tiny: Path, tmp_path: Path) -> None:
    r = cli("convert", tiny, "--to", "gguf-q8_0", "-o", tmp_path / "m.gguf", "--no-verify", "-v")
    assert r.code == 0, r.err
    n = _n_tensors(tmp_path / "m.gguf")
    rows = [line for line in r.err.splitlines() if line.startswith("[")]
    assert len(rows) == n
    assert re.match(r"\[ *1/\d+\] \S+ +\[\d+(, \d+)*\] +-> \w+ +[\d,]+ bytes$", rows[0]), rows[0]


def test_json_holds_the_tensor_table_and_stderr_stays_empty(cli, tiny: Path, tmp_path: Path) -> None:
    r = cli("--json", "convert", tiny, "--to", "gguf-q8_0", "-o", tmp_path / "m.gguf", "--no-verify", "-v")
    assert r.code == 0, r.err
    assert r.err == ""
    doc = r.json()
    for key in ("output", "format", "quant", "sha256", "size_bytes", "seconds", "peak_rss_bytes",
                "bits_per_weight", "verification", "registered", "parameters", "tool_versions"):
        assert key in doc
    tensors = doc["tensors"]
    assert len(tensors) == _n_tensors(tmp_path / "m.gguf")
    assert set(tensors[0]) == {"name", "shape", "type", "bytes"}
    assert {t["type"] for t in tensors} >= {"Q8_0", "F32"}
    # the table is the file's: tensor data bytes add up to what the file holds besides its header
    assert sum(t["bytes"] for t in tensors) <= doc["size_bytes"]
    assert doc["parameters"]["tensor_types"] == {k: sum(t["type"] == k for t in tensors)
                                                 for k in doc["parameters"]["tensor_types"]}
    json.dumps(doc)


def test_verify_scores_chunks_as_phases(cli, tiny: Path, tmp_path: Path, eval_text_path: Path) -> None:
    r = cli("convert", tiny, "--to", "gguf-q8_0", "-o", tmp_path / "m.gguf", "--eval-text", eval_text_path,
            "--threads", "2")
    assert r.code == 0, r.err
    assert "verify (llama.cpp): 4/4 chunks" in r.err and "verify source (torch): 4/4 chunks" in r.err, r.err
    assert len(r.err.splitlines()) <= 16, r.err


def test_onnx_json_lists_the_initializers_without_progress_lines(cli, tiny: Path, tmp_path: Path) -> None:
    r = cli("--json", "convert", tiny, "--to", "onnx-int4", "-o", tmp_path / "onnx", "--no-verify")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["format"] == "onnx" and doc["tensors"]
    assert sum(t["bytes"] for t in doc["tensors"]) == doc["parameters"]["weight_bytes"]
    assert not any(line.startswith(("onnx export", "converting", "wrote", "checking", "[")) for line in r.err.splitlines())


@pytest.mark.parametrize("target", ["onnx-int4", "gptq-4bit"])
def test_json_stderr_stays_empty_for_library_backed_targets(tiny: Path, tmp_path: Path, target: str) -> None:
    """In a fresh process, as a user runs it: the libraries under ONNX and GPTQ conversion
    (torchao, torch, the builder, GPTQModel) print nothing on stderr at import under --json."""
    import os
    import subprocess
    import sys

    exe = str(Path(sys.executable).with_name("llmops"))
    p = subprocess.run([exe, "--json", "convert", str(tiny), "--to", target, "-o", str(tmp_path / "out"),
                        "--no-verify"], capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    assert json.loads(p.stdout)["format"] in ("onnx", "gptq")
