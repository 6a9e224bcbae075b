"""The leaderboard page: escaped, offline, and sorted, filtered and switched in a real browser (headless
Chromium), without horizontal overflow at 1400 px."""
from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from bench.config import CONF
from bench.page import render_page
from bench.ranking import BELOW_COLUMNS, KENDALL_COLUMNS, METHOD_COLUMNS, Ranking
from bench.results import UNSUPPORTED_COLUMNS, Results
from bench.tables import SANITY_COLUMNS, Tables, family_rank, overall_rank

EVIL = '<img src=x onerror="alert(1)">'
MEANS = {"alpha": 0.2, "beta": 0.9, EVIL: 0.5, "gamma": float("nan")}
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def _board() -> pd.DataFrame:
    """Two models, four methods, pointing_game/hit (headline) and mprt's spearman (headline) and ssim (not)."""
    rows = [{"dataset": "shapes", "model": model, "method": method, "metric": metric, "score": score,
             "mean": mean * sign, "ci_low": mean * sign - 0.1, "ci_high": mean * sign + 0.1, "n": 8, "n_nan": 0,
             "higher_is_better": hib, "family": family, "headline": headline}
            for model in ("cnn", "resnet") for method, mean in MEANS.items()
            for metric, score, hib, family, headline, sign in [
                ("pointing_game", "hit", True, "localization", True, 1),
                ("mprt", "spearman", False, "randomization", True, -1),
                ("mprt", "ssim", False, "randomization", False, 1)]]
    board = pd.DataFrame(rows)
    board.loc[board["method"].eq("alpha") & board["metric"].eq("pointing_game"), "n_nan"] = 2
    key = board["mean"].where(~board["higher_is_better"], -board["mean"])
    board["rank"] = key.groupby([board["model"], board["metric"], board["score"]]).rank(na_option="bottom")
    return board


def _ranking() -> Ranking:
    """A bench.ranking.Ranking by hand: methods per scope, one method below a control, Kendall tau."""
    rows = []
    for scope in ("overall", "localization", "randomization"):
        for rank, method in enumerate(["beta", EVIL, "alpha", "gamma"], start=1):
            rows.append({"scope": scope, "method": method, "mean_rank": rank + 0.25, "latec_rank": rank + 0.5,
                         "rank": float(rank), "rank_ci_low": float(max(rank - 1, 1)), "rank_ci_high": float(rank + 1),
                         "p_best": 0.7 if rank == 1 else 0.1, "n_columns": 4,
                         "below_control": int(method == "alpha" and scope != "randomization")})
    below = pd.DataFrame({"dataset": ["shapes"], "model": ["cnn"], "method": ["alpha"], "metric": ["pointing_game"],
                          "score": ["hit"], "control": ["random"], "mean": [0.2], "control_mean": [0.31]})
    kendall = pd.DataFrame({"dataset_a": ["shapes"], "model_a": ["cnn"], "dataset_b": ["shapes"], "model_b": ["resnet"],
                            "tau": [1.0], "p_value": [0.083], "n_methods": [4]})
    return Ranking(methods=pd.DataFrame(rows, columns=METHOD_COLUMNS), below_control=below[BELOW_COLUMNS],
                   kendall=kendall[KENDALL_COLUMNS])


def _tables(board: pd.DataFrame, manifests: list[dict], ranking=None) -> Tables:
    """A Tables holding `board`, its ranks and `manifests` (the other tables empty), with `ranking` where given."""
    empty = pd.DataFrame()
    unsupported = pd.DataFrame([{"run_id": m["run_id"], "dataset": m["dataset"], "model": m["model"], **u}
                                for m in manifests for u in m["unsupported"]], columns=UNSUPPORTED_COLUMNS)
    results = Results(scores=empty, curves=empty, meta=empty, failures=empty, manifests=manifests,
                      unsupported=unsupported)                         # as bench.results.load reads the manifests
    sanity = pd.DataFrame([{"dataset": "shapes", "model": "cnn", "method": m, "metric": "mprt", "score": "spearman",
                            "stage": "last", "mean": v, "ci_low": v, "ci_high": v, "n": 8, "n_nan": 0, "threshold": 0.3,
                            "passed": p, "degenerate": d, "verdict": verdict}
                           for m, v, p, d, verdict in [("alpha", 0.1, True, 0.0, "pass"), ("beta", 0.0, False, 0.5, "degenerate")]],
                          columns=SANITY_COLUMNS)
    fields = dict(results=results, board=board, overall=overall_rank(board), families=family_rank(board), ranks=empty,
                  friedman=empty, pairwise=empty, average_ranks=empty, agreement=empty, cost=pd.DataFrame(
                      {"dataset": ["shapes"], "model": ["cnn"], "kind": ["method"], "name": ["alpha"],
                       "seconds": [1.5], "seconds_per_sample": [0.1875]}), sanity=sanity, curves=empty)
    return Tables(**fields, ranking=ranking, notes=["metric <mprt> declares no headline"])


def _manifest(model: str) -> dict:
    return {"run_id": f"shapes-{model}-1", "dataset": "shapes", "model": model, "git_commit": "0123456789abcdef",
            "versions": {"torch": "2.x"}, "config": {"note": "</pre><script>alert(2)</script>",
                                                   "method": {m: {"_target_": "methods.saliency", "_partial_": True}
                                                              for m in MEANS},
                                                   "metric": {"pointing_game": {"_target_": "metrics.pointing_game",
                                                                                "tolerance": 0.0 if model == "cnn" else 1.0},
                                                              "mprt": {"_target_": "metrics.mprt"}}},
            "unsupported": [{"method": "gamma", "metric": "mprt", "reason": "no <layer> to randomize"},
                            {"method": "delta", "metric": "mprt", "reason": "in-place ReLU"},
                            {"method": "delta", "metric": "pointing_game", "reason": "in-place ReLU"},
                            *({"method": m, "metric": "focus", "reason": "needs mosaics"} for m in MEANS)]
            if model == "resnet" else []}


@pytest.fixture
def page(tmp_path: Path) -> Path:
    png = tmp_path / "fig.png"
    png.write_bytes(base64.b64decode(PNG))
    (tmp_path / "scores_shapes_cnn.png").write_bytes(base64.b64decode(PNG))
    tables = _tables(_board(), [_manifest("cnn"), _manifest("resnet")], _ranking())
    path = tmp_path / "leaderboard.html"
    path.write_text(render_page(tables, [png, tmp_path / "scores_shapes_cnn.png"]), encoding="utf-8")
    return path


def test_cards_read_docstrings_from_source_without_importing_methods() -> None:
    """A card whose YAML names no paper (the constant control) takes its paper from the target's docstring:
    read from the source (bench.catalog), as the imported object gives it, without importing methods/
    (captum, zennit, torchvision: seconds) in a report process."""
    code = ("import sys; import pandas as pd; from bench.page import _cards\n"
            "board = pd.DataFrame({'method': ['constant'], 'metric': ['pixel_flipping'], 'score': ['auc'],"
            " 'higher_is_better': [False], 'headline': [True], 'family': ['faithfulness']})\n"
            "m = {'dataset': 'd', 'model': 'm', 'config': {'method': {'constant': {'_target_': 'methods.constant'}},"
            " 'metric': {'pixel_flipping': {'_target_': 'metrics.pixel_flipping'}}}}\n"
            "html = _cards(board, [m])\n"
            "print(sorted({'methods', 'captum', 'zennit'} & set(sys.modules)), 'one big tie' in html)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=CONF.parent)
    assert out.stdout.split() == ["[]", "True"]
    import importlib
    import inspect

    from omegaconf import OmegaConf

    from bench.catalog import _source_docstring
    read = 0
    for group in ("method", "metric"):                               # every target the cards may describe
        for path in sorted((CONF / group).glob("*.yaml")):
            module, _, name = str(OmegaConf.load(path)[path.stem]["_target_"]).rpartition(".")
            doc = _source_docstring(module, name)                    # None: the card imports it (e.g. __doc__ set)
            if doc is not None:
                read += 1
                assert doc == (inspect.getdoc(getattr(importlib.import_module(module), name)) or ""), path.stem
    assert read >= 40


def test_page_escapes_every_text_and_needs_no_network(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert EVIL not in text and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in text
    assert "<script>alert(2)</script>" not in text and "no &lt;layer&gt; to randomize" in text
    assert text.count("<script>") == 1                                  # only the page's own code
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', text)        # nothing loaded from elsewhere
    assert not re.search(r"@import|url\(", text)                        # nor by the style sheet
    assert 'src="data:image/png;base64,' in text


def test_page_holds_ranking_cards_provenance_and_cost(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    overall = text[text.index('id="overall"'):text.index("</table>", text.index('id="overall"'))]
    assert overall.index(">beta<") < overall.index("&lt;img") < overall.index(">alpha<") < overall.index(">gamma<")
    assert "⚠ below a control on 1" in overall and "shapes/cnn pointing_game/hit below random (0.2 vs 0.31)" in overall
    cnn = text[text.index('data-model="cnn"'):text.index('data-model="resnet"')]
    alpha = cnn[cnn.index('<tr data-method="alpha">'):]
    alpha = alpha[:alpha.index("</tr>")]
    assert "rank 3 of 3; n = 8 samples, 2 undefined (NaN, excluded); worse than the control random (0.2 vs 0.31)" \
        in alpha and '0.2<span class="below">▾</span>' in alpha
    gamma = cnn[cnn.index('<tr data-method="gamma">'):]
    assert 'title="undefined on every sample: n = 8 samples">–</td>' in gamma[:gamma.index("</tr>")]
    resnet = text[text.index('data-model="resnet"'):text.index('id="sanity-checks"')]
    delta = resnet[resnet.index('<tr data-method="delta">'):]                # unsupported everywhere: still a row
    assert delta[:delta.index("</tr>")].count('title="unsupported: in-place ReLU">n/a</td>') == 3
    assert "focus unsupported for every method (needs mosaics)" in resnet
    assert "Kendall τ" in text and "0.083" in text
    card = text[text.index('id="metric-pointing_game"'):]
    card = card[:card.index("</article>")]
    assert "Zhang et al. 2016" in card and "hit ↑ (headline)" in card    # paper and description from bench.catalog
    assert "tolerance = 0.0</code> (shapes/cnn)" in card and "tolerance = 1.0</code> (shapes/resnet)" in card
    assert f'href="#method-{"".join(f".{ord(c):x}" if not (c.isalnum() or c in "_-") else c for c in EVIL)}"' in text
    assert "0123456789" in text and "seconds_per_sample" in text and "0.1875" in text
    assert '<ul class="notes"><li>metric &lt;mprt&gt; declares no headline</li></ul>' in text
    assert 'class="pass">pass</td>' in text
    assert 'class="degenerate" title="50% of the samples have a constant map">degenerate</td>' in text
    without = render_page(_tables(_board(), [_manifest("cnn")]), [])
    assert "No ranking across models" in without and "<td" in without


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

    def find(self, xpath: str) -> str:
        found = self.cmd("POST", "/element", {"using": "xpath", "value": xpath})
        assert self.ELEMENT in found, found
        return found[self.ELEMENT]

    def click(self, xpath: str) -> None:
        self.cmd("POST", f"/element/{self.find(xpath)}/click", {})

    def quit(self) -> None:
        self.cmd("DELETE", "")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture
def browser(tmp_path: Path):
    """A headless Chromium at 1400x900 behind chromedriver, quit afterwards."""
    if not (_chromium() and shutil.which("chromedriver")):
        pytest.skip("no headless Chromium + chromedriver (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
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
        driver = _WebDriver(port, tmp_path / "profile")
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        driver_proc.terminate()
        driver_proc.wait(timeout=10)


VISIBLE = ("return Array.from(document.querySelectorAll('section.view:not([hidden]) table.board tbody tr'))"
           ".filter(r => !r.hidden).map(r => r.cells[0].textContent)")


def test_page_sorts_filters_and_switches_views_in_headless_chromium(page: Path, browser: _WebDriver) -> None:
    browser.cmd("POST", "/url", {"url": page.as_uri()})
    view = "return document.querySelector('section.view:not([hidden])').dataset.model"
    assert browser.script(view) == "cnn"                                   # the first view is shown, alone
    assert browser.script("return document.querySelectorAll('section.view:not([hidden])').length") == 1
    assert browser.script(VISIBLE) == ["beta", EVIL, "alpha", "gamma"]     # by overall rank
    hit = "//section[@data-model='cnn']//th[@data-col='pointing_game/hit']/span"
    browser.click(hit)                                                     # ascending
    assert browser.script(VISIBLE) == ["alpha", EVIL, "beta", "gamma"]     # NaN last
    browser.click(hit)                                                     # descending
    assert browser.script(VISIBLE) == ["beta", EVIL, "alpha", "gamma"]
    browser.click("//button[@class='tab'][text()='shapes / resnet']")     # switch views
    assert browser.script(view) == "resnet"
    gamma = "return document.querySelector('section.view:not([hidden]) tr[data-method=gamma] td[title^=unsupported]').title"
    assert browser.script(gamma) == "unsupported: no <layer> to randomize"
    shown = "return Array.from(document.querySelectorAll('section.view:not([hidden]) th[data-col]'))" \
            ".filter(th => th.offsetParent !== null).map(th => th.dataset.col)"
    assert browser.script(shown) == ["mprt/spearman", "pointing_game/hit"]  # headline columns, family order
    browser.click("//input[@id='all-scores']")
    assert browser.script(shown) == ["mprt/spearman", "mprt/ssim", "pointing_game/hit"]
    search = browser.find("//input[@id='filter']")
    browser.cmd("POST", f"/element/{search}/value", {"text": "ph"})
    assert browser.script(VISIBLE) == ["alpha"]                            # filtered in every table
    overall = "return Array.from(document.querySelectorAll('#overall tbody tr')).filter(r => !r.hidden).length"
    assert browser.script(overall) == 1
    browser.click("//section[@data-model='resnet']//td//a[text()='alpha']")   # a name opens its card
    assert browser.script("return location.hash") == "#method-alpha"
    assert browser.script("return document.querySelectorAll('img[alt=fig]')[0].naturalWidth") == 1
    assert browser.script("return document.getElementById('provenance').open") is False
    browser.click("//nav/a[text()='Provenance']")                          # one click unfolds it
    assert browser.script("return document.getElementById('provenance').open") is True


def test_page_fits_1400_px_without_horizontal_overflow(tmp_path: Path, browser: _WebDriver) -> None:
    """Forty headline columns and long names: the tables scroll inside their box, the page does not."""
    board = pd.concat([_board().assign(metric=f"a_rather_long_metric_name_{i}") for i in range(20)], ignore_index=True)
    path = tmp_path / "wide.html"
    path.write_text(render_page(_tables(board, [_manifest("cnn"), _manifest("resnet")], _ranking()), []),
                    encoding="utf-8")
    browser.cmd("POST", "/url", {"url": path.as_uri()})
    assert browser.script("return window.innerWidth") <= 1400
    assert browser.script("return document.documentElement.scrollWidth") <= 1400
    assert browser.script("return document.querySelector('section.view:not([hidden]) .scroll').scrollWidth") > 1400
    shot = base64.b64decode(browser.cmd("GET", "/screenshot"))
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "leaderboard.png").write_bytes(shot)
