"""Importance matrices: llama.cpp's file formats, computing one from calibration text that never
overlaps the evaluation, and quantizing with it byte-identically to llama.cpp.

The SmolLM2 checks are slow; the byte identity with ``llama-quantize --imatrix`` (llama.cpp's own
tool, built from the llama.cpp we link) is in the fidelity subset.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from llmops.converters.gguf.imatrix import ImatrixData, ImatrixRequest, load, read_gguf, write_gguf


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    import gguf

    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def _random_imatrix(f16: Path, seed: int = 0) -> ImatrixData:
    """An importance matrix with an entry for every block weight of ``f16`` (per expert for stacks)."""
    import gguf

    rng = np.random.default_rng(seed)
    sums, counts = {}, {}
    for t in gguf.GGUFReader(f16).tensors:
        if t.name.startswith("blk.") and len(t.shape) >= 2 and "norm" not in t.name and "gate_inp" not in t.name:
            n_mat = int(t.shape[2]) if len(t.shape) == 3 else 1
            sums[t.name] = (rng.random((n_mat, int(t.shape[0]))) ** 4 * 1000).astype(np.float32)
            counts[t.name] = rng.integers(0, 3, n_mat).astype(np.float32) * 512  # some experts never routed
            counts[t.name][0] = 1024
    return ImatrixData(sums, counts, ["calibration.txt"], 2, 512)


def test_gguf_format_round_trip_and_weights(tmp_path: Path) -> None:
    import gguf

    data = ImatrixData({"blk.0.ffn_down_exps.weight": np.arange(8, dtype=np.float32).reshape(2, 4) + 1,
                        "blk.0.attn_q.weight": np.full((1, 4), 6.0, np.float32)},
                       {"blk.0.ffn_down_exps.weight": np.array([2.0, 0.0], np.float32),
                        "blk.0.attn_q.weight": np.array([3.0], np.float32)}, ["text.txt"], 7, 512)
    write_gguf(tmp_path / "m.imatrix.gguf", data)
    r = gguf.GGUFReader(tmp_path / "m.imatrix.gguf")
    assert "general.architecture" not in r.fields  # as llama-imatrix writes it
    assert str(r.fields["general.type"].contents()) == "imatrix"
    assert {t.name: [int(d) for d in t.shape] for t in r.tensors} == {
        "blk.0.attn_q.weight.in_sum2": [4, 1], "blk.0.attn_q.weight.counts": [1, 1],
        "blk.0.ffn_down_exps.weight.in_sum2": [4, 2], "blk.0.ffn_down_exps.weight.counts": [1, 2]}
    back = load(tmp_path / "m.imatrix.gguf")
    assert back is not None and not back.legacy and back.chunk_count == 7 and back.datasets == ["text.txt"]
    # sum / count per expert; an expert that saw no token gets ones (llama-quantize's load_imatrix)
    assert back.weights("blk.0.ffn_down_exps.weight").tolist() == [0.5, 1.0, 1.5, 2.0, 1.0, 1.0, 1.0, 1.0]
    assert back.weights("blk.0.attn_q.weight").tolist() == [2.0] * 4
    assert back.weights("blk.0.attn_k.weight") is None


def test_legacy_dat_format(tmp_path: Path) -> None:
    """llama-imatrix's old format: per entry the name, ncall and mean * ncall; chunks and dataset at the end."""
    values = np.array([4.0, 8.0, 12.0], np.float32)
    name = b"blk.3.ffn_up.weight"
    blob = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 4, 3) + values.tobytes()
    blob += struct.pack("<i", 10) + struct.pack("<i", 8) + b"wiki.txt"
    (tmp_path / "old.dat").write_bytes(blob)
    data = load(tmp_path / "old.dat")
    assert data is not None and data.legacy and data.chunk_count == 10 and data.datasets == ["wiki.txt"]
    assert data.weights("blk.3.ffn_up.weight").tolist() == [1.0, 2.0, 3.0]
    (tmp_path / "text.txt").write_text("Calibration text is neither GGUF nor the legacy format.\n" * 50)
    assert load(tmp_path / "text.txt") is None


@pytest.mark.parametrize(("arch", "quant"), [("llama", "Q4_K_M"), ("llama", "IQ2_M"), ("llama", "IQ4_XS"),
                                             ("mixtral", "Q4_K_M"), ("mixtral", "IQ4_XS")])
def test_one_pass_with_imatrix_equals_llama_model_quantize(tiny_models, tmp_path, arch, quant) -> None:
    """The same importance matrix gives the bytes llama.cpp's quantizer gives (per expert for a
    mixture of experts, with never-routed experts), the tensors differ from no imatrix, and the
    file carries llama-quantize's imatrix keys."""
    import gguf

    from llmops.converters.gguf.convert import convert_to_gguf
    from llmops.converters.gguf.quantize import llama_model_quantize
    from llmops.converters.gguf.targets import QUANTS
    from llmops.core.checkpoint import open_checkpoint

    ckpt = open_checkpoint(tiny_models(arch))
    f16 = convert_to_gguf(ckpt, "F16", tmp_path / "f16.gguf")
    data = _random_imatrix(f16.path)
    write_gguf(tmp_path / "m.imatrix.gguf", data)
    ours = convert_to_gguf(ckpt, quant, tmp_path / "ours.gguf", imatrix=tmp_path / "m.imatrix.gguf")
    assert ours.extra["imatrix"]["entries"] == len(data.sums)
    llama_model_quantize(str(f16.path), str(tmp_path / "ref.gguf"), QUANTS[quant].ftype,
                         imatrix=read_gguf(tmp_path / "m.imatrix.gguf").all_weights())
    a, b = _tensors(ours.path), _tensors(tmp_path / "ref.gguf")
    assert a.keys() == b.keys()
    assert [n for n in a if a[n] != b[n]] == []
    if quant != "IQ2_M":
        plain = _tensors(convert_to_gguf(ckpt, quant, tmp_path / "plain.gguf").path)
        assert any(plain[n] != a[n] for n in a if n.startswith("blk."))
    fields = gguf.GGUFReader(ours.path).fields
    assert int(fields["quantize.imatrix.entries_count"].contents()) == len(data.sums)


def test_imatrix_of_another_model_is_refused(tiny_models, tmp_path) -> None:
    from llmops.converters.gguf.convert import convert_to_gguf
    from llmops.core.checkpoint import open_checkpoint
    from llmops.core.errors import UsageError

    bad = ImatrixData({"blk.0.attn_q.weight": np.ones((1, 7), np.float32)},
                      {"blk.0.attn_q.weight": np.ones(1, np.float32)}, [], 1, 512)
    write_gguf(tmp_path / "bad.gguf", bad)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UsageError, match="blk.0.attn_q.weight"):
        convert_to_gguf(open_checkpoint(tiny_models("llama")), "Q4_K_M", out, imatrix=tmp_path / "bad.gguf")
    assert list(out.iterdir()) == []


def test_calibration_never_overlaps_the_evaluation(tiny_models, tmp_path, eval_text_path) -> None:
    """Computed from the eval text, the matrix uses only the calibration part: every character it
    read lies after the evaluation part, which is all evaluation ever scores. A text that shares
    lines with the evaluation part is refused."""
    from llmops.converters.gguf.convert import convert_to_gguf
    from llmops.converters.gguf.imatrix import refuse_overlap, shared_lines
    from llmops.core.checkpoint import open_checkpoint
    from llmops.core.errors import UsageError
    from llmops.core.evaltext import calibration_split, evaluation_part, load_eval_text

    ev = load_eval_text(eval_text_path)
    res = convert_to_gguf(open_checkpoint(tiny_models("llama")), "Q4_K_M", tmp_path / "q.gguf",
                          imatrix=ImatrixRequest(eval_text_path, str(eval_text_path), chunks=2))
    cal = res.extra["imatrix"]["calibration"]
    assert cal["source"] == "eval-text tail" and cal["chunks"] == 2
    split = calibration_split(ev.text)
    assert len(evaluation_part(ev.text)) == split  # evaluation reads nothing past the split
    assert split <= cal["char_offset"] < cal["char_end"] <= len(ev.text)
    used = ev.text[cal["char_offset"]:cal["char_end"]]
    assert shared_lines(used, ev.text) == []
    # the stored matrix was computed on 2 chunks of 512 tokens
    stored = read_gguf(Path(res.extra["imatrix"]["path"]))
    assert stored.chunk_count == 2 and float(stored.counts["blk.0.attn_q.weight"][0]) == 1024
    # a text copied from the scored part (here: the start of the eval text) is refused
    leak = tmp_path / "leak.txt"
    leak.write_text(ev.text[:20000], encoding="utf-8")
    with pytest.raises(UsageError, match="shares"):
        refuse_overlap(leak.read_text(), ev.text, str(leak))
    with pytest.raises(UsageError, match="shares"):
        convert_to_gguf(open_checkpoint(tiny_models("llama")), "Q4_K_M", tmp_path / "leak.gguf",
                        imatrix=ImatrixRequest(leak, str(eval_text_path), chunks=2))


def test_cli_imatrix_from_text(tiny_models, tmp_path, cli, eval_text_path) -> None:
    tail = tmp_path / "calibration.txt"
    from llmops.core.evaltext import calibration_part, load_eval_text

    tail.write_text(calibration_part(load_eval_text(eval_text_path).text)[0][:40000], encoding="utf-8")
    r = cli("--json", "convert", tiny_models("llama"), "--to", "gguf-iq4_xs", "-o", tmp_path / "m.gguf",
            "--no-verify", "--imatrix", tail, "--eval-text", eval_text_path)
    assert r.code == 0, r.err
    im = r.json()["parameters"]["imatrix"]
    assert im["calibration"]["source"] == "file" and Path(im["path"]).is_file()
    r = cli("convert", tiny_models("llama"), "--to", "gguf-q4", "-o", tmp_path / "again.gguf", "--no-verify",
            "--imatrix", im["path"])  # the written matrix is an imatrix file in its own right
    assert r.code == 0, r.err


# -- SmolLM2 (slow) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_quantize() -> Path:
    from llmops.app.reference import llama_cpp_tool

    try:
        return llama_cpp_tool("llama-quantize")
    except (OSError, subprocess.CalledProcessError) as e:
        import os

        if os.environ.get("CI"):
            pytest.fail(f"cannot build llama-quantize: {e}")
        pytest.skip(f"cannot build llama-quantize: {e}")


@pytest.fixture(scope="module")
def smollm2_imatrix(smollm2, tmp_path_factory, eval_text_path) -> tuple[Path, Path]:
    """(an imatrix computed from the eval text's calibration part, SmolLM2 as F16)."""
    from llmops.app.converting import convert

    d = tmp_path_factory.mktemp("smollm2-imatrix")
    rec = convert(smollm2, "gguf-q4_k_m", d, verify=False,
                  options={"imatrix": str(eval_text_path), "imatrix_chunks": 8, "eval_text_file": str(eval_text_path)})
    f16 = convert(smollm2, "gguf-f16", d, verify=False).output
    return Path(rec.parameters["imatrix"]["path"]), f16


@pytest.mark.slow
@pytest.mark.fidelity
@pytest.mark.parametrize("quant", ["Q4_K_M", "IQ4_XS"])
def test_smollm2_byte_identical_to_llama_quantize_with_imatrix(smollm2, smollm2_imatrix, llama_quantize, tmp_path,
                                                               quant) -> None:
    """``llama-quantize --imatrix our.imatrix.gguf F16.gguf out.gguf TYPE`` reads our matrix and gives
    the tensors our one pass gives with it."""
    from llmops.app.converting import convert

    imatrix, f16 = smollm2_imatrix
    ref = tmp_path / "ref.gguf"
    r = subprocess.run([str(llama_quantize), "--imatrix", str(imatrix), str(f16), str(ref), quant, "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    ours = convert(smollm2, f"gguf-{quant.lower()}", tmp_path, verify=False, options={"imatrix": str(imatrix)}).output
    a, b = _tensors(ours), _tensors(ref)
    assert a.keys() == b.keys()
    assert [n for n in a if a[n] != b[n]] == []


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the matrix from the whole calibration part (118 chunks), four 16-chunk evaluations
def test_smollm2_imatrix_lowers_kld(smollm2, tmp_path, eval_text_path) -> None:
    """The point of an importance matrix, on wikitext-2 (16 chunks of 512, ``llmops bench``'s
    protocol), computed from the eval text's calibration part (never scored): the KL-divergence to
    the source drops by at least 10% for Q4_K_M and for IQ4_XS, and IQ4_XS stays smaller.

    (SmolLM2's rows are 576 wide, not a multiple of 256: llama.cpp stores most of "Q4_K_M" as
    Q5_0 and most of "IQ4_XS" as IQ4_NL, so on this model IQ4_XS is the 4.5-bit one against a
    mostly 5-bit Q4_K_M.)"""
    from llmops.app.converting import convert
    from llmops.benchmarks.accuracy import evaluate
    from llmops.core.evaltext import load_eval_text

    text = load_eval_text(eval_text_path).text
    opts = {"imatrix": str(eval_text_path), "eval_text_file": str(eval_text_path)}
    recs = {"q4km": convert(smollm2, "gguf-q4_k_m", tmp_path / "q4km.gguf", verify=False),
            "q4km-im": convert(smollm2, "gguf-q4_k_m", tmp_path / "q4km-im.gguf", verify=False, options=opts),
            "iq4xs": convert(smollm2, "gguf-iq4_xs", tmp_path / "iq4xs.gguf", verify=False)}
    recs["iq4xs-im"] = convert(smollm2, "gguf-iq4_xs", tmp_path / "iq4xs-im.gguf", verify=False,
                               options={"imatrix": recs["q4km-im"].parameters["imatrix"]["path"]})
    kld = {k: evaluate(r.output, text, source=smollm2, chunks=16, threads=2)["kld"] for k, r in recs.items()}
    assert kld["q4km-im"] <= 0.9 * kld["q4km"], kld
    assert kld["iq4xs-im"] <= 0.9 * kld["iq4xs"], kld
    assert recs["iq4xs-im"].size_bytes < recs["q4km"].size_bytes


@pytest.mark.slow
def test_smollm2_imatrix_matches_llama_imatrix(smollm2, tmp_path, eval_text_path) -> None:
    """Computed in torch, the matrix is the one llama.cpp's llama-imatrix collects on the same text
    (same entries, same token counts, values within float rounding of F16 weights vs float32)."""
    from llmops.app.converting import convert
    from llmops.app.reference import llama_cpp_tool
    from llmops.core.evaltext import calibration_part, load_eval_text

    tail = tmp_path / "tail.txt"
    tail.write_text(calibration_part(load_eval_text(eval_text_path).text)[0][:60000], encoding="utf-8")
    ours = convert(smollm2, "gguf-q4_k_m", tmp_path / "q.gguf", verify=False,
                   options={"imatrix": str(tail), "imatrix_chunks": 4, "eval_text_file": str(eval_text_path)})
    f16 = convert(smollm2, "gguf-f16", tmp_path / "f16.gguf", verify=False).output
    ref = tmp_path / "ref.imatrix.gguf"
    r = subprocess.run([str(llama_cpp_tool("llama-imatrix")), "-m", str(f16), "-f", str(tail), "-o", str(ref),
                        "-c", "512", "--chunks", "4", "-t", "2", "--no-ppl"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = read_gguf(Path(ours.parameters["imatrix"]["path"])), read_gguf(ref)
    assert a.sums.keys() == b.sums.keys() and a.chunk_count == b.chunk_count == 4
    for name in b.sums:
        assert np.array_equal(a.counts[name], b.counts[name]), name
        wa, wb = a.weights(name), b.weights(name)
        assert np.abs(wa - wb).max() <= 0.01 * np.abs(wb).max(), name


@pytest.mark.parametrize("store_env", ["sqlite"], indirect=True)
def test_registered_imatrix_conversion_has_its_calibration_lineage(store_env, tiny_models, tmp_path, cli,
                                                                   eval_text_path) -> None:
    """`--imatrix TEXT --register`: the matrix and the text it came from are dataset versions,
    both `calibrated_with` parents of the version, the text's edge with its exact character range."""
    from llmops.core.evaltext import calibration_part, load_eval_text

    tail = tmp_path / "calibration.txt"
    tail.write_text(calibration_part(load_eval_text(eval_text_path).text)[0][:40000], encoding="utf-8")
    r = cli("--json", "convert", tiny_models("llama"), "--to", "gguf-q4", "-o", tmp_path / "m.gguf", "--no-verify",
            "--imatrix", tail, "--eval-text", eval_text_path, "--register", "tiny-im")
    assert r.code == 0, r.err
    r = cli("--json", "lineage", "models:/tiny-im/1", "--format", "json")
    assert r.code == 0, r.err
    edges = [e for e in r.json()["edges"] if e["relation"] == "calibrated_with"]
    by_kind = {("text" if "char_offset" in (e.get("parameters") or {}) else "imatrix"): e for e in edges}
    assert set(by_kind) == {"imatrix", "text"}, edges
    assert by_kind["imatrix"]["parameters"]["imatrix"].startswith("datasets:/imatrix-")
    text_edge = by_kind["text"]["parameters"]
    assert text_edge["char_end"] > text_edge["char_offset"] >= 0 and text_edge["imatrix"].startswith("datasets:/imatrix-")
    r = cli("--json", "datasets", "list")
    assert any(d["name"].startswith("imatrix-") for d in r.json()), r.out


@pytest.mark.parametrize("store_env", ["sqlite"], indirect=True)
def test_cli_imatrix_from_registered_dataset(store_env, tiny_models, tmp_path, cli, eval_text_path) -> None:
    """``--imatrix datasets:/NAME/VERSION``: registered text is computed from, a registered imatrix
    file is used as it is; either way the version's lineage names that dataset version."""
    from llmops.core.evaltext import calibration_part, load_eval_text

    tail = tmp_path / "calibration.txt"
    tail.write_text(calibration_part(load_eval_text(eval_text_path).text)[0][:40000], encoding="utf-8")
    assert cli("datasets", "add", "calib", tail).code == 0
    r = cli("--json", "convert", tiny_models("llama"), "--to", "gguf-q4", "-o", tmp_path / "a.gguf", "--no-verify",
            "--imatrix", "datasets:/calib/1", "--register", "tiny-q4")
    assert r.code == 0, r.err
    im = r.json()["parameters"]["imatrix"]
    assert im["calibration"]["sha256"] == __import__("hashlib").sha256(tail.read_bytes()).hexdigest()
    up = cli("--json", "lineage", "models:/tiny-q4/1", "--up").json()
    calibrated = {lab for e in up["edges"] if e["relation"] == "calibrated_with" for n in up["nodes"]
                  if n["id"] == e["parent"] for lab in n["labels"]}
    assert "datasets:/calib/1" in calibrated and any(lab.startswith("datasets:/imatrix-") for lab in calibrated)
    assert cli("datasets", "list").out.count("calib") == 1  # the text was not registered a second time

    matrix = tmp_path / "m.imatrix.gguf"
    matrix.write_bytes(Path(im["path"]).read_bytes())
    assert cli("datasets", "add", "im", matrix).code == 0
    r = cli("--json", "convert", tiny_models("llama"), "--to", "gguf-q4", "-o", tmp_path / "b.gguf", "--no-verify",
            "--imatrix", "datasets:/im/1", "--register", "tiny-q4")
    assert r.code == 0, r.err
    up = cli("--json", "lineage", "models:/tiny-q4/2", "--up").json()
    calibrated = {lab for e in up["edges"] if e["relation"] == "calibrated_with" for n in up["nodes"]
                  if n["id"] == e["parent"] for lab in n["labels"]}
    assert "datasets:/im/1" in calibrated, (calibrated, cli("datasets", "list").out)
    bad = cli("convert", tiny_models("llama"), "--to", "gguf-q4", "--imatrix", tmp_path / "none.txt")
    assert bad.code != 0 and "no such file" in bad.err and len(bad.err.strip().splitlines()) == 1
