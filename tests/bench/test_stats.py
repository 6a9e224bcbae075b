"""Report statistics against hand-computed values, textbook examples, scipy and the krippendorff package."""
from __future__ import annotations

import itertools

import krippendorff
import numpy as np
import pandas as pd
import pytest
import scipy.stats

from bench import stats
from bench.report import bootstrap_ci, format_latex, leaderboard, load

NAN = np.nan
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", example C: 4 observers x 12 units
KRIPPENDORFF_2011 = np.array([
    [1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
    [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN],
])


@pytest.mark.parametrize("level,expected", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorff_alpha_textbook_example(level, expected):
    assert stats.krippendorff_alpha(KRIPPENDORFF_2011, level=level) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize("level", ["nominal", "ordinal", "interval"])
def test_krippendorff_alpha_agrees_with_the_krippendorff_package(level):
    rng = np.random.default_rng(0)
    ratings = rng.integers(1, 6, size=(6, 30)).astype(float) + (rng.random((1, 30)) * 3).round()
    ratings[rng.random(ratings.shape) < 0.15] = np.nan
    ours = stats.krippendorff_alpha(ratings, level=level)
    assert ours == pytest.approx(krippendorff.alpha(reliability_data=ratings, level_of_measurement=level), abs=1e-10)


def test_holm_hand_computed():
    # sorted: .005*4 = .02, .01*3 = .03, .03*2 = .06, .04*1 = .04 -> monotone max: .02, .03, .06, .06
    np.testing.assert_allclose(stats.holm(np.array([0.01, 0.04, 0.03, 0.005])), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(stats.holm(np.array([0.5, 0.9])), [1.0, 1.0])     # .5*2 = 1, then monotone


def test_friedman_equals_the_textbook_formula():
    rng = np.random.default_rng(1)
    table = pd.DataFrame(rng.normal(size=(12, 4)) + np.arange(4), columns=list("abcd"))   # no ties
    n, k = table.shape
    R = table.rank(axis=1).sum()
    chi2 = 12 / (n * k * (k + 1)) * (R ** 2).sum() - 3 * n * (k + 1)
    res = stats.friedman(table)
    assert res["statistic"] == pytest.approx(chi2) and res["p"] == pytest.approx(scipy.stats.chi2.sf(chi2, k - 1))


def test_pairwise_wilcoxon_equals_scipy_with_holm():
    rng = np.random.default_rng(2)
    table = pd.DataFrame(rng.normal(size=(20, 3)) + [0.0, 0.1, 1.0], columns=["a", "b", "c"])
    table["d"] = table["a"]                                             # identical to a: no test, p = 1
    out = stats.pairwise_wilcoxon(table)
    p = [scipy.stats.wilcoxon(table[x], table[y]).pvalue if x != "a" or y != "d" else 1.0
         for x, y in itertools.combinations(table.columns, 2)]
    np.testing.assert_allclose(out["p"], p)
    np.testing.assert_allclose(out["p_holm"], stats.holm(np.array(p)))
    assert out.set_index(["method_a", "method_b"]).loc[("a", "c"), "significant"]


def _wilcoxon_per_pair(table: pd.DataFrame) -> pd.DataFrame:
    """The reference: scipy.stats.wilcoxon called once per pair of columns (what pairwise_wilcoxon batches)."""
    rows = []
    for a, b in itertools.combinations(table.columns, 2):
        d = table[a].to_numpy() - table[b].to_numpy()
        res = scipy.stats.wilcoxon(table[a], table[b]) if len(d) >= 2 and np.any(d != 0) else None
        rows.append([res.statistic if res else np.nan, res.pvalue if res else 1.0, d.mean() if res else 0.0])
    return pd.DataFrame(rows, columns=["statistic", "p", "mean_diff"])


@pytest.mark.parametrize("n", [1, 6, 10, 20, 50, 51, 128])
def test_pairwise_wilcoxon_batched_is_scipy_per_pair(n):
    # 2-D wilcoxon picks one method ("auto") for every column; the batched test must pick per pair as the 1-D
    # call does: exact (no zero, no tie), a permutation test (n <= 13) or asymptotic (ties, zeros, n > 50)
    rng = np.random.default_rng(n)
    table = pd.DataFrame(rng.normal(size=(n, 5)) + np.arange(5) * 0.2, columns=list("abcde"))
    table["f"] = table["a"]                                               # all zero differences: no test
    table["g"] = table["b"].round(1)                                      # ties in |d| against several columns
    table.loc[table.index[:2], "e"] = table.loc[table.index[:2], "c"]    # a few zero differences
    out = stats.pairwise_wilcoxon(table)
    expected = _wilcoxon_per_pair(table)
    assert list(zip(out["method_a"], out["method_b"])) == list(itertools.combinations(table.columns, 2))
    np.testing.assert_array_equal(out[["statistic", "p", "mean_diff"]].to_numpy(), expected.to_numpy())


@pytest.mark.parametrize("k,q", [(2, 1.960), (3, 2.343), (4, 2.569), (5, 2.728), (7, 2.949), (10, 3.164)])
def test_critical_difference_matches_demsar_table(k, q):
    # Demšar (2006), Table 5(a): Nemenyi q_0.05
    assert stats.critical_difference(k, 30) == pytest.approx(q * np.sqrt(k * (k + 1) / 180), rel=2e-3)


def test_reliability_hand_cases():
    agree = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "b": [2.0, 3.0, 4.0, 5.0], "c": [0.0, 0.5, 0.2, 0.1]})
    # every sample ranks b > a > c (higher is better): perfect inter-rater agreement
    assert stats.inter_rater_reliability(agree, higher_is_better=True) == pytest.approx(1.0)
    # ranks of c over samples: 1, 4, 3, 2 -> rho(a, c) = rho(b, c) = 1 - 6 * 8 / (4 * 15) = 0.2; rho(a, b) = 1
    assert stats.inter_method_reliability(agree) == pytest.approx((1.0 + 0.2 + 0.2) / 3)
    # a constant method has no correlation and is left out of the mean
    assert stats.inter_method_reliability(agree.assign(c=1.0)) == pytest.approx(1.0)


def test_sample_ranks_direction_and_ties():
    table = pd.DataFrame({"a": [0.1, 0.5], "b": [0.2, 0.5], "c": [0.3, 0.1]})
    ranks = stats.sample_ranks(table, higher_is_better=False)
    np.testing.assert_allclose(ranks.to_numpy(), [[1, 2, 3], [2.5, 2.5, 1]])


def test_bootstrap_ci_covers_the_known_mean():
    rng = np.random.default_rng(3)
    hits = [lo <= 0.0 <= hi for lo, hi in (bootstrap_ci(rng.normal(size=40), n_boot=400, seed=s) for s in range(200))]
    # 95% nominal; the percentile bootstrap undercovers slightly at n = 40. Seeded: this is one fixed number.
    assert np.mean(hits) == pytest.approx(0.93, abs=0.02)


def _board():
    rows = []
    for metric, hib, means in [("m1", True, [3.0, 2.0, 1.0]), ("m2", False, [1.0, 2.0, 3.0]), ("m3", True, [1.0, 2.0, 3.0])]:
        for method, mean in zip(["x", "y_z", "w"], means):
            rows.append({"dataset": "d", "model": "m", "method": method, "metric": metric, "score": "s",
                         "mean": mean, "ci_low": mean - 0.1, "ci_high": mean + 0.1, "n": 4, "n_nan": 0,
                         "higher_is_better": hib})
    board = pd.DataFrame(rows)
    key = board["mean"].where(~board["higher_is_better"], -board["mean"])
    board["rank"] = key.groupby([board["metric"]]).rank()
    return board


def test_metric_agreement_kendall_tau():
    agreement = stats.metric_agreement(_board()).set_index(["column_a", "column_b"])["kendall_tau"]
    # m1 (higher better, x best) and m2 (lower better, x best) rank identically; m3 reverses them
    assert agreement["m1/s", "m2/s"] == pytest.approx(1.0)
    assert agreement["m1/s", "m3/s"] == pytest.approx(-1.0)


def test_metric_agreement_is_scipys_kendall_tau_on_the_methods_both_columns_rank():
    # tied ranks and missing ones (a method without a rank in a column): tau, p and n of scipy.stats.kendalltau
    # on the methods ranked in both columns, exactly; fewer than two such methods: NaN
    rng = np.random.default_rng(0)
    ranks = rng.integers(1, 4, size=(6, 4)).astype(float)                   # (methods, columns), with ties
    ranks[[0, 3], 1], ranks[1:, 3] = np.nan, np.nan
    board = pd.DataFrame([{"dataset": "d", "model": "m", "method": f"x{i}", "metric": f"c{j}", "score": "s",
                           "rank": ranks[i, j]} for i in range(6) for j in range(4)])
    out = stats.metric_agreement(board)
    assert len(out) == 6
    for row, (a, b) in zip(out.itertuples(), itertools.combinations(range(4), 2)):
        both = ~np.isnan(ranks[:, a]) & ~np.isnan(ranks[:, b])
        assert (row.column_a, row.column_b, row.n_methods) == (f"c{a}/s", f"c{b}/s", both.sum())
        if both.sum() < 2:
            assert np.isnan(row.kendall_tau) and np.isnan(row.p)
            continue
        expected = scipy.stats.kendalltau(ranks[both, a], ranks[both, b])
        assert (row.kendall_tau, row.p) == (expected.statistic, expected.pvalue)


def test_latex_escapes_names_and_bolds_the_best():
    tex = format_latex(_board())
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"y\_z" in tex
    assert r"\textbf{3 [2.9, 3.1]}" in tex and r"m1/s $\uparrow$" in tex
