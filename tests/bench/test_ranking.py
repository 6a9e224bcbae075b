"""bench.ranking and the leaderboard's headline columns, on hand-built results with hand-computed answers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from bench.ranking import CONTROL_TARGETS, bootstrap_ranks, controls, latec_ranks, model_agreement, rank_methods
from bench.results import Results
from bench.store import CURVE_COLUMNS, FAILURE_COLUMNS, SCORE_COLUMNS
from bench.tables import compute, headlines, leaderboard, overall_rank

MPRT = ["spearman", "spearman_signed", "ssim", "hog", "top_k"]
METHODS = {"a": "methods.saliency", "b": "methods.gradient_x_input", "random": "methods.random_map"}


def _results(values: dict, *, hib: dict, headline: dict = (), methods: dict = METHODS, metrics: dict = ()) -> Results:
    """Results of one run per (dataset, model) from {(dataset, model, metric, score): {method: samples}}."""
    rows = [pd.DataFrame({"run_id": f"{d}-{m}", "dataset": d, "model": mo, "method": meth, "metric": m_, "score": s,
                          "sample_id": np.arange(len(v)), "value": np.asarray(v, dtype=np.float64)})
            for (d, mo, m_, s), per in values.items() for meth, v in per.items() for m in [mo]]
    units = dict.fromkeys((d, mo) for d, mo, *_ in values)
    manifests = [{"run_id": f"{d}-{mo}", "dataset": d, "model": mo, "config": {"method": {
                  k: {"_target_": t} for k, t in methods.items()},
                  "metric": {k: {"_target_": t} for k, t in dict(metrics).items()}},
                  "metrics": {m: {"headline": h} for m, h in dict(headline).items()}} for d, mo in units]
    meta = pd.DataFrame([{"metric": m, "score": s, "higher_is_better": h} for (m, s), h in hib.items()])
    return Results(scores=pd.concat(rows, ignore_index=True)[SCORE_COLUMNS], curves=pd.DataFrame(columns=CURVE_COLUMNS),
                   meta=meta, failures=pd.DataFrame(columns=FAILURE_COLUMNS), manifests=manifests)


def test_a_metric_with_five_scores_counts_once():
    """b wins every one of mprt's five scores, a wins loc and flip: counted per column, b would rank first
    ((5 + 2 + 2) / 7 against a's (10 + 1 + 1) / 7); by headline, a does: (2 + 1 + 1) / 3 against 5 / 3."""
    values = {("shapes", "cnn", "mprt", s): {"a": [0.5, 0.6], "b": [0.1, 0.2]} for s in MPRT}
    values[("shapes", "cnn", "loc", "hit")] = {"a": [1.0, 1.0], "b": [0.0, 1.0]}
    values[("shapes", "cnn", "flip", "aopc")] = {"a": [2.0, 3.0], "b": [1.0, 1.0]}
    hib = {("mprt", s): False for s in MPRT} | {("loc", "hit"): True, ("flip", "aopc"): True}
    board = leaderboard(_results(values, hib=hib, headline={"mprt": "spearman"}), n_boot=10)
    assert board.loc[board["metric"].eq("mprt"), ["score", "headline"]].set_index("score")["headline"].to_dict() == \
        {s: s == "spearman" for s in MPRT}                                  # all five kept for display
    assert board.loc[~board["metric"].eq("mprt"), "headline"].all()        # one ranked score: its headline
    overall = overall_rank(board).set_index("method")
    assert overall["mean_rank"].to_dict() == pytest.approx({"a": 4 / 3, "b": 5 / 3})
    assert overall["rank"].to_dict() == {"a": 1.0, "b": 2.0}


def test_headline_notes_name_the_metrics_left_out():
    values = {("shapes", "cnn", "flip", s): {"a": [1.0], "b": [2.0]} for s in ("auc", "aopc")}
    values[("shapes", "cnn", "mprt", "ssim")] = {"a": [0.1], "b": [0.2]}
    hib = {("flip", "auc"): False, ("flip", "aopc"): True, ("mprt", "ssim"): False}
    results = _results(values, hib=hib, headline={"mprt": "spearman"})
    head, notes = headlines(results)
    assert head == {}
    assert "metric flip has 2 ranked scores (aopc, auc) and declares no headline" in notes[0]
    assert "metric mprt declares headline 'spearman' but scored ssim" in notes[1]
    assert not leaderboard(results, n_boot=10)["headline"].any()


def test_latec_against_a_hand_computed_example():
    """Two models, one column (higher is better), three methods, two samples each. Model 1 values
    a [0, 4], b [1, 2], c [3, 3]: sorted 0 1 2 3 3 4, q.025 = 0.125, q.975 = 3.875 (linear), so after
    clipping and min-max: a [0, 1], b [0.875, 1.875] / 3.75, c 2.875 / 3.75 twice. Model 2 a [10, 10],
    b [20, 30], c [0, 40]: q = 1.25, 38.75: a 8.75 / 37.5 twice, b [18.75, 28.75] / 37.5, c [0, 1].
    Medians over both models: a 7/30, b 1/2, c 23/30 -> ranks c 1, b 2, a 3. (Unstandardised, the
    pooled medians a 7, b 11, c 3 would rank b first; unclipped, the medians are 1/4, 1/2, 3/4.)"""
    values = {("shapes", "m1", "loc", "x"): {"a": [0, 4], "b": [1, 2], "c": [3, 3]},
              ("shapes", "m2", "loc", "x"): {"a": [10, 10], "b": [20, 30], "c": [0, 40]}}
    results = _results(values, hib={("loc", "x"): True}, methods={})
    board = leaderboard(results, n_boot=10)
    out = latec_ranks(board, results.scores).set_index("method")
    assert out["median"].to_dict() == pytest.approx({"a": 7 / 30, "b": 1 / 2, "c": 23 / 30}, abs=1e-9)
    assert out["rank"].to_dict() == {"a": 3.0, "b": 2.0, "c": 1.0}
    ranking = rank_methods(board, results.scores, results.manifests, n_boot=50).methods.set_index("method")
    assert ranking.loc[ranking["scope"].eq("overall"), "latec_rank"].to_dict() == {"a": 3.0, "b": 2.0, "c": 1.0}


def test_bootstrap_rank_ci_contains_the_point_rank_and_p_best_sums_to_one():
    rng = np.random.default_rng(0)
    values = {("shapes", m, "loc", "x"): {k: rng.normal(mu, 1.0, size=30) for k, mu in
                                         (("a", 3.0), ("b", 2.8), ("c", 0.0), ("d", -3.0))} for m in ("m1", "m2", "m3")}
    results = _results(values, hib={("loc", "x"): True}, methods={})
    board = leaderboard(results, n_boot=10)
    ranking = rank_methods(board, results.scores, results.manifests, n_boot=400, seed=3).methods
    overall = ranking[ranking["scope"].eq("overall")].set_index("method")
    assert (overall["rank_ci_low"] <= overall["rank"]).all() and (overall["rank"] <= overall["rank_ci_high"]).all()
    assert overall["p_best"].sum() == pytest.approx(1.0)
    assert overall.loc["d", ["rank_ci_low", "rank_ci_high", "p_best"]].tolist() == [4.0, 4.0, 0.0]   # far behind
    assert overall.loc["a", "rank_ci_low"] == 1.0 and overall.loc["b", "rank_ci_high"] >= 2.0         # a, b close
    assert overall["n_columns"].tolist() == [3, 3, 3, 3]


def test_bootstrap_splits_p_best_between_tied_methods():
    """Identical scores tie in every replicate: p_best 1/2 each; a constant gap never moves the ranks."""
    values = {("shapes", m, "loc", "x"): {"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0, 3.0], "c": [0.0, 1.0, 2.0]}
              for m in ("m1", "m2")}
    board = leaderboard(_results(values, hib={("loc", "x"): True}, methods={}), n_boot=10)
    scores = _results(values, hib={("loc", "x"): True}, methods={}).scores
    out = bootstrap_ranks(board, scores, n_boot=100, seed=1)
    assert out["p_best"].to_dict() == {"a": 0.5, "b": 0.5, "c": 0.0}
    assert out.loc["c", ["rank_ci_low", "rank_ci_high"]].tolist() == [3.0, 3.0]


def test_kendall_tau_between_models_against_scipy():
    """Model 1 ranks a b c d, model 2 b a c d: 5 concordant pairs, 1 discordant, tau = 4 / 6."""
    values = {("shapes", "m1", "loc", "x"): {"a": [4.0], "b": [3.0], "c": [2.0], "d": [1.0]},
              ("shapes", "m2", "loc", "x"): {"a": [3.0], "b": [4.0], "c": [2.0], "d": [1.0]}}
    board = leaderboard(_results(values, hib={("loc", "x"): True}, methods={}), n_boot=10)
    row = model_agreement(board).iloc[0]
    expected = scipy.stats.kendalltau([1, 2, 3, 4], [2, 1, 3, 4])
    assert (row["model_a"], row["model_b"], row["n_methods"]) == ("m1", "m2", 4)
    assert row["tau"] == pytest.approx(2 / 3) and row["tau"] == pytest.approx(expected.statistic)
    assert row["p_value"] == pytest.approx(expected.pvalue)


def test_a_method_below_a_control_is_flagged_beside_its_rank():
    """a is worse than the random control on flip's headline (aopc) and on loc, better on flip/auc (not a
    headline: never flagged); b beats random everywhere; the control itself is never flagged; a randomization
    test (mprt, where random is the ideal by construction) flags nobody."""
    values = {("shapes", "cnn", "flip", "aopc"): {"a": [0.1, 0.2], "b": [0.9, 0.8], "random": [0.5, 0.5]},
              ("shapes", "cnn", "flip", "auc"): {"a": [0.1, 0.1], "b": [0.2, 0.2], "random": [0.9, 0.9]},
              ("shapes", "cnn", "loc", "hit"): {"a": [0.0, 0.5], "b": [1.0, 1.0], "random": [0.5, 0.5]},
              ("shapes", "cnn", "mprt", "spearman"): {"a": [0.5, 0.5], "b": [0.4, 0.4], "random": [0.0, 0.0]}}
    hib = {("flip", "aopc"): True, ("flip", "auc"): False, ("loc", "hit"): True, ("mprt", "spearman"): False}
    t = compute(_results(values, hib=hib, headline={"flip": "aopc"}, metrics={"mprt": "metrics.mprt"}), n_boot=20)
    below = t.ranking.below_control
    assert below[["method", "metric", "score", "control"]].to_dict("records") == [
        {"method": "a", "metric": "flip", "score": "aopc", "control": "random"},
        {"method": "a", "metric": "loc", "score": "hit", "control": "random"}]
    np.testing.assert_allclose(below[["mean", "control_mean"]].to_numpy(np.float64), [[0.15, 0.5], [0.25, 0.5]])
    overall = t.ranking.methods[t.ranking.methods["scope"].eq("overall")].set_index("method")
    assert overall["below_control"].to_dict() == {"a": 2, "b": 0, "random": 0}
    assert overall["mean_rank"].to_dict() == pytest.approx({"a": 3.0, "b": 4 / 3, "random": 5 / 3})
    assert overall["rank"].to_dict() == {"a": 3.0, "b": 1.0, "random": 2.0}


def test_ranking_kendall_and_tables_in_markdown_and_latex():
    """bench.formats: every table as Markdown and LaTeX, names escaped, values as in the CSV tables."""
    from bench.formats import documents

    values = {("shapes", m, "loc_x", "hit"): {"a": [1.0, 1.0], "b": [0.0, 0.5], "random": [0.5, 0.5]}
              for m in ("m1", "m2")}
    t = compute(_results(values, hib={("loc_x", "hit"): True}), n_boot=20)
    docs = documents(t)
    assert set(docs) == {f"{name}.{ext}" for name in ("ranking", "kendall", "significance", "agreement")
                         for ext in ("md", "tex")} | {"sanity.tex"}
    assert "| a | 1 | [1, 1] | 1.00 | 1 | 1 | 2 |  |" in docs["ranking.md"]
    assert "| b | 3 | [2.5, 3] | 0.00 | 3 | 3 | 2 | 2 |" in docs["ranking.md"]        # below random twice
    assert r"shapes/m1 & 1 & 1.00 (p=0.33) \\" in docs["kendall.tex"]
    assert r"loc\_x/hit & " in docs["significance.tex"] and "| loc_x/hit | " in docs["significance.md"]
    assert docs["ranking.tex"].count(r"\begin{tabular}") == 2                          # overall and its family


def test_controls_are_the_functions_of_methods_controls():
    import inspect

    import methods.controls

    public = {n for n, f in inspect.getmembers(methods.controls, inspect.isfunction)
              if not n.startswith("_") and f.__module__ == "methods.controls"}
    assert CONTROL_TARGETS == {f"methods.{n}" for n in public}
    node = {"a": {"_target_": "methods.saliency"}, "r": {"_target_": "methods.controls.random_map"},
            "e": {"_target_": "methods.edge"}}
    assert controls([{"config": {"method": node}}]) == {"r", "e"}


@pytest.mark.parametrize("bad", ["spearman@fc", "spearman_std", "", 3, ["auc"]])
def test_a_headline_must_name_one_ranked_score(bad):
    from omegaconf import OmegaConf

    from bench.provenance import metric_meta

    assert metric_meta("mprt", OmegaConf.create({"_headline_": "spearman"}))["headline"] == "spearman"
    with pytest.raises(ValueError, match=r"metric.mprt._headline_ must be the name of one ranked score .* fix "
                                         r"conf/metric/mprt.yaml"):
        metric_meta("mprt", OmegaConf.create({"_headline_": bad}))
