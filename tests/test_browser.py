"""The MLflow UI, in a real headless Chromium, shows what llmops registered: the cockpit.

A tiny model goes the way `make demo` takes SmolLM2 (registered, converted to GGUF with
verification, promoted with a prompt, benchmarked, compared with a plot) and a served version's
requests become traces; then MLflow's own server runs on the store. Chromium runs the UI's
JavaScript and dumps the rendered DOM with a screenshot (kept under test-output/browser/); the
assertions read the rendered text: the version page, the run and its LoggedModel, the Models
tab, the lineage picture and the trade-off plot in the artifact viewer, and the traces.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LLMOPS = str(Path(sys.executable).parent / "llmops")
OUTPUT = Path(os.environ.get("LLMOPS_TEST_OUTPUT", Path(__file__).resolve().parents[1] / "test-output")) / "browser"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--virtual-time-budget=20000", "--window-size=1600,1100"]
QUESTIONS = ("What is 2+2?", "Name a colour.", "Say hi.")

# Requests as `llmops serve` records them (its tracer, through MLflow's own export), for the
# served version's LoggedModel; in a process of its own, as the server's writer is.
TRACES = """
import sys, time
from llmops.app.serving.tracing import RequestRecord, Tracer
from llmops.core.settings import resolve
from llmops.registry import traces
from llmops.registry.store import Store


def main():
    store = Store(resolve()).open()
    model_id = traces.logged_model_for(store, "browser-model", "1")
    tracer = Tracer(store, True, print)
    for i, question in enumerate(sys.argv[1:]):
        t0 = time.perf_counter()
        tracer.request(RequestRecord(
            endpoint="chat.completions", start_ns=time.time_ns(), t_arrival=t0, name="browser-model", version="1",
            alias="production", logged_model_id=model_id, t_acquired=t0, acquired_ms=int(time.time() * 1000) + i,
            t_slot=t0 + 0.001, t_first=t0 + 0.02, t_end=t0 + 0.08, prompt_tokens=12, completion_tokens=8,
            finish_reason="stop", inputs={"messages": [{"role": "user", "content": question}]}, output=f"answer {i}"))
    # done when the writer is done; the bound only stops a stuck one (a busy machine is slow, not stuck)
    assert tracer.flush(600) and tracer.failed == 0, (tracer.unwritten, tracer.failed)
    print(model_id)


if __name__ == "__main__":
    main()
"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed (scripts/install-browser.sh installs it)")
    pytest.skip("chromium is not installed")


class Page:
    """A rendered page: its DOM (scripts and styles dropped) and its visible text."""

    def __init__(self, dom: str) -> None:
        self.dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
        self.text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", self.dom)).replace("\xa0", " "))

    def has(self, *texts: str) -> None:
        for t in texts:
            assert t in self.text, f"{t!r} not on the page: {self.text[:3000]}"

    def images(self) -> list[str]:
        """The ``alt`` texts of the page's images."""
        return re.findall(r'<img[^>]*\balt="([^"]+)"', self.dom)


def _render(browser: str, url: str, profile: Path, screenshot: Path) -> Page:
    """The DOM after the UI's scripts ran, and a screenshot of the same render."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={screenshot}", "--dump-dom",
                        url], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return Page(r.stdout)


def test_the_ui_shows_what_llmops_registered(tmp_path: Path, tiny_models, eval_text_path) -> None:
    browser = _chromium()
    from mlflow import MlflowClient

    from llmops.app.server import port_free, stop, wait_until_up

    store = tmp_path / "store"
    env = {**os.environ, "LLMOPS_STORE": str(store), "LLMOPS_EVAL_TEXT": str(eval_text_path)}
    for var in ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)

    def llmops(*args: str | Path) -> str:
        r = subprocess.run([LLMOPS, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        return r.stdout

    src = tiny_models("llama")
    llmops("models", "register", src, "--name", "browser-src", "--tag", "team=ui-check")
    llmops("convert", "models:/browser-src/1", "--to", "gguf-q8_0", "-o", tmp_path / "tiny-q8.gguf",
           "--register", "browser-model", "--threads", "2")
    llmops("prompts", "add", "browser-prompt", "--template", "Answer briefly: {{question}}", "-m", "first")
    llmops("promote", "browser-model", "1", "--prompt", "prompts:/browser-prompt/1")
    llmops("bench", "models:/browser-model/1", "models:/browser-src/1", "--baseline", "models:/browser-src/1",
           "--metrics", "accuracy,latency", "--chunks", "1", "--runs", "1", "--decode-tokens", "8",
           "--prompt-tokens", "32", "--threads", "2")
    llmops("bench", "compare", "models:/browser-src/1", "models:/browser-model/1", "--plot", tmp_path / "tradeoff.png")
    script = tmp_path / "traces.py"
    script.write_text(TRACES)
    t = subprocess.run([sys.executable, str(script), *QUESTIONS], capture_output=True, text=True, env=env, timeout=300)
    assert t.returncode == 0, t.stderr[-3000:]

    db = f"sqlite:///{store / 'llmops.db'}"
    client = MlflowClient(tracking_uri=db, registry_uri=db)
    exp = client.get_experiment_by_name("llmops").experiment_id
    mv = client.get_model_version("browser-model", "1")
    run_id, model_id = mv.run_id, mv.tags["llmops.logged_model_id"]
    assert t.stdout.strip().splitlines()[-1] == model_id  # the served version's traces hang on its registration's model
    lm = client.get_logged_model(model_id)
    ppl = next(m for m in lm.metrics if m.key == "bench.ppl")
    src_mv = client.get_model_version("browser-src", "1")

    port = next(p for p in range(5700, 5800) if port_free("127.0.0.1", p))
    proc = subprocess.Popen([LLMOPS, "ui", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    profile = tmp_path / "profile"
    try:
        url = f"http://127.0.0.1:{port}/#"
        wait_until_up(f"http://127.0.0.1:{port}", proc, timeout=180)

        # the version: its alias, its tags (identity, the LoggedModel's id) and the link to its LoggedModel
        page = _render(browser, f"{url}/models/browser-model/versions/1", profile, OUTPUT / "model-version.png")
        page.has("Version 1", "Aliases", "production", "Source Run", "convert-browser-model")
        page.has("format", "gguf", "quant", "Q8_0", "sha256", mv.tags["sha256"], "size_bytes", mv.tags["size_bytes"],
                 "llmops.logged_model_id", model_id, "LoggedModel browser-model-v1")
        assert f'href="#/experiments/{exp}/models/{model_id}"' in page.dom

        src_page = _render(browser, f"{url}/models/browser-src/versions/1", profile, OUTPUT / "source-version.png")
        src_page.has("Version 1", "team", "ui-check", src_mv.tags["sha256"], "safetensors", "F32")

        # its registration's run: metrics (verification and benchmark) and the LoggedModel it made
        run = _render(browser, f"{url}/experiments/{exp}/runs/{run_id}", profile, OUTPUT / "run.png")
        run.has("convert-browser-model", "Logged models (1)", "browser-model-v1", "verify.ppl", "bench.ppl",
                "bench.decode_tps", "wikitext-2-raw-test")

        # the LoggedModel: its parameters, its metrics with the dataset each was measured on, its
        # registered version and the prompt it is served with
        model = _render(browser, f"{url}/experiments/{exp}/models/{model_id}", profile, OUTPUT / "logged-model.png")
        model.has("browser-model-v1", "Ready", "Datasets used", f"wikitext-2-raw-test (#{ppl.dataset_digest})",
                  "Model versions", "browser-model", "verify.ppl", "bench.ppl", "bench.kld", "Parameters",
                  "Q8_0", mv.tags["sha256"], "browser-prompt")
        assert ppl.dataset_name == "wikitext-2-raw-test"
        model.has(f"bench.ppl wikitext-2-raw-test (#{ppl.dataset_digest}) convert-browser-model {str(ppl.value)[:6]}")

        # the experiment's Models tab: both versions' LoggedModels, each with its registered version
        models = _render(browser, f"{url}/experiments/{exp}/models", profile, OUTPUT / "models-tab.png")
        models.has("browser-model-v1", "browser-src-v1", "browser-model v1", "browser-src v1")

        # the lineage picture and the trade-off plot, in the artifact viewer
        lineage = _render(browser, f"{url}/experiments/{exp}/runs/{run_id}/artifactPath/lineage/lineage.png",
                          profile, OUTPUT / "lineage.png")
        lineage.has("lineage/lineage.png", "lineage.mmd")
        assert "lineage/lineage.png" in lineage.images()
        mermaid = Path(client.download_artifacts(run_id, "lineage/lineage.mmd", str(tmp_path))).read_text()
        for edge in ("converted_from", "evaluated_on", "uses_prompt"):
            assert f"-->|{edge}|" in mermaid, mermaid
        plot = _render(browser, f"{url}/experiments/{exp}/runs/{run_id}/artifactPath/plots/tradeoff.png",
                       profile, OUTPUT / "tradeoff.png")
        plot.has("plots/tradeoff.png")
        assert "plots/tradeoff.png" in plot.images()

        # the served version's requests: on its LoggedModel's Traces tab, and in the experiment's
        # Traces view with the version each was answered by
        on_model = _render(browser, f"{url}/experiments/{exp}/models/{model_id}/traces", profile,
                           OUTPUT / "logged-model-traces.png")
        on_model.has(*QUESTIONS, "answer 0", "answer 2", "3 of 3")
        traces = _render(browser, f"{url}/experiments/{exp}/traces", profile, OUTPUT / "traces.png")
        traces.has(*QUESTIONS, "llmops.model: browser-model", "llmops.version: 1", "llmops.alias: production",
                   "llmops.status: ok")

        prompt = _render(browser, f"{url}/prompts/browser-prompt", profile, OUTPUT / "prompt.png")
        prompt.has("Answer briefly: {{question}}")
    finally:
        stop(proc)
    for name in ("model-version", "run", "logged-model", "models-tab", "lineage", "tradeoff", "logged-model-traces",
                 "traces"):
        assert (OUTPUT / f"{name}.png").stat().st_size > 10_000, name
