"""The report's sanity table (randomization tests, pass/fail) on a hand-written results tree."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from bench.report import format_sanity, write_report
from bench.results import load
from bench.tables import bootstrap_ci, leaderboard, sanity

NAN = np.nan
# metric name -> its config in the run
CONFIG = {"mprt": {"_target_": "metrics.mprt", "order": "cascading_top_down"},
          "mprt_independent": {"_target_": "metrics.mprt", "order": "independent"},
          "rl": {"_target_": "metrics.random_logit"},
          "flip": {"_target_": "metrics.pixel_flipping"}}
# what each metric's YAML declares for the sanity table (`_sanity_`, `_staged_`), as the runner records it in the
# manifest: the table takes its tests from these declarations, never from a name or a hand list
SANITY = ["spearman", "spearman_signed"]
DECLARED = {"mprt": {"sanity": SANITY, "staged": True}, "mprt_independent": {"sanity": SANITY, "staged": True},
            "rl": {"sanity": SANITY, "staged": False}, "flip": {"sanity": [], "staged": False}}
# (metric, score) -> method -> values of samples 0..3
SCORES = {
    ("mprt", "spearman"): {"saliency": [0.1, 0.2, 0.3, NAN], "edge": [1.0] * 4, "grad_cam": [NAN] * 4},
    ("mprt", "spearman@fc"): {"saliency": [0.9] * 4, "edge": [1.0] * 4, "grad_cam": [NAN] * 4},
    ("mprt", "spearman_signed"): {"saliency": [-0.1, 0.1, -0.2, 0.0], "edge": [-0.9] * 4, "grad_cam": [0.5] * 4},
    ("mprt", "ssim"): {"saliency": [0.0] * 4, "edge": [1.0] * 4, "grad_cam": [0.0] * 4},
    ("mprt_independent", "spearman"): {"saliency": [0.5] * 4, "edge": [1.0] * 4, "grad_cam": [0.2] * 4},
    ("rl", "spearman"): {"saliency": [0.25, 0.35, 0.3, 0.3], "edge": [1.0] * 4, "grad_cam": [0.1] * 4},
    ("flip", "auc"): {"saliency": [0.1] * 4, "edge": [0.2] * 4, "grad_cam": [0.3] * 4},
}


def _write_run(root: Path) -> None:
    """One run folder: a manifest with the metrics' configs and one scores cell per (method, metric)."""
    run = root / "shapes" / "cnn"
    (run / "cells").mkdir(parents=True)
    keys = {"run_id": "shapes-cnn-1", "dataset": "shapes", "model": "cnn"}
    cells, meta = [], []
    for metric in CONFIG:
        for method in ("saliency", "edge", "grad_cam"):
            parts = [pd.DataFrame({"sample_id": np.arange(4), "value": np.array(v[method], dtype=np.float64)}).assign(
                **keys, method=method, metric=metric, score=s) for (m, s), v in SCORES.items() if m == metric]
            stem = f"cells/{method}__{metric}"
            pd.concat(parts).to_parquet(run / f"{stem}.scores.parquet")
            cells.append({"method": method, "metric": metric, "scores": f"{stem}.scores.parquet", "curves": None})
    meta = [{"metric": m, "score": s, "higher_is_better": False} for m, s in SCORES]
    manifest = {**keys, "cells": cells, "score_meta": meta, "failures": [], "timings": {},
                "config": {"metric": CONFIG}, "metrics": DECLARED, "model_info": {}}
    (run / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    _write_run(tmp_path)
    return tmp_path


def test_sanity_rows_values_and_verdicts(tree: Path) -> None:
    results = load(tree)
    table = sanity(leaderboard(results, n_boot=200, seed=1), results.manifests, threshold=0.3)
    # cascading mprt and random logit (named "rl") only, ABS and signed: not independent mprt, pixel flipping, ssim
    # or @stages (without `results`, no first stage)
    assert sorted(set(zip(table["metric"], table["score"]))) == [("mprt", "spearman"), ("mprt", "spearman_signed"),
                                                                  ("rl", "spearman")]
    assert (table["stage"] == "last").all()
    signed = table[table.score == "spearman_signed"].set_index("method")
    assert signed.loc["saliency", "mean"] == pytest.approx(-0.05) and signed.loc["saliency", "passed"] is True
    assert signed.loc["edge", "passed"] is False                                         # |-0.9|: not changed
    assert signed.loc["grad_cam", "passed"] is False
    table = table[table.score == "spearman"]
    rows = table.set_index(["metric", "method"])
    assert rows.loc[("mprt", "saliency"), "mean"] == pytest.approx(0.2, abs=1e-15)       # (0.1 + 0.2 + 0.3) / 3
    assert tuple(rows.loc[("mprt", "saliency"), ["n", "n_nan"]]) == (3, 1)
    assert tuple(rows.loc[("mprt", "saliency"), ["ci_low", "ci_high"]]) == bootstrap_ci(
        np.array(SCORES["mprt", "spearman"]["saliency"]), n_boot=200, seed=1)
    assert rows.loc[("rl", "saliency"), "mean"] == pytest.approx(0.3, abs=1e-15)          # not below 0.3
    verdict = rows["passed"].to_dict()
    assert verdict[("mprt", "saliency")] is True and verdict[("rl", "grad_cam")] is True
    assert verdict[("mprt", "edge")] is False and verdict[("rl", "edge")] is False
    assert verdict[("rl", "saliency")] is False                                           # mean == threshold fails
    assert pd.isna(verdict[("mprt", "grad_cam")])                                         # every sample undefined
    assert (table["threshold"] == 0.3).all()
    stricter = sanity(leaderboard(results, n_boot=200, seed=1), results.manifests, threshold=0.15)
    stricter = stricter[stricter.score == "spearman"]
    assert stricter.set_index(["metric", "method"]).loc[("mprt", "saliency"), "passed"] is False
    with pytest.raises(ValueError, match="threshold must be in"):
        sanity(leaderboard(results, n_boot=20), results.manifests, threshold=1.5)


def test_format_sanity_markdown(tree: Path) -> None:
    results = load(tree)
    table = sanity(leaderboard(results, n_boot=200, seed=1), results.manifests, threshold=0.3)
    text = format_sanity(table)
    lo, hi = bootstrap_ci(np.array(SCORES["mprt", "spearman"]["saliency"]), n_boot=200, seed=1)
    assert "pass: |mean| < 0.3" in text and "## shapes / cnn" in text
    assert "| method | mprt ABS | mprt signed | rl ABS |" in text
    assert f"| saliency | 0.2 [{lo:.3g}, {hi:.3g}] pass | -0.05 [" in text and "] pass | 0.3 [" in text
    assert "| edge | 1 [1, 1] fail | -0.9 [-0.9, -0.9] fail | 1 [1, 1] fail |" in text
    assert "| grad_cam | – undefined | 0.5 [0.5, 0.5] fail | 0.1 [0.1, 0.1] pass |" in text
    assert format_sanity(table.iloc[:0]).startswith("No randomization tests")


def test_write_report_writes_sanity_files_and_page_section(tree: Path) -> None:
    out = write_report(tree, n_boot=50, sanity_threshold=0.25)
    csv = pd.read_csv(out / "sanity.csv")
    assert len(csv) == 9 and (csv["threshold"] == 0.25).all()
    assert csv.set_index(["metric", "method"]).loc[("rl", "grad_cam"), "passed"]
    assert (out / "sanity.md").read_text(encoding="utf-8").startswith("Spearman rank correlation")
    page = (out / "leaderboard.html").read_text(encoding="utf-8")
    assert '<table id="sanity">' in page and "|mean| &lt; 0.25" in page
    assert page.count('class="fail">fail</td>') == 5 and page.count('class="undefined">undefined</td>') == 1


def test_sanity_first_stage_from_the_curves(tmp_path: Path) -> None:
    """With the results, cascading MPRT also shows its first stage (the paper's "after the logit layer"), read
    off the stored curves (step 0 and its layer label), ABS and signed."""
    _write_run(tmp_path)
    run = tmp_path / "shapes" / "cnn"
    manifest = json.loads((run / "manifest.json").read_text())
    keys = {"run_id": "shapes-cnn-1", "dataset": "shapes", "model": "cnn", "metric": "mprt"}
    for cell in manifest["cells"]:
        if cell["metric"] == "mprt":
            first = {"saliency": [0.9, 0.7, 0.8, 0.6], "edge": [1.0] * 4, "grad_cam": [NAN] * 4}[cell["method"]]
            curves = pd.concat([pd.DataFrame({"curve": c, "sample_id": np.arange(4), "step": step, "x": step + 1.0,
                                              "x_label": label, "y": np.array(y, dtype=np.float64)})
                                for c, sign in (("spearman", 1), ("spearman_signed", -1))
                                for step, label, y in ((0, "fc", [sign * v for v in first]), (1, "conv", [0.0] * 4))])
            cell["curves"] = cell["scores"].replace(".scores.", ".curves.")
            curves.assign(**keys, method=cell["method"]).to_parquet(run / cell["curves"])
    (run / "manifest.json").write_text(json.dumps(manifest))
    results = load(tmp_path)
    table = sanity(leaderboard(results, n_boot=50), results.manifests, threshold=0.3, results=results, n_boot=50)
    first = table[table.stage == "fc"].set_index(["score", "method"])
    assert first.loc[("spearman", "saliency"), "mean"] == pytest.approx(0.75)
    assert first.loc[("spearman_signed", "saliency"), "mean"] == pytest.approx(-0.75)
    assert first.loc[("spearman", "saliency"), "passed"] is False and pd.isna(first.loc[("spearman", "grad_cam"), "passed"])
    assert set(table.stage) == {"fc", "last"} and len(first) == 6                       # rl has no stages
    assert "mprt ABS @fc" in format_sanity(table)
    cell = next(c for c in manifest["cells"] if (c["method"], c["metric"]) == ("saliency", "mprt"))
    scores = pd.read_parquet(run / cell["scores"])
    extra = scores[scores.score == "spearman"].assign(score="degenerate@fc", value=[1.0, 1.0, 0.0, 0.0])
    pd.concat([scores, extra]).to_parquet(run / cell["scores"])              # half its first-stage pairs degenerate
    results = load(tmp_path)
    table = sanity(leaderboard(results, n_boot=50), results.manifests, threshold=0.3, results=results, n_boot=50)
    rows = table[(table.method == "saliency") & (table.metric == "mprt")].set_index(["stage", "score"])
    assert rows.loc[("fc", "spearman"), "degenerate"] == 0.5 and rows.loc[("fc", "spearman"), "verdict"] == "degenerate"
    assert pd.isna(rows.loc[("last", "spearman"), "degenerate"]) and rows.loc[("last", "spearman"), "verdict"] == "pass"


def test_the_sanity_table_follows_the_declarations_not_the_target(tree: Path) -> None:
    """A metric joins the table by its declaration alone: undeclared mprt stays out, a declared pixel flipping
    score comes in, and a declared score other than Spearman is labelled by its own name."""
    run = tree / "shapes" / "cnn"
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["metrics"] = {**DECLARED, "mprt": {"sanity": [], "staged": False},
                           "flip": {"sanity": ["auc"], "staged": False}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    results = load(tree)
    table = sanity(leaderboard(results, n_boot=20), results.manifests, threshold=0.3, results=results, n_boot=20)
    assert sorted(set(zip(table["metric"], table["score"]))) == [("flip", "auc"), ("rl", "spearman")]
    assert "| method | flip auc | rl ABS |" in format_sanity(table)
    del manifest["metrics"]                                     # an older runner's manifest declares nothing
    (run / "manifest.json").write_text(json.dumps(manifest))
    results = load(tree)
    assert sanity(leaderboard(results, n_boot=20), results.manifests).empty


def test_a_degenerate_map_does_not_pass(tree: Path) -> None:
    """Samples whose pair of maps is degenerate (a constant map: Spearman 0 by convention, the metrics' context
    score `degenerate`) do not count as decorrelated: above `max_degenerate` of a test's samples the verdict is
    "degenerate" and passed False, in the table, the CSV and the Markdown."""
    run = tree / "shapes" / "cnn"
    manifest = json.loads((run / "manifest.json").read_text())
    flags = {("rl", "grad_cam"): [1.0, 0.0, 0.0, 0.0], ("mprt", "saliency"): [0.0, 0.0, 0.0, 1.0],
             ("mprt", "edge"): [1.0] * 4, ("rl", "saliency"): [0.0] * 4}      # grad_cam's mprt: not recorded
    for cell in manifest["cells"]:
        if (cell["metric"], cell["method"]) in flags:
            scores = pd.read_parquet(run / cell["scores"])
            extra = scores[scores.score == scores.score.iloc[0]].assign(
                score="degenerate", value=flags[cell["metric"], cell["method"]])
            pd.concat([scores, extra]).to_parquet(run / cell["scores"])
    manifest["score_meta"] += [{"metric": m, "score": "degenerate", "higher_is_better": False} for m in ("mprt", "rl")]
    (run / "manifest.json").write_text(json.dumps(manifest))
    results = load(tree)
    board = leaderboard(results, n_boot=20)
    assert "degenerate" not in set(board["score"])                                  # a context score: never ranked
    table = sanity(board, results.manifests, threshold=0.3, results=results, n_boot=20)
    rows = table[table.score == "spearman"].set_index(["metric", "method"])
    assert rows.loc[("rl", "grad_cam"), "degenerate"] == 0.25 and rows.loc[("mprt", "saliency"), "degenerate"] == 0.25
    assert rows.loc[("rl", "grad_cam"), "mean"] == pytest.approx(0.1)               # |0.1| < 0.3 would pass ...
    assert rows.loc[("rl", "grad_cam"), "verdict"] == "degenerate" and rows.loc[("rl", "grad_cam"), "passed"] is False
    assert rows.loc[("mprt", "saliency"), "verdict"] == "degenerate"
    assert rows.loc[("mprt", "edge"), "verdict"] == "degenerate"                     # a fail, unmeasured, too
    assert rows.loc[("rl", "saliency"), "verdict"] == "fail" and rows.loc[("rl", "saliency"), "degenerate"] == 0
    assert pd.isna(rows.loc[("mprt", "grad_cam"), "degenerate"]) and pd.isna(rows.loc[("mprt", "grad_cam"), "passed"])
    assert rows.loc[("mprt", "grad_cam"), "verdict"] == "undefined"
    lenient = sanity(board, results.manifests, results=results, n_boot=20, max_degenerate=0.25)  # 0.25 is not above
    lenient = lenient[lenient.score == "spearman"].set_index(["metric", "method"])
    assert lenient.loc[("rl", "grad_cam"), "verdict"] == "pass" and lenient.loc[("rl", "grad_cam"), "passed"] is True
    assert lenient.loc[("mprt", "edge"), "verdict"] == "degenerate"
    assert "| grad_cam | – undefined | 0.5 [0.5, 0.5] fail | 0.1 [0.1, 0.1] degenerate |" in format_sanity(table)
    assert "more than 10% of the samples have a constant map" in format_sanity(table)
    with pytest.raises(ValueError, match=r"max_degenerate must be a fraction of samples in \[0, 1\), got 1"):
        sanity(board, results.manifests, results=results, max_degenerate=1)
    out = write_report(tree, n_boot=20)
    csv = pd.read_csv(out / "sanity.csv").set_index(["metric", "score", "method"])
    assert csv.loc[("rl", "spearman", "grad_cam"), "verdict"] == "degenerate"
    assert not csv.loc[("rl", "spearman", "grad_cam"), "passed"]
