"""Hostile input, through the real command line: each case ends with a one-line error, a non-zero
exit, no output file, no registry row and no stray temporary file."""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

LLMOPS = str(Path(sys.executable).with_name("llmops"))


@dataclass
class Case:
    root: Path

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def store(self) -> Path:
        return self.root / "store"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI")}
        env.update(TMPDIR=str(self.tmp), LLMOPS_STORE=str(self.store))
        return env

    def run(self, *args: object, preexec=None, timeout: int = 120) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
        return subprocess.run([LLMOPS, *map(str, args)], capture_output=True, text=True, env=self.env(),
                              timeout=timeout, preexec_fn=preexec)

    def assert_clean_failure(self, r: subprocess.CompletedProcess[str], *, match: str = "") -> str:
        """One line on stderr starting with 'error:', non-zero exit, nothing left behind."""
        assert r.returncode != 0, r.stdout
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, r.stderr
        assert match.lower() in lines[0].lower(), lines[0]
        assert "Traceback" not in r.stderr
        assert list(self.out.iterdir()) == [], "partial output left behind"
        assert list(self.tmp.iterdir()) == [], "stray temporary files"
        self.assert_no_registry_rows()
        return lines[0]

    def assert_no_registry_rows(self) -> None:
        db = self.store / "llmops.db"
        if not db.exists():
            return
        import sqlite3

        with sqlite3.connect(db) as c:
            tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            for table in ("registered_models", "model_versions", "llmops_artifacts", "llmops_versions",
                          "llmops_lineage"):
                if table in tables:
                    assert c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table  # noqa: S608
        artifacts = self.store / "artifacts"
        if artifacts.exists():
            assert not [p for p in artifacts.rglob("*") if p.is_file()], "stored bytes without a registry row"


@pytest.fixture
def case(tmp_path: Path) -> Case:
    c = Case(tmp_path)
    for d in (c.out, c.tmp):
        d.mkdir()
    return c


def _copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _convert(case: Case, src: Path, *extra: object, target: str = "gguf-q8_0",
             **kw) -> subprocess.CompletedProcess[str]:  # noqa: ANN003
    return case.run("convert", src, "--to", target, "-o", case.out / "m.gguf", "--no-verify",
                    "--register", "hostile", *extra, **kw)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_execute_code(case: Case, tiny_models) -> None:
    import torch

    src = case.root / "evil"
    src.mkdir()
    shutil.copy(tiny_models("llama") / "config.json", src)
    marker = case.root / "PWNED"
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": _Evil(marker)}, src / "model.pth")
    msg = case.assert_clean_failure(_convert(case, src / "model.pth"), match="refusing")
    assert not marker.exists(), msg
    with open(src / "legacy.pth", "wb") as fh:  # a pre-zip pickle too
        pickle.dump({"w": _Evil(marker)}, fh)
    case.assert_clean_failure(_convert(case, src / "legacy.pth"))
    assert not marker.exists()


def test_truncated_safetensors(case: Case, tiny_models) -> None:
    src = _copy_model(tiny_models("llama"), case.root / "trunc")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    case.assert_clean_failure(_convert(case, src), match="truncated")


def test_header_declares_sizes_beyond_the_file(case: Case, tiny_models) -> None:
    src = _copy_model(tiny_models("llama"), case.root / "huge-header")
    data = bytearray((src / "model.safetensors").read_bytes())
    data[:8] = (1 << 40).to_bytes(8, "little")
    (src / "model.safetensors").write_bytes(bytes(data))
    case.assert_clean_failure(_convert(case, src), match="header claims")


@pytest.mark.parametrize(("field", "value", "match"), [
    ("hidden_size", None, "'hidden_size' is missing"),
    ("num_hidden_layers", "two", "must be an integer"),
    ("rms_norm_eps", [1], "must be a number"),
])
def test_config_missing_fields_or_wrong_types(case: Case, tiny_models, field: str, value: object, match: str) -> None:
    src = _copy_model(tiny_models("llama"), case.root / "cfg")
    cfg = json.loads((src / "config.json").read_text())
    if value is None:
        del cfg[field]
    else:
        cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    case.assert_clean_failure(_convert(case, src), match=match)


def test_unsupported_architecture(case: Case, tiny_models) -> None:
    msg = case.assert_clean_failure(_convert(case, tiny_models("gpt2")), match="GPT2LMHeadModel")
    assert "LlamaForCausalLM" in msg  # names what is supported


@pytest.mark.parametrize("content, match", [
    ('{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0', "not a valid tokenizer.json"),  # truncated
    ('{"version": "1.0", "model": {"type": "BPE", "vocab": 5, "merges": []}}', "tokenizers library cannot load"),
])
def test_tokenizer_json_that_is_broken(case: Case, tiny_models, content: str, match: str) -> None:
    """Read in a child process first (for speed): its failure still ends as this process's one line."""
    src = _copy_model(tiny_models("llama"), case.root / "tok")
    (src / "tokenizer.json").write_text(content)
    case.assert_clean_failure(_convert(case, src), match=match)


def test_nan_and_inf_weights(case: Case, tiny_models) -> None:
    from safetensors.numpy import load_file, save_file

    src = _copy_model(tiny_models("llama"), case.root / "nan")
    sd = load_file(src / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"][0, 0] = np.inf
    sd["model.layers.1.mlp.up_proj.weight"][1, 1] = np.nan
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    case.assert_clean_failure(_convert(case, src), match="NaN/Inf")


def test_unwritable_output_location(case: Case, tiny_models) -> None:
    blocker = case.root / "a-file"
    blocker.write_text("not a folder")
    r = case.run("convert", tiny_models("llama"), "--to", "gguf-f16", "-o", blocker / "sub" / "m.gguf",
                 "--no-verify", "--register", "hostile")
    case.assert_clean_failure(r, match="cannot write")


def test_full_output_location(case: Case, tiny_models) -> None:
    """A disk that fills up mid-write (simulated with a 64 KiB file-size limit, as `ulimit -f` sets)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    # Build the store first (the database file grows beyond the limit while MLflow creates its tables).
    assert case.run("db", "upgrade").returncode == 0
    case.assert_clean_failure(_convert(case, tiny_models("llama"), target="gguf-f32", preexec=limit),
                              match="cannot write")


def test_sigint_while_writing(case: Case, tmp_path: Path) -> None:
    """Ctrl-C in the middle of a conversion: exit 130, nothing partial, no temporary file."""
    from llmops.app.tiny_models import tiny_model

    # Big enough (~400 MB of F32) that the write is still running when the signal comes.
    src = tiny_model("llama", tmp_path / "bigger", overrides={"hidden_size": 1024, "intermediate_size": 4096,
                                                             "num_hidden_layers": 8})
    p = subprocess.Popen([LLMOPS, "convert", src, "--to", "gguf-f32", "-o", case.out / "m.gguf", "--no-verify"],
                         env=case.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(case.out.iterdir()):
        time.sleep(0.02)
    assert any(case.out.iterdir()), "the conversion never started writing"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err.lower() and "Traceback" not in err
    assert list(case.out.iterdir()) == [] and list(case.tmp.iterdir()) == []


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "x\\y", ""])
def test_registry_names_with_path_separators(case: Case, name: str) -> None:
    f = case.root / "w.bin"
    f.write_bytes(b"weights")
    r = case.run("models", "register", f, "--name", name)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "name" in lines[0]
    case.assert_no_registry_rows()
    assert not (case.root / "escape").exists()


@pytest.mark.parametrize("gate", ["ppl", "ppl <= ", "ppl <= abc", "ppl => 1", "ppl <= 1; rm -rf /", "ppl <= nan",
                                  "__import__('os') < 1"])
def test_gate_that_is_not_metric_op_number(case: Case, gate: str) -> None:
    r = case.run("promote", "m", "1", "--gate", gate)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "gate" in lines[0]
    case.assert_no_registry_rows()


# -- properties of the parsers --------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_safetensors_header_parser_never_crashes(tmp_path_factory, blob: bytes) -> None:
    from llmops.core.checkpoint import read_safetensors_header
    from llmops.core.errors import LLMOpsError

    f = tmp_path_factory.mktemp("st") / "x.safetensors"
    f.write_bytes(blob)
    try:
        infos = read_safetensors_header(f)
    except LLMOpsError as e:
        assert "\n" not in str(e)
        return
    for t in infos:  # whatever it accepts lies inside the file
        assert t.offset + t.nbytes <= len(blob)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "F64", "X"]),
    "shape": st.lists(st.integers(-2, 6), max_size=3),
    "data_offsets": st.lists(st.integers(-4, 300), min_size=2, max_size=2)}), max_size=4),
    st.integers(0, 300))
def test_safetensors_header_entries_are_checked_against_the_file(tmp_path_factory, header: dict, data_len: int) -> None:
    from llmops.core.checkpoint import read_safetensors_header
    from llmops.core.errors import LLMOpsError

    raw = json.dumps(header).encode()
    f = tmp_path_factory.mktemp("st") / "x.safetensors"
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * data_len)
    try:
        infos = read_safetensors_header(f)
    except LLMOpsError:
        return
    for t in infos:
        assert 0 <= t.nbytes and t.offset + t.nbytes <= 8 + len(raw) + data_len


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_gate_parser_accepts_exactly_metric_op_number(text: str) -> None:
    import math

    from llmops.core.errors import UsageError
    from llmops.registry.gates import OPS, parse_gate

    try:
        g = parse_gate(text)
    except UsageError as e:
        assert "\n" not in str(e)
        return
    assert g.op in OPS and math.isfinite(g.threshold)
    assert all(part.isidentifier() for part in g.metric.split(".")) and g.metric.count(".") <= 1
    assert g.metric == g.metric.lower()


@given(st.sampled_from(["ppl", "kld_ratio", "decode_tps"]), st.sampled_from(["<", "<=", ">", ">=", "==", "!="]),
       st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_gate_parser_round_trips(metric: str, op: str, value: float) -> None:
    from llmops.registry.gates import parse_gate

    g = parse_gate(f"{metric} {op} {value!r}")
    assert (g.metric, g.op, g.threshold) == (metric, op, float(repr(value)))
