"""Shared by the browser tests: start `python app.py` on a free 127.0.0.1 port and drive it in Debian's Chromium
through Playwright (never a browser that Playwright downloads)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(log: Path, extra_env: dict | None = None, start_timeout_s: float = 60, extra_args: list | None = None,
                with_process: bool = False):
    """Yields the URL of a freshly started app (with `with_process`, (url, Popen)); stops it afterwards and fails if
    its log holds a traceback."""
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               **(extra_env or {}))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), *(extra_args or [])], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer within {start_timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield (url, proc) if with_process else url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@contextlib.contextmanager
def browser_page(url: str, timeout_ms: int = 20_000, extra_args: list[str] | None = None):
    """A Chromium page on the app's first screen (1400 x 1000); `extra_args` are added to CHROMIUM_ARGS (e.g. a fake
    microphone)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: run `make test` (it installs the Debian packages).")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + list(extra_args or []))
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(timeout_ms)
        page.goto(url)
        page.get_by_role("heading", name="Chest-CT workstation").wait_for()
        try:
            yield page
        finally:
            browser.close()


def screenshots_dir(tmp_path_factory) -> Path:
    """$CT_SCREENSHOTS when set (to look at them), else a temporary folder."""
    folder = os.environ.get("CT_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)
    return tmp_path_factory.mktemp("screenshots")
