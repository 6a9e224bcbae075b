"""Tests for bench.report on a hand-written results tree with known numbers."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from bench import store
from bench.report import format_latex, format_leaderboard, main, write_report
from bench.results import load
from bench.tables import bootstrap_ci, family_rank, leaderboard, overall_rank, summarise, wide_ranks

NAN = np.nan
# run 1: (shapes, cnn); per method and score, the values of samples 0..3
SCORES = {
    ("flip", "auc"): {"alpha": [0.1, 0.2, 0.3, 0.4], "beta": [0.5] * 4, "gamma": [0.2, 0.3, 0.2, 0.3]},
    ("flip", "aopc"): {"alpha": [0.9, 0.8, 0.7, 0.6], "beta": [0.1, 0.2, 0.3, 0.4], "gamma": [0.5] * 4},
    ("point", "hit"): {"alpha": [1.0, 0.0, NAN, 1.0], "beta": [0.0, 0.0, 0.0, 1.0], "gamma": [1.0] * 4},
    ("mprt", "spearman"): {"alpha": [0.2] * 4, "beta": [0.8] * 4, "gamma": [0.5] * 4},
    ("mprt", "spearman@conv1"): {"alpha": [0.1] * 4, "beta": [0.9] * 4, "gamma": [0.4] * 4},
}
META = [{"metric": "flip", "score": "auc", "higher_is_better": False},
        {"metric": "flip", "score": "aopc", "higher_is_better": True},
        {"metric": "point", "score": "hit", "higher_is_better": True},
        {"metric": "mprt", "score": "spearman", "higher_is_better": False},
        {"metric": "mprt", "score": "spearman@conv1", "higher_is_better": False}]
CURVES = {"flip": ("curve", [0.0, 0.5, 1.0], ["", "", ""]), "mprt": ("spearman", [1.0, 2.0], ["conv1", "fc"])}


def _frame(keys: dict[str, str], rows: dict[str, list]) -> pd.DataFrame:
    """A cell table with categorical string keys, as the store writes them."""
    df = pd.DataFrame(rows).assign(**keys)
    return df.astype({k: "category" for k in keys})


def _write_run(root: Path, run_id: str, model: str, scores: dict, *, meta: list[dict] = META,
               failures: tuple[dict, ...] = ()) -> Path:
    """Write one run folder with a manifest listing one cell per (method, metric)."""
    run = root / "sweep" / run_id
    (run / "cells").mkdir(parents=True)
    keys = {"run_id": run_id, "dataset": "shapes", "model": model}
    cells = []
    for metric in dict.fromkeys(m for m, _ in scores):
        for method in scores[next(k for k in scores if k[0] == metric)]:
            stem = f"cells/{method}__{metric}"
            rows = [_frame({**keys, "method": method, "metric": metric, "score": s},
                           {"sample_id": np.arange(4), "value": np.array(v[method], dtype=np.float64)})
                    for (m, s), v in scores.items() if m == metric]
            pd.concat(rows).to_parquet(run / f"{stem}.scores.parquet")
            cell = {"method": method, "metric": metric, "scores": f"{stem}.scores.parquet", "curves": None}
            if metric in CURVES:
                name, x, labels = CURVES[metric]
                y = np.arange(4 * len(x), dtype=np.float64).reshape(4, len(x))   # (samples, steps)
                curve = {"sample_id": np.repeat(np.arange(4), len(x)), "step": np.tile(np.arange(len(x)), 4),
                         "x": np.tile(x, 4), "x_label": np.tile(labels, 4), "y": y.ravel()}
                _frame({**keys, "method": method, "metric": metric, "curve": name}, curve).to_parquet(
                    run / f"{stem}.curves.parquet")
                cell["curves"] = f"{stem}.curves.parquet"
            cells.append(cell)
    manifest = {**keys, "cells": cells, "score_meta": meta, "failures": list(failures),
                "metrics": {"flip": {"sanity": [], "staged": False, "headline": "aopc"}} if ("flip", "aopc") in scores
                else {},                                                             # flip's headline, as its YAML
                "timings": {}, "model_info": {"test_accuracy": 0.9}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    run = _write_run(tmp_path, "shapes-cnn-1", "cnn", SCORES)
    stale = pd.read_parquet(run / "cells/alpha__flip.scores.parquet").assign(value=99.0)
    stale.to_parquet(run / "cells/alpha__flip__old.scores.parquet")   # not in the manifest: ignored
    flip = {k: {m: v[m] for m in ("alpha", "beta")} for k, v in SCORES.items() if k[0] == "flip"}
    failure = {"method": "gamma", "metric": None, "error": "ValueError: no conv layer"}
    _write_run(tmp_path, "shapes-mlp-2", "mlp", flip, meta=META[:2], failures=(failure,))
    return tmp_path


def test_load_reads_exactly_the_listed_cells(tree: Path) -> None:
    results = load(tree)
    assert len(results.manifests) == 2
    assert len(results.scores) == 4 * (3 * 5 + 2 * 2)
    assert results.scores["value"].max() < 99.0
    assert results.scores["value"].isna().sum() == 1
    assert len(results.curves) == 4 * (3 * 3 + 3 * 2 + 2 * 3)
    assert sorted(results.meta["score"]) == sorted(m["score"] for m in META)
    assert results.failures.to_dict("records") == [{"run_id": "shapes-mlp-2", "dataset": "shapes", "model": "mlp",
                                                     "method": "gamma", "metric": None, "sample_id": None,
                                                     "stage": None, "error": "ValueError: no conv layer"}]
    assert list(results.failures.columns) == store.FAILURE_COLUMNS          # the one failure schema


def test_load_rejects_conflicting_directions_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="python -m bench"):
        load(tmp_path)
    flipped = [{**META[0], "higher_is_better": True}]
    _write_run(tmp_path, "a", "cnn", {("flip", "auc"): SCORES[("flip", "auc")]}, meta=META[:1])
    _write_run(tmp_path, "b", "mlp", {("flip", "auc"): SCORES[("flip", "auc")]}, meta=flipped)
    with pytest.raises(ValueError, match="flip/auc"):
        load(tmp_path)


def test_leaderboard_means_nan_counts_and_ranks(tree: Path) -> None:
    board = leaderboard(load(tree), n_boot=200, seed=1)
    assert not board["score"].str.contains("@").any() and not board["score"].str.endswith("_std").any()
    cnn = board[board["model"] == "cnn"].set_index(["metric", "score", "method"])
    for (metric, score), values in SCORES.items():
        if "@" in score or score.endswith("_std"):
            continue
        for method, v in values.items():
            row = cnn.loc[(metric, score, method)]
            finite = [x for x in v if x == x]
            assert row["mean"] == pytest.approx(sum(finite) / len(finite), abs=1e-15)
            assert (row["n"], row["n_nan"]) == (len(finite), 4 - len(finite))
            assert (row["ci_low"], row["ci_high"]) == bootstrap_ci(np.array(v), n_boot=200, seed=1)
    ranks = cnn["rank"].unstack("method")
    assert ranks.loc[("flip", "auc")].to_dict() == {"alpha": 1.5, "beta": 3.0, "gamma": 1.5}   # lower is better, tie
    assert ranks.loc[("flip", "aopc")].to_dict() == {"alpha": 1.0, "beta": 3.0, "gamma": 2.0}
    assert ranks.loc[("point", "hit")].to_dict() == {"alpha": 2.0, "beta": 3.0, "gamma": 1.0}
    assert ranks.loc[("mprt", "spearman")].to_dict() == {"alpha": 1.0, "beta": 3.0, "gamma": 2.0}
    overall = overall_rank(board).set_index(["model", "method"])
    assert overall.loc["cnn", "mean_rank"].to_dict() == pytest.approx({"alpha": 4 / 3, "beta": 3.0, "gamma": 5 / 3})
    assert overall.loc["cnn", "rank"].to_dict() == {"alpha": 1.0, "beta": 3.0, "gamma": 2.0}
    assert overall.loc["mlp", "rank"].to_dict() == {"alpha": 1.0, "beta": 2.0}


def test_bootstrap_ci_matches_a_loop_reference() -> None:
    v = np.random.default_rng(7).normal(size=40)
    v[[3, 11]] = np.nan
    finite = v[np.isfinite(v)]
    idx = np.random.default_rng(5).integers(0, finite.size, size=(300, finite.size))
    means = [np.mean(finite[i]) for i in idx]   # one resample at a time, straight from the definition
    expected = np.quantile(means, [0.05, 0.95])
    assert np.allclose(bootstrap_ci(v, n_boot=300, level=0.9, seed=5), expected, rtol=0, atol=1e-12)


def test_summarise_gives_bootstrap_ci_of_every_group_exactly() -> None:
    """summarise resamples all groups of one size together (one draw per size): the same numbers, to the bit, as
    bootstrap_ci per group; groups of 0 or 1 finite values get NaN, constant groups their value."""
    rng = np.random.default_rng(1)
    parts = []
    for g in range(40):
        v = rng.normal(size=int(rng.integers(0, 30)))
        v[rng.random(v.size) < 0.2] = np.nan
        parts.append(pd.DataFrame({"key": f"k{g % 3}", "group": g, "value": np.full(v.size, 2.5) if g % 7 == 0 else v}))
    df = pd.concat(parts).astype({"key": "category"})
    out = summarise(df, ["key", "group"], value="value", n_boot=200, seed=3)
    expected = [bootstrap_ci(g.to_numpy(), n_boot=200, seed=3)
                for _, g in df.groupby(["key", "group"], sort=True, observed=True)["value"]]
    np.testing.assert_array_equal(out[["ci_low", "ci_high"]].to_numpy(), np.array(expected))
    assert out["ci_low"].isna().any() and (out.loc[out["group"] % 7 == 0, "ci_low"].dropna() == 2.5).all()


def test_bootstrap_ci_properties() -> None:
    v = np.random.default_rng(0).exponential(size=30)
    low, high = bootstrap_ci(v, seed=3)
    assert low < v.mean() < high
    assert bootstrap_ci(v, seed=3) == (low, high)
    assert bootstrap_ci(v, seed=4) != (low, high)
    assert bootstrap_ci(np.full(7, 0.1)) == (0.1, 0.1)
    assert np.isnan(bootstrap_ci(np.array([1.0, np.nan]))).all()
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(v, level=95)


def test_format_leaderboard_bolds_the_best(tree: Path) -> None:
    text = format_leaderboard(leaderboard(load(tree), n_boot=100))
    cnn = text.split("## shapes / mlp")[0]
    assert "## shapes / cnn" in cnn and "flip/auc (↓)" in cnn and "flip/aopc (↑)" in cnn
    rows = [line for line in cnn.splitlines() if line.startswith("| ") and "method" not in line and "---" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| alpha", "| gamma", "| beta"]
    assert rows[0].count("**") == 2 * 3 and rows[1].count("**") == 2 * 2   # auc tie: both bold
    assert "**0.75 [" in rows[0] and rows[0].endswith("| 1.33 |")     # (1 + 2 + 1) / 3: flip counts once (aopc)
    assert "n = 4 samples per cell; 1 NaN values" in cnn and "alpha point/hit: 1" in cnn
    assert "spearman@" not in text


def test_leaderboard_md_marks_headline_columns_and_unsupported_cells(tree: Path) -> None:
    results = load(tree)
    board = leaderboard(results, n_boot=20)
    board = board[board["model"].eq("cnn") & ~(board["method"].eq("beta") & board["metric"].eq("point"))]
    unsupported = pd.DataFrame({"run_id": "shapes-cnn-1", "dataset": "shapes", "model": ["cnn", "cnn", "cnn", "mlp"],
                                "method": ["beta", "delta", "delta", "alpha"], "metric": ["point", "flip", "mprt", "flip"],
                                "reason": ["no mask", "in-place ReLU", "in-place ReLU", "other model"]})
    lines = format_leaderboard(board, unsupported).splitlines()
    header = [c.strip().split(" · ")[-1] for c in next(l for l in lines if l.startswith("| method")).strip("|").split("|")]
    # flip's headline is aopc (its manifest says so), point and mprt have one score each: marked, auc not
    assert [c for c in header if c.endswith(" *")] == ["flip/aopc (↑) *", "mprt/spearman (↓) *", "point/hit (↑) *"]
    assert "flip/auc (↓)" in header
    assert "Columns ending in * are each metric's headline score, the one the mean ranks count." in lines
    cells = {row[0]: row[1:] for row in ([c.strip() for c in line.strip("|").split("|")] for line in lines
                                         if line.startswith("| "))}
    point = header.index("point/hit (↑) *") - 1
    assert cells["beta"][point] == "n/a" and cells["beta"].count("n/a") == 1          # the unsupported cell only
    assert cells["alpha"].count("n/a") == 0                                           # mlp's cell: another table
    # a method unsupported on every metric it was asked for: a row after the ranked ones, n/a where it could
    # not run, – where it has no cell and no rank
    assert list(cells)[-1] == "delta" and cells["delta"] == ["n/a", "n/a", "n/a", "–", "–", "–"]
    assert "n/a" not in format_leaderboard(board)                                     # none without the table


def test_write_report_writes_files(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = write_report(tree, n_boot=50)
    assert out == tree / "report"
    names = {"leaderboard.csv", "overall_rank.csv", "leaderboard.md", "failures.csv",
             "curves_flip_curve.png", "curves_mprt_spearman.png", "leaderboard.tex", "leaderboard.parquet",
             "significance.csv", "pairwise.csv", "agreement.csv", "cost.csv", "sanity.csv", "sanity.md"}
    names |= {"ranking.csv", "kendall.csv", "below_control.csv", "sanity.tex"} | {
        f"{table}.{ext}" for table in ("ranking", "kendall", "significance", "agreement") for ext in ("md", "tex")}
    names |= {f"{kind}_shapes_{model}.png" for kind in ("scores", "ranks", "agreement", "cd") for model in ("cnn", "mlp")}
    names |= {"leaderboard.html"}                                 # PNG only: PDF twins are opt-in (pdf=True)
    assert {p.name for p in out.iterdir()} == names   # no temporary files left behind
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pd.read_csv(out / "leaderboard.csv")) == 3 * 4 + 2 * 2
    wide = pd.read_csv(out / "overall_rank.csv")
    assert list(wide.columns[:5]) == ["dataset", "model", "method", "mean_rank", "rank"]
    assert "**" in (out / "leaderboard.md").read_text(encoding="utf-8")
    assert "report written to" in capsys.readouterr().out


def test_pdf_twins_on_demand_and_figures_of_earlier_reports_removed(tree: Path) -> None:
    """pdf=True adds a PDF twin of every PNG; the next report (PNG only, one model less in the store) removes the
    twins and the figures of the model no longer there, and nothing a report does not write."""
    out = write_report(tree, n_boot=20, pdf=True)
    pngs = {p.stem for p in out.glob("*.png")}
    assert pngs and pngs == {p.stem for p in out.glob("*.pdf")}
    assert (out / "cd_shapes_mlp.pdf").read_bytes()[:5] == b"%PDF-"
    mine = [out / "notes.txt", out / "my_plot.png", out / "scores.pdf"]     # not named as a report's figures
    for p in mine:
        p.write_text("keep me")
    for p in (tree / "sweep" / "shapes-mlp-2").iterdir():                   # the mlp run leaves the store
        p.unlink() if p.is_file() else None
    (tree / "sweep" / "shapes-mlp-2" / "cells").rename(tree / "cells_of_mlp")
    write_report(tree, n_boot=20)
    assert not list(out.glob("*.pdf")) or {p.name for p in out.glob("*.pdf")} == {"scores.pdf"}
    assert not list(out.glob("*mlp*")) and (out / "scores_shapes_cnn.png").exists()
    assert all(p.read_text() == "keep me" for p in mine)


def test_main_on_an_empty_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no manifest.json" in err and "python -m bench" in err and "Traceback" not in err


def test_pointing_game_class_mean_row(tmp_path: Path) -> None:
    """The pointing game's papers (Zhang et al. 2018, TorchRay) report the mean over classes of each class's hit
    rate: the leaderboard adds hit_class_mean beside the sample mean, from the run's samples table. Class 0 has
    three samples, class 1 one: alpha hits [1, 1, 1 | 0] -> sample mean 0.75, class mean (1 + 0) / 2 = 0.5;
    beta [0, 1, NaN | 1] -> sample mean 2/3, class mean (0.5 + 1) / 2 = 0.75 (NaN skipped, as TorchRay)."""
    scores = {("pg", "hit"): {"alpha": [1.0, 1.0, 1.0, 0.0], "beta": [0.0, 1.0, NAN, 1.0]}}
    run = _write_run(tmp_path, "shapes-cnn-1", "cnn", scores, meta=[{"metric": "pg", "score": "hit",
                                                                      "higher_is_better": True}])
    manifest = json.loads((run / "manifest.json").read_text())
    manifest |= {"config": {"metric": {"pg": {"_target_": "metrics.pointing_game"}}}, "samples": "samples.parquet"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    pd.DataFrame({"sample_id": np.arange(4), "target": [0, 0, 0, 1]}).to_parquet(run / "samples.parquet")
    board = leaderboard(load(tmp_path), n_boot=200, seed=0).set_index(["method", "score"])
    assert board.loc[("alpha", "hit"), "mean"] == pytest.approx(0.75)
    assert board.loc[("alpha", "hit_class_mean"), "mean"] == pytest.approx(0.5)
    assert board.loc[("beta", "hit"), "mean"] == pytest.approx(2 / 3)
    assert board.loc[("beta", "hit_class_mean"), "mean"] == pytest.approx(0.75)
    assert tuple(board.loc[("beta", "hit_class_mean"), ["n", "n_nan"]]) == (3, 1)
    assert board.loc[("beta", "hit_class_mean"), "higher_is_better"] == True              # noqa: E712
    assert board.loc[("beta", "hit_class_mean"), "rank"] == 1.0                           # 0.75 > 0.5
    low, high = board.loc[("alpha", "hit_class_mean"), ["ci_low", "ci_high"]]
    assert 0.0 <= low <= 0.5 <= high <= 1.0


def test_spread_of_repeated_draws_is_not_ranked(tmp_path: Path) -> None:
    """`<score>_std` (the sd over a randomization test's repeated draws) describes a score: stored, not a
    leaderboard column."""
    scores = {("mprt", "spearman"): SCORES["mprt", "spearman"],
              ("mprt", "spearman_std"): {"alpha": [0.05] * 4, "beta": [0.01] * 4, "gamma": [0.02] * 4}}
    _write_run(tmp_path, "shapes-cnn-1", "cnn", scores,
               meta=[META[3], {"metric": "mprt", "score": "spearman_std", "higher_is_better": False}])
    results = load(tmp_path)
    assert "spearman_std" in set(results.scores["score"])
    assert set(leaderboard(results, n_boot=20)["score"]) == {"spearman"}


def test_context_scores_are_stored_not_ranked(tmp_path: Path) -> None:
    """A robustness metric's changed_fraction (the share of perturbations that changed the prediction) describes
    the run, not the map: a method that flips predictions must not win a column for it."""
    scores = {("mprt", "spearman"): SCORES["mprt", "spearman"],
              ("mprt", "changed_fraction"): {"alpha": [0.5] * 4, "beta": [0.0] * 4, "gamma": [0.25] * 4}}
    _write_run(tmp_path, "shapes-cnn-1", "cnn", scores,
               meta=[META[3], {"metric": "mprt", "score": "changed_fraction", "higher_is_better": False}])
    results = load(tmp_path)
    assert "changed_fraction" in set(results.scores["score"])
    assert set(leaderboard(results, n_boot=20)["score"]) == {"spearman"}


def test_every_column_carries_its_family_and_methods_rank_per_family(tree: Path) -> None:
    """The family of a metric comes from its run's `_target_` (metrics.family); a target outside metrics. is
    'other' and is never imported. Per-family mean ranks by hand from the ranks above, headline columns only:
    faithfulness (flip/aopc, flip's headline) alpha 1, beta 3, gamma 2; localization (point/hit) 2, 3, 1."""
    run = tree / "sweep" / "shapes-cnn-1"
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"] = {"metric": {"flip": {"_target_": "metrics.pixel_flipping"},
                                     "point": {"_target_": "metrics.pointing_game"},
                                     "mprt": {"_target_": "os.system"}}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    board = leaderboard(load(tree), n_boot=20)
    cnn = board[board["model"] == "cnn"]
    assert dict(zip(cnn["metric"], cnn["family"])) == {"flip": "faithfulness", "point": "localization",
                                                        "mprt": "other"}
    ranks = family_rank(cnn).set_index(["family", "method"])["mean_rank"]
    assert ranks["faithfulness"].to_dict() == {"alpha": 1.0, "beta": 3.0, "gamma": 2.0}
    assert ranks["localization"].to_dict() == {"alpha": 2.0, "beta": 3.0, "gamma": 1.0}
    wide = wide_ranks(cnn)
    assert list(wide.columns[:8]) == ["dataset", "model", "method", "mean_rank", "rank", "rank faithfulness",
                                      "rank localization", "rank other"]
    text = format_leaderboard(cnn)
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert header.split(" | ")[1:4] == ["faithfulness · flip/aopc (↑) *", "faithfulness · flip/auc (↓)",
                                        "localization · point/hit (↑) *"]
    assert header.endswith("| mean rank (faithfulness) | mean rank (localization) | mean rank (other) | mean rank |")
    alpha = next(line for line in text.splitlines() if line.startswith("| alpha"))
    assert alpha.endswith("| 1.00 | 2.00 | 1.00 | 1.33 |")
    assert (r" & \multicolumn{2}{c}{faithfulness} & \multicolumn{1}{c}{localization} & \multicolumn{1}{c}{other} \\"
            "\nmethod & flip/aopc $\\uparrow$ & flip/auc $\\downarrow$ & point/hit $\\uparrow$ & mprt/spearman") \
        in format_latex(cnn)


def test_failures_table_has_one_row_per_failed_sample(tmp_path: Path) -> None:
    failure = {"method": "beta", "metric": "flip", "stage": "metric", "error": "RuntimeError: x",
               "n_samples": 2, "sample_ids": [1, 3]}
    _write_run(tmp_path, "shapes-cnn-1", "cnn", {("flip", "auc"): SCORES[("flip", "auc")]}, meta=META[:1],
               failures=(failure,))
    rows = load(tmp_path).failures
    assert rows[["method", "metric", "sample_id", "stage"]].to_dict("records") == [
        {"method": "beta", "metric": "flip", "sample_id": s, "stage": "metric"} for s in (1, 3)]
    out = write_report(tmp_path, n_boot=10)
    assert list(pd.read_csv(out / "failures.csv").columns) == store.FAILURE_COLUMNS


def test_the_report_layers_import_downwards_only() -> None:
    """bench/*.py import one another without a cycle, and the report's stack only downwards: files < store <
    results < tables < figures < gallery < page < report < callbacks (bench.keep sits beside the runner)."""
    import ast

    bench = Path(__file__).resolve().parents[2] / "bench"
    graph = {}
    for path in bench.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        graph[path.stem] = {n.split(".")[1] for n in names if n.startswith("bench.")} - {path.stem}
    graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}    # modules of bench/, not packages
    order, done = [], set()
    while len(done) < len(graph):
        ready = sorted(m for m in graph if m not in done and graph[m] <= done)
        assert ready, f"import cycle among {sorted(set(graph) - done)}"
        order += ready
        done |= set(ready)
    stack = ["files", "store", "results", "tables", "figures", "gallery", "page", "report", "callbacks"]
    for i, module in enumerate(stack):
        assert not graph[module] & set(stack[i + 1:]), f"bench.{module} imports {graph[module] & set(stack[i + 1:])}"
    assert "keep" in graph["run"] and not graph["keep"] & set(stack[2:]) and "run" not in graph["gallery"]


def test_perf_report_times_every_phase_once(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.perf_report import main as perf_main, measure

    phases = measure(tree)
    assert set(phases) == {"load", "tables", "figures", "gallery", "rest", "total"}
    assert all(wall >= 0 and cpu >= 0 for wall, cpu in phases.values())
    # the gallery is timed inside the figures and counted once: the phases add up to the total
    assert sum(wall for k, (wall, _) in phases.items() if k != "total") == pytest.approx(phases["total"][0])
    assert not (tree / "report").exists()                               # written to a temporary folder
    perf_main([str(tree), "--repeat", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("imports: wall ") and out[1].startswith("report 1: load ") and "gallery" in out[1]


def test_write_report_freezes_the_heap_only_while_it_runs(tree: Path, tmp_path: Path, monkeypatch, request) -> None:
    import gc, bench.report as report  # noqa: E401
    seen, compute = [], report.compute
    monkeypatch.setattr(report, "compute", lambda *a, **k: seen.append(gc.get_freeze_count()) or compute(*a, **k))
    write_report(tree, tmp_path / "a", n_boot=20)
    assert seen[0] > 0 and gc.get_freeze_count() == 0              # frozen while it ran, thawed after
    request.addfinalizer(gc.unfreeze)
    gc.freeze()                                                    # a caller's own freeze is left as it was
    write_report(tree, tmp_path / "b", n_boot=20)
    assert gc.get_freeze_count() > 0                               # not thawed (frozen objects may still be freed)
