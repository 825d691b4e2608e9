"""The Gradio preview driven by a real headless Chromium (Debian's ``chromium`` via Playwright).

Starts ``erasekit.preview.app.launch`` on a free loopback port with an Edit file, clicks
"Generate", and checks that the original and the erased image both arrive (decoded by the browser,
non-empty, and different from each other, since the Edit silences every cross-attention value).
The screenshot is saved to ``tests/artifacts/preview.png``. Runs on canvas-mini when it is built,
else on the tiny SD-1 pipeline.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def preview(tmp_path, clip_tokenizer_dir):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    from erasekit.pipelines import Edit, cross_attention_kv
    from erasekit.preview.app import launch

    from conftest import CANVAS, build_tiny

    if (CANVAS / "model_index.json").exists():
        from erasekit.pipelines import load_pipeline

        model, pipe = "canvas-mini", load_pipeline("canvas-mini")
    else:
        model, pipe = "tiny-sd1", build_tiny("sd1", clip_tokenizer_dir)
    keys = {f"unet/{name}.weight": torch.zeros_like(lin.weight)
            for name, lin in cross_attention_kv(pipe.unet).items() if name.endswith("to_v")}
    edit_path = Edit.from_weights(pipe, keys, {"method": "zero-values", "concepts": ["everything"]}).save(
        tmp_path / "edit.safetensors")
    port = _free_port()
    app = launch(host="127.0.0.1", port=port, model=model, edit=str(edit_path), quiet=True, block=False, pipe=pipe)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def test_preview_generates_original_and_erased_in_chromium(preview, tmp_path):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(preview, wait_until="domcontentloaded", timeout=60_000)
            page.locator("#generate").click(timeout=60_000)
            loaded = ("(sel) => { const i = document.querySelector(sel); "
                      "return !!i && i.complete && i.naturalWidth > 0; }")
            for sel in ("#original img", "#erased img"):
                page.wait_for_function(loaded, arg=sel, timeout=90_000)
            srcs = [page.locator(sel).get_attribute("src") for sel in ("#original img", "#erased img")]
            sizes = [page.evaluate("(sel) => document.querySelector(sel).naturalWidth", s)
                     for s in ("#original img", "#erased img")]
            bodies = [page.request.get(s).body() for s in srcs]
            status = page.locator("#status").inner_text()
            page.screenshot(path=str(ARTIFACTS / "preview.png"), full_page=True)
        finally:
            browser.close()
    assert all(size >= 32 for size in sizes), sizes
    assert all(len(b) > 100 for b in bodies)
    assert bodies[0] != bodies[1], "the erased image should differ from the original"
    assert "zero-values" in status
    assert (ARTIFACTS / "preview.png").stat().st_size > 0
