"""The MLflow UI, in a real headless Chromium, shows what llmops registered.

Chromium runs the UI's JavaScript and dumps the rendered DOM (and a screenshot,
kept under test-output/browser/); the assertions read the rendered text.
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
         "--disable-sync", "--no-first-run", "--virtual-time-budget=20000"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed (scripts/install-browser.sh installs it)")
    pytest.skip("chromium is not installed")


def _render(browser: str, url: str, profile: Path, screenshot: Path | None = None) -> str:
    base = [browser, *FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([*base, "--window-size=1400,1000", f"--screenshot={screenshot}", url], capture_output=True,
                       timeout=120)
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom.stdout, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)))


def test_ui_shows_version_alias_tags_and_prompt(tmp_path: Path) -> None:
    browser = _chromium()
    from llmops.app.server import port_free, stop, wait_until_up

    env = {**os.environ, "LLMOPS_STORE": str(tmp_path / "store")}
    for var in ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)

    def llmops(*args: str) -> str:
        r = subprocess.run([LLMOPS, *args], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    blob = tmp_path / "tiny-q4.gguf.bin"
    blob.write_bytes(os.urandom(4096))
    llmops("models", "register", str(blob), "--name", "browser-model", "--tag", "team=ui-check")
    llmops("prompts", "add", "browser-prompt", "--template", "Answer briefly: {{question}}", "-m", "first")
    llmops("promote", "browser-model", "1", "--prompt", "prompts:/browser-prompt/1")
    sha = __import__("hashlib").sha256(blob.read_bytes()).hexdigest()

    port = next(p for p in range(5700, 5800) if port_free("127.0.0.1", p))
    proc = subprocess.Popen([LLMOPS, "ui", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, proc, timeout=180)
        page = _render(browser, f"{url}/#/models/browser-model/versions/1", tmp_path / "profile",
                       OUTPUT / "model-version.png")
        assert "Version 1" in page
        assert "production" in page
        for text in ("format", "sha256", sha, "team", "ui-check", "size_bytes", "4096"):
            assert text in page, text

        prompts = _render(browser, f"{url}/#/prompts", tmp_path / "profile")
        assert "browser-prompt" in prompts
        prompt = _render(browser, f"{url}/#/prompts/browser-prompt", tmp_path / "profile", OUTPUT / "prompt.png")
        assert "Answer briefly: {{question}}" in prompt
    finally:
        stop(proc)
    assert (OUTPUT / "model-version.png").stat().st_size > 10_000
