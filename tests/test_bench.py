"""`llmops bench`: real runners in child processes, results stored with the hardware, compare and plot."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_models) -> dict[str, Path]:
    from llmops.app.converting import convert

    out = tmp_path_factory.mktemp("gguf")
    src = tiny_models("llama")
    return {q: convert(src, f"gguf-{q}", out / f"tiny-{q}.gguf", verify=False).output for q in ("f32", "q8_0")}


def test_bench_measures_and_records(store_env, cli, tiny_models, tiny_gguf, eval_text_path) -> None:
    src = tiny_models("llama")
    assert cli("models", "register", src, "--name", "tiny-src").code == 0
    assert cli("models", "register", tiny_gguf["q8_0"], "--name", "tiny-q8", "--from", "models:/tiny-src/1").code == 0
    r = cli("--json", "bench", "models:/tiny-src/1", "models:/tiny-q8/1", "--baseline", "models:/tiny-src/1",
            "--eval-text", eval_text_path, "--chunks", "2", "--runs", "2", "--decode-tokens", "16",
            "--prompt-tokens", "64", "--threads", "2")
    assert r.code == 0, r.err
    rows = {row["artifact"]: row for row in r.json()["rows"]}
    src_row, q8 = rows["models:/tiny-src/1"], rows["models:/tiny-q8/1"]
    # The source against itself: KL-divergence 0 and full top-1 agreement.
    assert src_row["kld"] == pytest.approx(0.0, abs=1e-6) and src_row["top1"] == 1.0
    assert src_row["backend"] == "torch" and q8["backend"] == "llama.cpp"
    assert 0 < q8["kld"] < 0.05 and q8["top1"] > 0.9
    assert q8["ppl"] == pytest.approx(src_row["ppl"], rel=0.05)
    for row in (src_row, q8):
        for key in ("file_mb", "load_s", "peak_rss_mb", "ttft_ms", "prefill_tps", "decode_tps", "ppl"):
            assert row[key] > 0, key
    assert q8["file_mb"] < src_row["file_mb"]
    # the row reports the median of the 2 timed runs (recorded one by one with the bench run)
    import statistics

    from sqlalchemy import select

    from llmops.registry.tables import Run

    with store_env.store().session() as s:
        recorded = [r.parameters for r in s.scalars(select(Run).where(Run.kind == "bench"))
                    if r.parameters.get("artifact") == "models:/tiny-q8/1"]
    assert len(recorded) == 1
    for key in ("ttft_ms", "prefill_tps", "decode_tps"):
        runs = recorded[0][key]["runs"]
        assert isinstance(q8[key], float) and len(runs) == 2, (key, q8[key], runs)
        assert q8[key] == pytest.approx(statistics.median(runs), rel=1e-12), key

    # Stored: the promotion gates read them, and the version's MLflow run carries them.
    p = cli("--json", "promote", "tiny-q8", "1", "--gate", "kld < 0.05", "--gate", "top1 >= 0.9",
            "--gate", "decode_tps > 0", "--gate", "peak_rss_mb > 0", "--dry-run")
    assert p.code == 0, p.out
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store_env.db_url, registry_uri=store_env.db_url)
    run = client.get_run(client.get_model_version("tiny-q8", "1").run_id)
    assert run.data.metrics["bench.kld"] == pytest.approx(q8["kld"])
    assert run.data.metrics["bench.decode_tps"] == pytest.approx(q8["decode_tps"])
    assert any(i.dataset.name == "wikitext-2-raw-test" for i in run.inputs.dataset_inputs)
    up = cli("--json", "lineage", "models:/tiny-q8/1").json()
    assert {e["relation"] for e in up["edges"]} == {"converted_from", "evaluated_on"}


def test_compare_table_and_plot(store_env, cli, tiny_models, tiny_gguf, eval_text_path, tmp_path) -> None:
    measured = {}
    for name, path in (("cmp-f32", tiny_gguf["f32"]), ("cmp-q8", tiny_gguf["q8_0"])):
        assert cli("models", "register", path, "--name", name).code == 0
        r = cli("--json", "bench", f"models:/{name}/1", "--eval-text", eval_text_path, "--chunks", "2",
                "--metrics", "accuracy")
        assert r.code == 0, r.err
        measured[name] = r.json()["rows"][0]["ppl"]
    plot = tmp_path / "tradeoff.png"
    r = cli("--json", "bench", "compare", "models:/cmp-f32/1", "models:/cmp-q8/1", "--plot", plot)
    assert r.code == 0, r.err
    d = r.json()
    assert [row["ref"] for row in d["rows"]] == ["models:/cmp-f32/1", "models:/cmp-q8/1"]
    # dPPL% of each row against the first REF, from the perplexities the two bench runs measured
    assert [row["ppl"] for row in d["rows"]] == pytest.approx([measured["cmp-f32"], measured["cmp-q8"]], rel=1e-12)
    want = 100.0 * (measured["cmp-q8"] / measured["cmp-f32"] - 1.0)
    assert want != 0.0  # Q8_0 is lossy: an f32 and a q8_0 file never score the same perplexity
    assert d["rows"][0]["dppl_pct"] == 0.0 and d["rows"][1]["dppl_pct"] == pytest.approx(want, rel=1e-9)
    text = cli("bench", "compare", "models:/cmp-f32/1", "models:/cmp-q8/1")
    assert text.code == 0, text.err
    assert f"{want:+.2f}" in text.out.splitlines()[3].split(), text.out
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store_env.db_url, registry_uri=store_env.db_url)
    mv = client.get_model_version("cmp-q8", "1")
    assert "plots/tradeoff.png" in [a.path for a in client.list_artifacts(mv.run_id, "plots")]


def test_a_crashing_runner_is_one_line_and_nonzero(cli, tmp_path, tiny_gguf, monkeypatch) -> None:
    """The runner runs out of memory (capped at 2 MiB for the model) in its child: llama.cpp fails to
    load or crashes outright; either way the CLI survives and names the artifact in one line."""
    import os

    from llmops.benchmarks.jobs import MAX_MEMORY_ENV

    r = cli("bench", tiny_gguf["f32"], "--no-record", "--metrics", "memory", "--max-memory", "2")
    assert MAX_MEMORY_ENV not in os.environ  # the cap applied to that run's runners only
    assert r.code == 1
    errors = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tiny-f32.gguf" in errors[0], r.err
    assert "runner" in errors[0]


def test_a_truncated_artifact_is_one_line_and_nonzero(cli, tmp_path, tiny_gguf) -> None:
    broken = tmp_path / "broken.gguf"
    data = tiny_gguf["q8_0"].read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    r = cli("bench", broken, "--no-record", "--metrics", "memory")
    assert r.code == 1
    errors = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.gguf" in errors[0], r.err


def test_bad_bench_arguments(cli, tmp_path) -> None:
    assert cli("bench", tmp_path / "missing.gguf", "--no-record").code == 2
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    assert cli("bench", f, "--metrics", "speed", "--no-record").code == 2


def test_pareto_front() -> None:
    from llmops.benchmarks.bench import pareto_front

    # (size, ppl): the 3rd is dominated by the 2nd (bigger and worse).
    assert pareto_front([(100, 30.0), (200, 29.0), (300, 29.5), (500, 28.8)]) == [0, 1, 3]


def test_scored_positions_equal_the_full_logits(tiny_gguf, tiny_models) -> None:
    """Asking a runner for positions first..last-1 only (llama.cpp then skips the output projection
    elsewhere, transformers through logits_to_keep) gives exactly those rows of the full logits."""
    import numpy as np

    from llmops.benchmarks.runner_llamacpp import LlamaCppRunner

    from llmops.benchmarks.runner_torch import TorchRunner

    gg = LlamaCppRunner(str(tiny_gguf["f32"]), n_ctx=64, threads=2)
    tokens = gg.tokenize("The quick brown fox jumps over the lazy dog. " * 8)[:48]
    assert len(tokens) == 48
    for runner, tol in ((gg, 1e-4), (TorchRunner(str(tiny_models("llama")), threads=2), 1e-5)):
        full = runner.logits(tokens)
        part = runner.logits(tokens, 24, 47)
        assert part.shape == (23, runner.vocab_size) and full.shape == (48, runner.vocab_size)
        np.testing.assert_allclose(part, full[24:47], rtol=0, atol=tol * float(np.abs(full).max()))


def test_perplexity_without_a_baseline_equals_with_one(tiny_gguf, tiny_models, eval_text_path) -> None:
    """Without a baseline the runner's process sends back only NLLs; with one, both models' logits
    come back through files and the NLL is computed here: the same perplexity either way."""
    from llmops.benchmarks.accuracy import evaluate

    text = eval_text_path.read_text(encoding="utf-8")[:100_000]
    alone = evaluate(tiny_gguf["q8_0"], text, chunks=2, n_ctx=128, threads=2)
    compared = evaluate(tiny_gguf["q8_0"], text, source=tiny_models("llama"), chunks=2, n_ctx=128, threads=2)
    assert alone["kld"] is None and compared["kld"] is not None
    assert alone["tokens"] == compared["tokens"] == 2 * (128 - 64 - 1)
    assert alone["ppl_output"] == pytest.approx(compared["ppl_output"], rel=1e-9)


def test_decode_follows_the_greedy_token(tiny_gguf) -> None:
    """The latency runner feeds back the argmax of the last position's logits, not a stale row."""
    from llmops.benchmarks.latency import _LlamaCpp
    from llmops.benchmarks.runners import RunnerSpec

    lat = _LlamaCpp(RunnerSpec("llama.cpp", str(tiny_gguf["f32"]), threads=2), n_ctx=64)
    prompt = lat.r.tokenize("Once upon a time, in a land far away, there lived")
    lat.llm.reset()
    lat.llm.eval(prompt.tolist())
    got = lat._next()
    want = int(lat.r.logits(prompt)[-1].argmax())
    assert want != 0  # token 0 is what an unread (all-zero) row would give
    assert got == want


def test_runner_is_chosen_by_magic_not_name(tiny_gguf, tmp_path) -> None:
    import shutil

    from llmops.benchmarks.runners import backend_for

    renamed = tmp_path / "weights.bin"
    shutil.copyfile(tiny_gguf["q8_0"], renamed)
    assert backend_for(renamed) == "llama.cpp"
    assert backend_for(tiny_gguf["q8_0"]) == "llama.cpp"


@pytest.mark.slow
def test_smollm2_perplexity_agrees_between_llama_cpp_and_torch(tmp_path, eval_text_path) -> None:
    """F32 GGUF through llama.cpp and the fp32 checkpoint through torch: within 0.05 (28.80 here)."""
    from llmops.benchmarks.accuracy import evaluate
    from llmops.app.converting import convert
    from llmops.core.evaltext import load_eval_text
    from llmops.app.fixtures import smollm2_checkpoint

    src = smollm2_checkpoint()
    text = load_eval_text(eval_text_path).text
    gguf = convert(src, "gguf-f32", tmp_path / "f32.gguf", verify=False).output
    torch_ppl = evaluate(src, text, chunks=16)["ppl_output"]
    gguf_ppl = evaluate(gguf, text, chunks=16)["ppl_output"]
    print(f"PPL torch fp32 {torch_ppl:.3f}, llama.cpp F32 {gguf_ppl:.3f}")
    assert torch_ppl == pytest.approx(28.80, abs=0.05)
    assert gguf_ppl == pytest.approx(torch_ppl, abs=0.05)


def test_compare_table_names_the_aliases_a_version_holds() -> None:
    from llmops.app.cli.convert_cmds import _bench_table

    rows = [{"label": "m/1", "format": "safetensors", "ppl": 10.0, "aliases": []},
            {"label": "m/2", "format": "gguf", "quant": "Q4_K_M", "ppl": 11.0, "dppl_pct": 10.0,
             "aliases": ["production", "canary"]}]
    lines = _bench_table(rows, against_first=True).splitlines()
    first = next(line for line in lines if "m/1" in line)
    second = next(line for line in lines if "m/2" in line)
    assert "@" not in first
    assert "m/2 @production @canary" in second and "+10.00" in second
