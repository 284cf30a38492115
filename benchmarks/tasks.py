"""Task accuracy: lm-eval's multiple-choice tasks, scored by lm-eval itself, on any llmops artifact.

lm-eval's task configs, prompts and metrics define the figures: a :class:`TaskSuite` loads
the tasks through lm-eval's ``TaskManager`` (the built-in tasks' configs are lm-eval's own
with their data pointed at local Arrow files, ``task_configs.py``; ``--task-path`` adds a
user's YAML folders) and runs lm-eval's ``evaluate`` with :class:`~.lm_eval_model.RunnerLM`,
whose token requests go to the artifact's runner in a child process. Nothing reaches the
Hugging Face Hub: ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` are set before ``datasets``
is imported.

What comes out per task is lm-eval's aggregate (``acc``, ``acc_norm``, their standard errors,
N) and, per question, the values behind it and the chosen answer, so that two models are
compared on the same questions (``task_stats.paired``). A baseline's per-question results
are cached by its sha256 and everything else that decides them, so benchmarking several
artifacts against one baseline, or the baseline itself, scores it once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmops.benchmarks.runners import RunnerSpec
from llmops.core.errors import LLMOpsError, UsageError
from llmops.core.progress import Reporter, as_reporter
from llmops.core.settings import cache_dir

TASK_CTX = 2048
DEFAULT_TASKS = ("hellaswag", "piqa", "arc_easy")
OUTPUT_TYPES = ("multiple_choice", "loglikelihood")
_OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@dataclass(frozen=True)
class TaskOptions:
    tasks: tuple[str, ...] = DEFAULT_TASKS
    task_paths: tuple[str, ...] = ()
    limit: int | None = None  # the first N questions of each task (lm-eval's --limit); None: all
    num_fewshot: int | None = None  # None: the task's own setting (0 for the built-in tasks)
    ctx: int = TASK_CTX  # longest request fed to a runner; longer ones are cut as lm-eval's hf model cuts them


@dataclass
class TaskResult:
    """One task on one model: lm-eval's aggregate figures and the per-question values behind them."""

    task: str
    output_type: str
    metrics: dict[str, float]
    stderr: dict[str, float]
    n: int
    shots: int
    version: str | None
    config_sha256: str
    split: str
    data_file: str
    data_sha256: str
    primary: str  # acc_norm where the task reports it, else acc: the answer a flip is counted on
    questions: dict[str, dict[str, Any]] = field(default_factory=dict)  # doc_id -> values, answers, lls

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def offline_hub() -> None:
    """No Hub access from this process or its children (read by ``datasets`` when imported)."""
    os.environ.update(_OFFLINE)
    import datasets

    datasets.config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    """lm-eval's informational log lines and its per-task progress bar stay out of the CLI's
    output (llmops' own progress reports the scoring)."""
    import lm_eval.api.task as task_module

    logger = logging.getLogger("lm_eval")
    level, bar = logger.level, task_module.tqdm
    logger.setLevel(logging.ERROR)
    task_module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        logger.setLevel(level)
        task_module.tqdm = bar


class TaskSuite:
    """The tasks of one ``llmops bench`` run: data fetched, configs written, lm-eval's task manager."""

    def __init__(self, opts: TaskOptions, progress: Callable[[str], None] | Reporter | None = None) -> None:
        from llmops.benchmarks.task_configs import BUILTIN, write_configs

        self.opts = opts
        say = as_reporter(progress)
        if not opts.tasks:
            raise UsageError("--tasks names no task")
        if opts.limit is not None and opts.limit < 1:
            raise UsageError("--limit must be at least 1")
        if opts.num_fewshot is not None and opts.num_fewshot < 0:
            raise UsageError("--num-fewshot must be 0 or more")
        paths = [Path(p).expanduser().resolve() for p in opts.task_paths]
        for p in paths:
            if not p.is_dir():
                raise UsageError(f"--task-path {p}: no such folder")
        offline_hub()
        include: list[Path] = []
        wanted = [t for t in opts.tasks if t in BUILTIN]
        if wanted:
            from llmops.core.taskdata import load_task_data

            data = load_task_data(progress=say)
            files = {t: data.root / rel for t, (_, rel) in BUILTIN.items() if (data.root / rel).is_file()}
            for t in wanted:
                if t not in files:
                    data.file(BUILTIN[t][1])  # the one-line error naming the missing file
            include.append(write_configs(cache_dir() / "tasks" / "configs", files))
        self.include = include + paths  # the user's folders last: a task they define wins
        from lm_eval.tasks import TaskManager

        with _quiet_harness():
            self.manager = TaskManager(include_path=[str(p) for p in self.include] or None, include_defaults=False)
        # tasks, not groups or tags: each figure, cache entry and dataset belongs to one task
        unknown = [t for t in opts.tasks if t not in self.manager.all_subtasks]
        if unknown:
            known = ", ".join(sorted(set(BUILTIN) | set(self.manager.all_subtasks)))
            raise UsageError(f"unknown task(s) {', '.join(unknown)}; known: {known} (or add a folder of "
                             "lm-eval task YAMLs with --task-path; groups and tags: name their tasks)")
        self._sha: dict[str, str] = {}
        self._identity: dict[str, dict[str, str]] = {}

    def load(self, tasks: list[str] | None = None) -> dict[str, Any]:
        """lm-eval's task objects, fresh, with the few-shot setting applied as lm-eval's
        ``simple_evaluate`` applies it."""
        from lm_eval.defaults import DEFAULT_OTHER_SEED

        names = list(tasks or self.opts.tasks)
        with _quiet_harness():
            try:
                loaded = self.manager.load(names)
            except Exception as e:  # noqa: BLE001 - a user's YAML can fail in any of datasets' ways
                raise LLMOpsError(f"cannot load the task(s) {', '.join(names)}: "
                                  f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}") from None
        for name, task in loaded["tasks"].items():
            kind = task.get_config("output_type")
            if kind not in OUTPUT_TYPES:
                raise LLMOpsError(f"task {name} is a {kind} task; llmops scores {' and '.join(OUTPUT_TYPES)} tasks")
            if self.opts.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.opts.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
        return loaded

    def identity(self, name: str) -> dict[str, str]:
        """What decides a task's questions and prompts, besides the options: its config's sha256
        (lm-eval's own serialisation, data location left out), the split, the data file and its sha256."""
        if name not in self._identity:
            self._identify(self.load([name]))
        return self._identity[name]

    def _identify(self, loaded: dict[str, Any]) -> None:
        for name, task in loaded["tasks"].items():
            if name in self._identity:
                continue
            split = task.config.test_split if task.has_test_docs() else task.config.validation_split
            data_file = self._data_file(name, task, split)
            cfg = {k: v for k, v in task.config.to_dict().items() if k != "dataset_kwargs"}
            self._identity[name] = {
                "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest(),
                "split": str(split), "data_file": str(data_file), "data_sha256": self.sha256(data_file)}

    def evaluate(self, spec: RunnerSpec, *, tasks: list[str] | None = None,
                 progress: Callable[[str], None] | Reporter | None = None, phase: str = "tasks") -> dict[str, TaskResult]:
        """The tasks (default: all of the suite's) on one model: lm-eval's ``evaluate`` over
        :class:`RunnerLM`, whose requests go to one child job."""
        from llmops.benchmarks.lm_eval_model import RunnerLM
        from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
        from lm_eval.evaluator import evaluate

        loaded = self.load(tasks)
        self._identify(loaded)
        random.seed(DEFAULT_RANDOM_SEED)  # as lm-eval's simple_evaluate seeds before evaluating
        np.random.seed(DEFAULT_OTHER_SEED)
        lm = RunnerLM(spec, max_length=self.opts.ctx, progress=progress, phase=phase)
        with _quiet_harness():
            res = evaluate(lm=lm, task_dict=loaded, limit=self.opts.limit, log_samples=True)
        if res is None:
            raise LLMOpsError("lm-eval returned no results")
        return {name: self._result(name, task, res) for name, task in loaded["tasks"].items()}

    def _result(self, name: str, task: Any, res: dict[str, Any]) -> TaskResult:
        row = res["results"][name]
        metrics = {k.split(",")[0]: float(v) for k, v in row.items() if k.endswith(",none") and "_stderr" not in k
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        stderr = {k.split(",")[0][: -len("_stderr")]: float(v) for k, v in row.items()
                  if k.endswith("_stderr,none") and isinstance(v, (int, float)) and v == v}
        kind = task.get_config("output_type")
        ident = self.identity(name)
        questions = {}
        for s in res.get("samples", {}).get(name, []):
            if s.get("filter") != "none":
                continue
            questions[str(s["doc_id"])] = _question(task, kind, s, metrics)
        return TaskResult(
            task=name, output_type=kind, metrics=metrics, stderr=stderr,
            n=int(res["n-samples"][name]["effective"]), shots=int(res["n-shot"].get(name) or 0),
            version=str(res["versions"].get(name)) if res["versions"].get(name) is not None else None,
            config_sha256=ident["config_sha256"], split=ident["split"], data_file=ident["data_file"],
            data_sha256=ident["data_sha256"], primary="acc_norm" if "acc_norm" in metrics else "acc",
            questions=questions)

    def _data_file(self, name: str, task: Any, split: str) -> Path:
        """The bytes a task's questions come from: its local data file for the split evaluated,
        else (a dataset from the Hub's cache) the split's rows written out as JSON lines."""
        files = (task.config.dataset_kwargs or {}).get("data_files")
        given = files.get(split) if isinstance(files, dict) else None
        if isinstance(given, list) and len(given) == 1:
            given = given[0]
        if isinstance(given, str) and Path(given).is_file():
            return Path(given)
        rows = "".join(json.dumps(r, sort_keys=True, default=str, ensure_ascii=False) + "\n"
                       for r in task.dataset[split]).encode("utf-8")
        digest = hashlib.sha256(rows).hexdigest()
        out = cache_dir() / "tasks" / "exports" / f"{name}-{split}-{digest[:16]}.jsonl"
        if not out.is_file():
            from llmops.core.atomic import write_bytes_atomic

            write_bytes_atomic(out, rows)
        return out

    def sha256(self, path: str | Path) -> str:
        from llmops.core.hashing import sha256_path

        key = str(Path(path).resolve())
        if key not in self._sha:
            self._sha[key] = sha256_path(key)
        return self._sha[key]


def _question(task: Any, kind: str, sample: dict[str, Any], metrics: dict[str, float]) -> dict[str, Any]:
    """What a paired comparison needs of one question: the per-question metric values lm-eval
    computed, the choice each of its ``acc``/``acc_norm`` picked, and the loglikelihoods."""
    resps = [tuple(r) for r in sample["filtered_resps"]]
    values = {m: float(sample[m]) for m in metrics if isinstance(sample.get(m), (int, float))}
    lls = [float(r[0]) for r in resps]
    if kind == "multiple_choice":
        choices = task.doc_to_choice(sample["doc"])
        own = np.asarray(lls[: len(choices)])
        lengths = np.asarray([float(len(c)) for c in choices])
        return {"values": values, "answer": int(np.argmax(own)), "answer_norm": int(np.argmax(own / lengths)),
                "lls": lls}
    return {"values": values, "answer": int(bool(resps[0][1])), "answer_norm": None, "lls": lls}
