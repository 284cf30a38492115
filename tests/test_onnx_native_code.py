"""An ONNX folder's genai_config.json must not make llmops run native code or reach outside the folder.

onnxruntime-genai dlopen()s a ``custom_ops_library`` named in the folder's config, so a registered
folder that carries a shared library would run its constructors inside ``llmops serve`` or
``llmops bench``. Here a real library whose constructor writes a marker file is compiled with gcc and
planted in a real folder written by the ONNX converter; every ONNX load (the serving engine, the
latency benchmark, the logits runner of accuracy and verification, the ``llmops bench`` command)
must refuse it with one line naming the key, and the marker must never appear. File names that
point outside the folder (absolute, ``..``, a symbolic link out) are refused the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmops.core.errors import LLMOpsError

LLMOPS = str(Path(sys.executable).with_name("llmops"))
KEY = "model.decoder.session_options.custom_ops_library"

LIBRARY_SOURCE = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("constructor ran\n", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, tiny_models: Callable[[str], Path]) -> Path:
    """A tiny llama through our own ONNX converter (int4, CPU), once for the module."""
    from llmops.app.converting import convert

    out = tmp_path_factory.mktemp("onnx-native") / "tiny-int4"
    return Path(convert(tiny_models("llama"), "onnx-int4", out, verify=False, threads=2).output)


def copy_of(converted: Path, dst: Path, edit: Callable[[dict[str, Any]], object] | None = None) -> Path:
    shutil.copytree(converted, dst)
    if edit is not None:
        cfg = dst / "genai_config.json"
        config = json.loads(cfg.read_text())
        edit(config)
        cfg.write_text(json.dumps(config, indent=2))
    return dst


def plant_library(folder: Path, marker: Path, name: str = "libplanted.so") -> Path:
    """Compile a shared library whose constructor writes ``marker`` into ``folder``."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc to build the planted shared library")
    src = folder.parent / f"{folder.name}-planted.c"
    src.write_text(LIBRARY_SOURCE)
    lib = folder / name
    subprocess.run([gcc, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(lib), str(src)], check=True)
    return lib


@pytest.fixture
def planted(converted: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A converted folder carrying the library, named as the decoder's custom-op library."""
    marker = tmp_path / "constructor-ran"

    def edit(config: dict[str, Any]) -> None:
        config["model"]["decoder"]["session_options"]["custom_ops_library"] = "libplanted.so"

    folder = copy_of(converted, tmp_path / "planted", edit)
    plant_library(folder, marker)
    return folder, marker


def one_line(e: pytest.ExceptionInfo[LLMOpsError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_serving_engine_refuses_a_custom_ops_library(planted: tuple[Path, Path]) -> None:
    from llmops.app.serving.engines import OnnxGenaiEngine, open_engine

    folder, marker = planted
    with pytest.raises(LLMOpsError) as e:
        OnnxGenaiEngine(folder, threads=1)
    assert not marker.exists(), "the planted library's constructor ran"
    assert f"genai_config.json: {KEY} loads native code" in one_line(e)
    with pytest.raises(LLMOpsError, match="custom_ops_library loads native code"):
        open_engine(folder, "onnx", n_ctx=64, threads=1, device="cpu")
    assert not marker.exists(), "the planted library's constructor ran"


def test_latency_benchmark_refuses_a_custom_ops_library(planted: tuple[Path, Path], tmp_path: Path) -> None:
    from llmops.benchmarks.latency import measure
    from llmops.benchmarks.runners import RunnerSpec

    folder, marker = planted
    np.save(tmp_path / "prompt.npy", np.arange(1, 9, dtype=np.int32))
    job = {"prompt": str(tmp_path / "prompt.npy"), "decode_tokens": 2, "runs": 1}
    with pytest.raises(LLMOpsError) as e:
        measure(RunnerSpec("onnx", str(folder), threads=1), job)
    assert not marker.exists(), "the planted library's constructor ran"
    assert f"{KEY} loads native code" in one_line(e)


def test_logits_runner_refuses_a_custom_ops_library(planted: tuple[Path, Path]) -> None:
    """Plain onnxruntime ignores the key, but accuracy and verification refuse the folder all the same."""
    from llmops.benchmarks.runner_onnx import OnnxRunner

    folder, marker = planted
    for vocab_only in (True, False):
        with pytest.raises(LLMOpsError) as e:
            OnnxRunner(str(folder), threads=1, vocab_only=vocab_only)
        assert f"{KEY} loads native code" in one_line(e)
    assert not marker.exists()


def test_bench_command_refuses_a_custom_ops_library(planted: tuple[Path, Path], tmp_path: Path,
                                                     eval_text_path: Path) -> None:
    folder, marker = planted
    env = {k: v for k, v in os.environ.items() if k not in ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI")}
    env["LLMOPS_STORE"] = str(tmp_path / "store")
    for metrics in ("latency", "accuracy"):
        r = subprocess.run([LLMOPS, "bench", "run", str(folder), "--eval-text", str(eval_text_path),
                            "--metrics", metrics, "--runs", "1", "--decode-tokens", "2", "--prompt-tokens", "16",
                            "--chunks", "1", "--ctx", "64", "--threads", "1", "--no-record"],
                           capture_output=True, text=True, env=env, timeout=300)
        assert not marker.exists(), f"the planted library's constructor ran ({metrics})"
        assert r.returncode != 0, r.stdout
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, r.stderr
        assert f"{KEY} loads native code" in errors[0]
        assert "Traceback" not in r.stderr


def test_a_repeated_key_cannot_hide_the_library(converted: Path, tmp_path: Path) -> None:
    """onnxruntime-genai acts on every occurrence of a key, Python's json keeps only the last one."""
    from llmops.app.serving.engines import OnnxGenaiEngine

    marker = tmp_path / "constructor-ran"
    folder = copy_of(converted, tmp_path / "repeated")
    plant_library(folder, marker)
    cfg = folder / "genai_config.json"
    text = cfg.read_text()
    first = '"session_options": {'
    assert text.count(first) == 1
    cfg.write_text(text.replace(first, '"session_options": {"custom_ops_library": "libplanted.so"}, ' + first))
    assert "custom_ops_library" not in json.loads(cfg.read_text())["model"]["decoder"]["session_options"]
    with pytest.raises(LLMOpsError) as e:
        OnnxGenaiEngine(folder, threads=1)
    assert not marker.exists(), "the planted library's constructor ran"
    assert "model.decoder.session_options appears more than once" in one_line(e)


def _graph_outside(converted: Path, root: Path) -> Path:
    """A loadable copy of the decoder graph (with its weights) in a folder beside the model folder."""
    outside = root / "outside"
    outside.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(converted / name, outside / name)
    return outside / "model.onnx"


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_a_graph_outside_the_folder_is_refused(converted: Path, tmp_path: Path, how: str) -> None:
    from llmops.app.serving.engines import OnnxGenaiEngine
    from llmops.benchmarks.runner_onnx import OnnxRunner

    graph = _graph_outside(converted, tmp_path)
    name = {"absolute": str(graph), "dotdot": "../outside/model.onnx", "symlink": "linked.onnx"}[how]

    def edit(config: dict[str, Any]) -> None:
        config["model"]["decoder"]["filename"] = name

    folder = copy_of(converted, tmp_path / "model", edit)
    if how == "symlink":
        (folder / "linked.onnx").symlink_to(graph)
    for load in (lambda: OnnxGenaiEngine(folder, threads=1), lambda: OnnxRunner(str(folder), threads=1)):
        with pytest.raises(LLMOpsError) as e:
            load()
        msg = one_line(e)
        assert "genai_config.json: model.decoder.filename " in msg and "refusing to load it" in msg, msg


def test_a_tokenizer_dir_outside_the_folder_is_refused(converted: Path, tmp_path: Path) -> None:
    from llmops.app.serving.engines import OnnxGenaiEngine

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(converted / name, elsewhere / name)
    for value in (str(elsewhere), "../elsewhere"):
        folder = copy_of(converted, tmp_path / f"model-{len(value)}",
                         lambda c, v=value: c["model"].__setitem__("tokenizer_dir", v))
        with pytest.raises(LLMOpsError) as e:
            OnnxGenaiEngine(folder, threads=1)
        assert "genai_config.json: model.tokenizer_dir " in one_line(e)


def test_profiling_files_are_refused(converted: Path, tmp_path: Path) -> None:
    """``enable_profiling`` is a file prefix: onnxruntime would write wherever it points."""
    from llmops.app.serving.engines import OnnxGenaiEngine

    prefix = tmp_path / "profiles" / "run"
    prefix.parent.mkdir()

    def edit(config: dict[str, Any]) -> None:
        config["model"]["decoder"]["session_options"]["enable_profiling"] = str(prefix)

    folder = copy_of(converted, tmp_path / "model", edit)
    with pytest.raises(LLMOpsError) as e:
        engine = OnnxGenaiEngine(folder, threads=1)
        engine.close()
    assert "model.decoder.session_options.enable_profiling writes profiling files" in one_line(e)
    assert list(prefix.parent.iterdir()) == []


def _session_options(edit: Callable[[dict[str, Any]], object]) -> Callable[[dict[str, Any]], object]:
    return lambda config: edit(config["model"]["decoder"]["session_options"])


SO = "model.decoder.session_options"


@pytest.mark.parametrize(("edit", "key", "reason"), [
    (_session_options(lambda so: so["provider_options"].append({"qnn": {"backend_path": "libQnnHtp.so"}})),
     f"{SO}.provider_options[0].qnn", "execution provider llmops does not load"),
    (_session_options(lambda so: so["provider_options"].append({"cuda": {"user_compute_stream": "140000000"}})),
     f"{SO}.provider_options[0].cuda.user_compute_stream", "not a cuda provider option"),
    (_session_options(lambda so: so["provider_options"].append({"cuda": {"gpu_external_alloc": "140000000"}})),
     f"{SO}.provider_options[0].cuda.gpu_external_alloc", "not a cuda provider option"),
    (_session_options(lambda so: so.__setitem__("session.model_external_initializers_file_folder_path", "/")),
     f'{SO}["session.model_external_initializers_file_folder_path"]', "read or write files"),
    (_session_options(lambda so: so.__setitem__("ep.context_file_path", "/tmp/compiled.onnx")),
     f'{SO}["ep.context_file_path"]', "read or write files"),
    (_session_options(lambda so: so.__setitem__("ep.context_enable", "1")),
     f'{SO}["ep.context_enable"]', "read or write files"),
    (lambda c: c["model"]["decoder"].__setitem__("run_options", {"enable_profiling": "run"}),
     "model.decoder.run_options.enable_profiling", "writes profiling files"),
    (lambda c: c["model"].__setitem__("vision", {"session_options": {"custom_ops_library": "libplanted.so"}}),
     "model.vision.session_options.custom_ops_library", "loads native code"),
])
def test_settings_that_load_code_or_touch_files_are_refused(converted: Path, tmp_path: Path, edit: Any, key: str,
                                                             reason: str) -> None:
    from llmops.app.serving.engines import OnnxGenaiEngine

    folder = copy_of(converted, tmp_path / "model", edit)
    with pytest.raises(LLMOpsError) as e:
        OnnxGenaiEngine(folder, threads=1)
    msg = one_line(e)
    assert f"genai_config.json: {key} " in msg and reason in msg and msg.endswith("refusing to load it"), msg


def test_our_converter_output_passes_and_loads(converted: Path, tiny_models: Callable[[str], Path],
                                               tmp_path: Path) -> None:
    """The folders our converter writes (CPU, and CUDA with its provider options) pass the check and run."""
    from llmops.app.converting import convert
    from llmops.app.serving.engines import GenParams, Generation, OnnxGenaiEngine
    from llmops.benchmarks.runner_onnx import OnnxRunner
    from llmops.core.genai_config import check_folder

    assert check_folder(converted)["model"]["decoder"]["filename"] == "model.onnx"
    engine = OnnxGenaiEngine(converted, threads=1)
    out = Generation()
    "".join(engine.generate(engine.text_prompt("hello world"), GenParams(max_tokens=3, temperature=0),
                            threading.Event(), out))
    assert out.finish_reason in ("stop", "length") and out.first_token_at is not None
    engine.close()
    runner = OnnxRunner(str(converted), threads=1)
    assert runner.logits(runner.tokenize("hello world")).shape[1] == runner.vocab_size

    cuda = Path(convert(tiny_models("llama"), "onnx-int4", tmp_path / "cuda", verify=False, threads=2,
                        device="cuda").output)
    so = check_folder(cuda)["model"]["decoder"]["session_options"]
    assert [next(iter(p)) for p in so["provider_options"]] == ["cuda"]
