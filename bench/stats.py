"""Statistics for reports: significance across methods, critical differences, metric agreement and
metric reliability. Inputs are tidy score tables (bench.store.SCORE_COLUMNS); outputs are tidy too.
"""
from __future__ import annotations

import functools
import itertools
from typing import Literal

import numpy as np
import pandas as pd
import scipy.stats


def sample_matrix(scores: pd.DataFrame) -> pd.DataFrame:
    """One (dataset, model, metric, score) slice as samples x methods; samples with any NaN are dropped
    (the tests below are paired: every method must be scored on the same samples)."""
    table = scores.groupby(["sample_id", "method"], sort=True)["value"].mean().unstack("method")   # pivot_table's frame
    return table.dropna(axis=0, how="any")


def sample_ranks(table: pd.DataFrame, *, higher_is_better: bool) -> pd.DataFrame:
    """Rank the methods within each sample: 1 = best, ties share their average rank."""
    return table.rank(axis=1, ascending=not higher_is_better, method="average")


def holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values: p_(i) * (m - i + 1), made monotone, capped at 1."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adjusted
    return out


def friedman(table: pd.DataFrame) -> dict[str, float]:
    """Friedman (1937) test that all methods (columns) have the same distribution over samples (rows)."""
    k, n = table.shape[1], table.shape[0]
    if k < 3 or n < 2:
        return {"statistic": np.nan, "p": np.nan, "n": n, "k": k}
    res = scipy.stats.friedmanchisquare(*table.to_numpy().T)
    return {"statistic": float(res.statistic), "p": float(res.pvalue), "n": n, "k": k}


def pairwise_wilcoxon(table: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """Two-sided Wilcoxon signed-rank test for every pair of methods, Holm-corrected over the pairs.

    Pairs whose differences are all zero have no test: p = 1 (no evidence of a difference). Every pair is
    tested at once (scipy.stats.wilcoxon along axis 0 of the (samples, pairs) differences), in groups by the
    method scipy's "auto" picks for that pair alone (`_wilcoxon_method`), so each p is scipy's for the pair.
    """
    a, b = np.triu_indices(table.shape[1], 1)                              # every pair, in combinations' order
    x = table.to_numpy(dtype=np.float64)
    d = x[:, a] - x[:, b]                                                   # (n, pairs)
    statistic, p = np.full(len(a), np.nan), np.ones(len(a))
    tested = ~np.all(d == 0, axis=0) if len(d) >= 2 else np.zeros(len(a), bool)
    how = _wilcoxon_method(d)
    for method in set(how[tested]):
        cols = np.flatnonzero(tested & (how == method))
        res = scipy.stats.wilcoxon(d[:, cols], axis=0, method=_METHODS[method]())
        statistic[cols], p[cols] = res.statistic, res.pvalue
    out = pd.DataFrame({"method_a": table.columns[a], "method_b": table.columns[b], "statistic": statistic, "p": p,
                        "mean_diff": np.where(tested, d.mean(axis=0) if len(d) else 0.0, 0.0)})
    out["p_holm"] = holm(out["p"].to_numpy()) if len(out) else []
    out["significant"] = out["p_holm"] < alpha
    return out


_METHODS = {"exact": lambda: "exact", "asymptotic": lambda: "asymptotic", "permutation": scipy.stats.PermutationMethod}


def _wilcoxon_method(d: np.ndarray) -> np.ndarray:
    """Per column of the (n, pairs) differences, the method scipy.stats.wilcoxon(method="auto") uses for that
    column alone (scipy 1.13+): asymptotic past 50 samples; else exact without zeros or ties in |d|; else a
    permutation test up to 13 samples, asymptotic above. (Given 2-D input, "auto" decides once for all columns.)"""
    n = d.shape[0]
    if n > 50:
        return np.full(d.shape[1], "asymptotic")
    s = np.sort(np.abs(d), axis=0)
    clean = (s[:1] > 0).all(axis=0) & (np.diff(s, axis=0) > 0).all(axis=0)    # no zero, no tie
    return np.where(clean, "exact", "permutation" if n <= 13 else "asymptotic")


def critical_difference(k: int, n: int, *, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of average ranks (Demšar 2006): q_alpha * sqrt(k (k + 1) / (6 n)),
    q_alpha the studentized range quantile for k groups and infinite df, divided by sqrt(2)."""
    q = _studentized_range(1 - alpha, k) / np.sqrt(2)
    return float(q * np.sqrt(k * (k + 1) / (6 * n)))


@functools.lru_cache(maxsize=64)
def _studentized_range(level: float, k: int) -> float:
    """scipy's studentized range quantile at infinite df, once per (level, k): a report asks for it per column."""
    return scipy.stats.studentized_range.ppf(level, k, np.inf)


def krippendorff_alpha(ratings: np.ndarray, *, level: Literal["nominal", "ordinal", "interval"] = "ordinal") -> float:
    """Krippendorff's alpha = 1 - D_o / D_e for a (raters, units) array with NaN for missing values.

    Observed disagreement D_o comes from the coincidence matrix of values within units (units
    with fewer than two values are unpairable and left out); expected disagreement D_e from the
    value totals. Distances: nominal (0/1), ordinal (Krippendorff 2011's cumulative-frequency
    metric), interval (squared difference).
    """
    r = np.asarray(ratings, dtype=np.float64)
    values = np.unique(r[np.isfinite(r)])                                  # (V,)
    counts = np.stack([(r == v).sum(axis=0) for v in values], axis=1)       # (units, V): n_uv
    m_u = counts.sum(axis=1)
    counts, m_u = counts[m_u >= 2], m_u[m_u >= 2]
    # coincidences o_ck = sum_u n_uc (n_uk - [c == k]) / (m_u - 1)
    o = np.einsum("uc,uk,u->ck", counts, counts, 1.0 / (m_u - 1)) - np.diag((counts / (m_u - 1)[:, None]).sum(axis=0))
    n_c = o.sum(axis=1)
    n = n_c.sum()
    if level == "nominal":
        delta = (values[:, None] != values[None, :]).astype(np.float64)
    elif level == "interval":
        delta = (values[:, None] - values[None, :]) ** 2
    elif level == "ordinal":
        cum = np.cumsum(n_c)                                               # sum_{g<=k} n_g
        lo, hi = np.minimum.outer(np.arange(len(values)), np.arange(len(values))), np.maximum.outer(np.arange(len(values)), np.arange(len(values)))
        delta = (cum[hi] - np.where(lo > 0, cum[lo - 1], 0.0) - (n_c[lo] + n_c[hi]) / 2) ** 2
    else:
        raise ValueError(f"level must be 'nominal', 'ordinal' or 'interval', got {level!r}")
    d_o = (o * delta).sum() / n
    d_e = (np.outer(n_c, n_c) * delta).sum() / (n * (n - 1))
    return float(1 - d_o / d_e) if d_e > 0 else np.nan


def inter_rater_reliability(table: pd.DataFrame, *, higher_is_better: bool) -> float:
    """Tomsett et al. 2020: do samples (the raters) rank the methods (the units) alike?
    Krippendorff's ordinal alpha of the per-sample method ranks; 1 = every sample agrees."""
    return krippendorff_alpha(sample_ranks(table, higher_is_better=higher_is_better).to_numpy(), level="ordinal")


def inter_method_reliability(table: pd.DataFrame) -> float:
    """Tomsett et al. 2020: mean Spearman correlation, over method pairs, of the per-sample scores.
    High values mean the metric mostly measures the sample, not the method. Pairs with a constant
    method (e.g. a control that scores 1 on every sample) have no correlation and are left out."""
    k = table.shape[1]
    rho = table.rank().corr(method="pearson").to_numpy()[np.triu_indices(k, 1)] if k >= 2 and len(table) >= 3 else []
    rho = np.asarray(rho)[np.isfinite(rho)]                                  # Spearman = Pearson of ranks
    return float(rho.mean()) if rho.size else np.nan


def metric_agreement(board: pd.DataFrame) -> pd.DataFrame:
    """Kendall tau-b between the method rankings of every pair of leaderboard columns, per (dataset, model).

    `board` is bench.report.leaderboard's output; rankings are already direction-aware (1 = best).
    """
    rows = []
    for (dataset, model), table in board.groupby(["dataset", "model"], sort=True):
        ranks = table.assign(column=table["metric"] + "/" + table["score"]).pivot(index="method", columns="column", values="rank")
        names = sorted(ranks.columns)
        values = ranks[names].to_numpy(dtype=np.float64)                  # (methods, columns): numpy, not a frame per pair
        for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
            both = ~(np.isnan(values[:, i]) | np.isnan(values[:, j]))    # methods ranked in both columns
            n = int(both.sum())
            tau = scipy.stats.kendalltau(values[both, i], values[both, j]) if n >= 2 else None
            rows.append({"dataset": dataset, "model": model, "column_a": a, "column_b": b, "n_methods": n,
                         "kendall_tau": float(tau.statistic) if tau else np.nan, "p": float(tau.pvalue) if tau else np.nan})
    return pd.DataFrame(rows, columns=["dataset", "model", "column_a", "column_b", "n_methods", "kendall_tau", "p"])
