"""The leaderboard page: escaped, offline, and sortable in a real browser (headless Chromium)."""
from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from bench.page import render_page
from bench.report import overall_rank

EVIL = '<img src=x onerror="alert(1)">'
MEANS = {"alpha": 0.2, "beta": 0.9, EVIL: 0.5, "gamma": float("nan")}


def _board() -> pd.DataFrame:
    rows = [{"dataset": "shapes", "model": model, "method": method, "metric": "pointing_game", "score": "hit",
             "mean": mean, "ci_low": mean - 0.1, "ci_high": mean + 0.1, "n": 8, "n_nan": 0, "higher_is_better": True}
            for model in ("cnn", "resnet") for method, mean in MEANS.items()]
    board = pd.DataFrame(rows)
    board["rank"] = board.groupby("model")["mean"].rank(ascending=False, na_option="bottom")
    return board


@pytest.fixture
def page(tmp_path: Path) -> Path:
    board = _board()
    png = tmp_path / "fig.png"
    png.write_bytes(base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="))
    manifests = [{"run_id": "shapes-cnn-1", "config": {"note": "</pre><script>alert(2)</script>"}}]
    path = tmp_path / "leaderboard.html"
    path.write_text(render_page(board, overall_rank(board), [png], manifests), encoding="utf-8")
    return path


def test_page_escapes_every_text_and_needs_no_network(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert EVIL not in text and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in text
    assert "<script>alert(2)</script>" not in text
    assert text.count("<script>") == 1                                  # only the page's own sorting code
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', text)        # nothing loaded from elsewhere
    assert 'src="data:image/png;base64,' in text


class _WebDriver:
    """The few W3C WebDriver commands the test needs, over chromedriver's HTTP API (no client library)."""

    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"      # the W3C web element identifier

    def __init__(self, port: int, profile: Path):
        self.base = f"http://127.0.0.1:{port}"
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,900", f"--user-data-dir={profile}"]
        caps = {"browserName": "chrome", "goog:chromeOptions": {"binary": _chromium(), "args": args}}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.load(r)["value"]

    def cmd(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def script(self, js: str):
        return self.cmd("POST", "/execute/sync", {"script": js, "args": []})

    def click(self, xpath: str) -> None:
        found = self.cmd("POST", "/element", {"using": "xpath", "value": xpath})
        assert self.ELEMENT in found, found
        element = found[self.ELEMENT]
        self.cmd("POST", f"/element/{element}/click", {})

    def quit(self) -> None:
        self.cmd("DELETE", "")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(not (_chromium() and shutil.which("chromedriver")),
                    reason="no headless Chromium + chromedriver (Debian: apt-get install chromium chromium-driver; .ci/run installs them)")
def test_page_sorts_and_filters_in_headless_chromium(page: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    driver_proc = subprocess.Popen([shutil.which("chromedriver"), f"--port={port}"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):                                               # wait for chromedriver to listen
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        browser = _WebDriver(port, tmp_path / "profile")
        try:
            browser.cmd("POST", "/url", {"url": page.as_uri()})
            methods = "return Array.from(document.querySelectorAll('#board tbody tr')).filter(r => !r.hidden).map(r => r.cells[2].textContent)"
            browser.click("//select[@id='model']/option[@value='cnn']")        # filter: one model
            assert len(browser.script(methods)) == 4
            browser.click("//th[starts-with(text(), 'pointing_game/hit')]")    # ascending
            assert browser.script(methods) == ["alpha", EVIL, "beta", "gamma"]  # NaN last
            browser.click("//th[starts-with(text(), 'pointing_game/hit')]")    # descending
            assert browser.script(methods) == ["beta", EVIL, "alpha", "gamma"]
            assert browser.script("return document.querySelectorAll('img[alt=fig]')[0].naturalWidth") == 1
            shot = base64.b64decode(browser.cmd("GET", "/screenshot"))
            assert shot[:8] == b"\x89PNG\r\n\x1a\n"
            (tmp_path / "leaderboard.png").write_bytes(shot)
        finally:
            browser.quit()
    finally:
        driver_proc.terminate()
        driver_proc.wait(timeout=10)
