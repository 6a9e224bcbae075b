"""One ranking of methods across every (dataset, model) of a report, overall and per metric family, from each
metric's headline score only (bench.tables.leaderboard's `headline` column): mean rank and LATEC's aggregation,
the rank's bootstrap uncertainty, methods that fall below a control, and whether models agree (Kendall tau).
Reads tables, writes nothing (bench.report writes, bench.formats formats)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats

from bench.results import Results
from metrics import FAMILIES, ranked

UNIT = ["dataset", "model"]
COLUMN = ["dataset", "model", "metric", "score"]
OVERALL = "overall"
METHOD_COLUMNS = ["scope", "method", "mean_rank", "latec_rank", "rank", "rank_ci_low", "rank_ci_high", "p_best",
                  "n_columns", "below_control"]
BELOW_COLUMNS = ["dataset", "model", "method", "metric", "score", "control", "mean", "control_mean"]
KENDALL_COLUMNS = ["dataset_a", "model_a", "dataset_b", "model_b", "tau", "p_value", "n_methods"]
# methods.controls' functions (tests/bench/test_ranking.py keeps this in step): where chance lies. By name, so
# that a report never imports methods (captum, zennit, torchvision: half a minute on a loaded machine).
CONTROL_TARGETS = frozenset({"methods.random_map", "methods.edge", "methods.centre", "methods.constant"})
_EPS = 1e-11                                # LATEC's guard against max == min
# Families whose columns never flag a method below a control: in a randomization test the random control is
# the ideal by construction (independent draws: similarity 0) and edge the worst; the sanity table judges them.
UNFLAGGED_FAMILIES = ("randomization",)


@dataclass(frozen=True)
class Ranking:
    """methods: METHOD_COLUMNS, one row per (scope, method), scope "overall" or a family; below_control:
    BELOW_COLUMNS, a method's headline mean worse than a control's; kendall: KENDALL_COLUMNS, per model pair."""

    methods: pd.DataFrame
    below_control: pd.DataFrame
    kendall: pd.DataFrame


def rank_methods(board: pd.DataFrame, scores: pd.DataFrame, manifests: list[dict], *, n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> Ranking:
    """The ranking of methods across every (dataset, model) of `board` (tables.leaderboard, with `headline`
    and `family`), from the per-sample `scores` (bench.results.Results.scores) of its headline columns.

    mean_rank: the mean of a method's ranks r_c (1 = best, board["rank"]) over the headline columns c of every
    (dataset, model) in scope that it has (n_columns); rank: mean_rank ranked again (ties averaged).
    latec_rank: the mean of LATEC's per-column ranks (`latec_ranks`) over the scope, ranked again.
    rank_ci_low/high, p_best: `bootstrap_ranks`. below_control: how many of the method's columns in scope
    are in `below_control`. Kendall tau: `model_agreement`.
    """
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got n_boot={n_boot}, level={level}")
    if "headline" not in board:
        raise ValueError("board has no `headline` column: build it with bench.tables.leaderboard")
    heads = board[board["headline"].astype(bool)]
    below = below_control(heads, controls(manifests))
    flagged = below.drop_duplicates(["dataset", "model", "method", "metric", "score"])
    out = []
    if "family" not in heads:
        heads = heads.assign(family="other")
    lr = latec_ranks(heads, scores).merge(heads[["dataset", "metric", "score", "family"]].drop_duplicates(),
                                          on=["dataset", "metric", "score"])
    boots = _bootstrap(heads, scores, n_boot=n_boot, level=level, seed=seed)
    order = {f: i for i, f in enumerate(FAMILIES)}                  # metrics' family order, plug-ins ("other") last
    for scope in [OVERALL, *sorted(heads["family"].unique(), key=lambda f: (order.get(f, len(order)), f))]:
        part = heads if scope == OVERALL else heads[heads["family"].eq(scope)]
        mean = part.groupby("method")["rank"].agg(["mean", "size"]).rename(columns={"mean": "mean_rank",
                                                                                    "size": "n_columns"})
        latec_mean = (lr if scope == OVERALL else lr[lr["family"].eq(scope)]).groupby("method")["rank"].mean()
        boot = boots[scope]
        n_below = flagged[flagged["family"].eq(scope)] if scope != OVERALL and "family" in flagged else flagged
        table = mean.join(latec_mean.rename("latec_mean")).join(boot)
        table["below_control"] = n_below.groupby("method").size().reindex(table.index).fillna(0).astype(int)
        table["rank"] = table["mean_rank"].rank(method="average")
        table["latec_rank"] = table["latec_mean"].rank(method="average")
        out.append(table.reset_index().assign(scope=scope))
    methods = pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=METHOD_COLUMNS)
    return Ranking(methods=methods.reindex(columns=METHOD_COLUMNS), below_control=below[BELOW_COLUMNS],
                   kendall=model_agreement(heads))


def ranked_rows(scores: pd.DataFrame) -> np.ndarray:
    """Which rows of a score table hold a ranked score (metrics.ranked), asked once per distinct score name."""
    names = scores["score"].unique()
    return scores["score"].isin([n for n in names if ranked(n)]).to_numpy(bool)


def headlines(results: Results) -> tuple[dict[tuple[str, str, str], str], list[str]]:
    """Each (dataset, model, metric)'s headline score: the one its YAML declares (`_headline_`, the
    manifest's ``metrics.<name>.headline``), else the metric's only ranked stored score; and a note for each
    metric left out of the rank aggregates (several ranked scores and none declared, or a declared one the
    run lacks). Derived rows (`<score>_class_mean`) are never a default headline."""
    declared = {(m["dataset"], m["model"], name): (meta or {}).get("headline")
                for m in results.manifests for name, meta in (m.get("metrics") or {}).items()}
    s = results.scores
    stored = s.loc[ranked_rows(s), ["dataset", "model", "metric", "score"]].drop_duplicates()
    out, notes = {}, []
    for key, part in stored.astype(str).groupby(["dataset", "model", "metric"], sort=True):
        names = sorted(part["score"])
        head = declared.get(key)
        if head is None and len(names) == 1:
            out[key] = names[0]
        elif head is None:
            notes.append(f"{key[0]}/{key[1]}: metric {key[2]} has {len(names)} ranked scores ({', '.join(names)}) "
                         f"and declares no headline, so no rank aggregate counts it: add `_headline_: <score>` to "
                         f"its YAML")
        elif head not in names:
            notes.append(f"{key[0]}/{key[1]}: metric {key[2]} declares headline {head!r} but scored "
                         f"{', '.join(names)}, so no rank aggregate counts it: fix its `_headline_`")
        else:
            out[key] = head
    return out, notes


def latec_ranks(heads: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """LATEC's ranks across models (Klein et al. 2024, "Navigating the Maze of Explainable AI"; their
    code's main_rank, across models): r_{d,c}(k) of method k in (dataset d, headline column c), where

        s~ = (clip(s, q_.025, q_.975) - min) / (max - min + 1e-11)

    for every per-sample score s of model m (q, min and max over all methods' samples of (d, m, c): each
    model's scores standardised to [0, 1], outliers clipped), and r_{d,c}(k) ranks the methods k by the
    median of s~_k over every sample of every model of d (1 = best in c's direction, ties averaged).
    One row per (dataset, metric, score, method): median, rank. rank_methods averages the ranks over a
    scope's columns and ranks that mean again (latec_rank). NaN scores are left out.
    """
    cols, methods, values, _, row_col, row_method = _board_rows(heads, scores)
    keep = (row_col >= 0) & (row_method >= 0) & np.isfinite(values)
    v, c, k = values[keep], row_col[keep], row_method[keep]
    if v.size == 0:
        return pd.DataFrame(columns=["dataset", "metric", "score", "method", "median", "rank"])
    q = pd.Series(v).groupby(c).quantile([0.025, 0.975]).unstack()                     # (columns, 2)
    at = np.searchsorted(q.index.to_numpy(), c)                                           # each value's column row
    clipped = np.clip(v, q[0.025].to_numpy()[at], q[0.975].to_numpy()[at])
    g = pd.Series(clipped).groupby(c)
    low, high = g.transform("min").to_numpy(), g.transform("max").to_numpy()
    norm = (clipped - low) / (high - low + _EPS)                                          # s~, per value
    across = cols.groupby(["dataset", "metric", "score"], sort=False).ngroup().to_numpy()  # column -> (d, c)
    med = pd.Series(norm).groupby([pd.Series(across[c], name="_dc"), pd.Series(k, name="_k")]).median()
    med = med.rename("median").reset_index()
    first = cols.assign(_dc=across).drop_duplicates("_dc").set_index("_dc")
    med = pd.concat([first.loc[med["_dc"], ["dataset", "metric", "score", "higher_is_better"]].reset_index(drop=True),
                     med.assign(method=[methods[i] for i in med["_k"]])[["method", "median"]]], axis=1)
    key = med["median"].where(~med["higher_is_better"].astype(bool), -med["median"])     # smaller = better
    med["rank"] = key.groupby([med["dataset"], med["metric"], med["score"]]).rank(method="average")
    return med.drop(columns="higher_is_better")


def bootstrap_ranks(heads: pd.DataFrame, scores: pd.DataFrame, *, n_boot: int = 1000, level: float = 0.95,
                    seed: int = 0) -> pd.DataFrame:
    """The uncertainty of `rank` by a two-level bootstrap over models and samples: each replicate draws the
    (dataset, model) units with replacement and, within each unit, its samples with replacement (the same
    draw for every method and column of the unit: the scores are paired); it recomputes each headline
    column's means, their ranks (NaN mean last, as the board) and the mean rank over the drawn columns (a unit
    drawn twice counts twice), and ranks that again. rank_ci_low/high: the (1 - level)/2 and (1 + level)/2
    quantiles of a method's replicate ranks; p_best: the share of replicates in which it ranks first (k tied
    firsts get 1/k each, so p_best sums to 1). Draws: np.random.default_rng(seed), units first.
    """
    return _bootstrap(heads, scores, n_boot=n_boot, level=level, seed=seed)[OVERALL]


def _bootstrap(heads: pd.DataFrame, scores: pd.DataFrame, *, n_boot: int, level: float,
               seed: int) -> dict[str, pd.DataFrame]:
    """`bootstrap_ranks` for "overall" and for each family of heads["family"] (where given) from the same
    replicates, in one pass over the columns."""
    methods = sorted(heads["method"].unique())
    family = heads["family"] if "family" in heads else pd.Series("other", index=heads.index)
    scopes = [OVERALL, *sorted(family.unique())]
    K = len(methods)
    acc = {scope: (np.zeros((n_boot, K)), np.zeros((n_boot, K))) for scope in scopes}     # rank sums, weights
    if heads.empty:
        return {OVERALL: _summary(*acc[OVERALL], methods, level)}
    cols, methods, values, sample_ids, row_col, row_method = _board_rows(heads, scores)
    cols["family"] = [family[i] for i in heads.drop_duplicates(COLUMN).index]
    units = sorted(set(zip(cols["dataset"], cols["model"])))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(units), size=(n_boot, len(units)))                        # (n_boot, U)
    weight = _counts(draws, len(units))                                                   # (n_boot, U)
    avail_all = np.zeros((len(cols), K), dtype=bool)                                      # (C, K): on the board
    head_cols = pd.MultiIndex.from_frame(cols[COLUMN]).get_indexer(pd.MultiIndex.from_frame(heads[COLUMN].astype(str)))
    avail_all[head_cols, [methods.index(m) for m in heads["method"]]] = True
    sign = np.where(cols["higher_is_better"].astype(bool), -1.0, 1.0)                     # (C,): smaller key = better
    for u, (dataset, model) in enumerate(units):
        c_u = np.flatnonzero(cols["dataset"].eq(dataset) & cols["model"].eq(model))      # (C_u,) this unit's columns
        rows = np.flatnonzero(np.isin(row_col, c_u) & (row_method >= 0))
        ids, sample = np.unique(sample_ids[rows], return_inverse=True)
        n = len(ids)
        local = np.searchsorted(c_u, row_col[rows])
        v = np.full((n, len(c_u), K), np.nan)                                             # (n, C_u, K)
        v[sample, local, row_method[rows]] = values[rows]
        times = _counts(rng.integers(0, max(n, 1), size=(n_boot, n)), n)                # (n_boot, n): draws of each
        finite = np.isfinite(v)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (times @ np.where(finite, v, 0.0).reshape(n, -1)) / (times @ finite.reshape(n, -1))
        mean = mean.reshape(n_boot, len(c_u), K) * sign[c_u][None, :, None]               # (n_boot, C_u, K)
        avail = avail_all[c_u]                                                            # (C_u, K)
        key = np.where(avail, np.where(np.isfinite(mean), mean, np.inf), np.nan)          # NaN mean last; off-board NaN
        r = scipy.stats.rankdata(key, axis=2, method="average", nan_policy="omit")         # (n_boot, C_u, K)
        for scope in acc:
            inside = np.ones(len(c_u), dtype=bool) if scope == OVERALL else cols["family"].to_numpy()[c_u] == scope
            acc[scope][0][:] += weight[:, [u]] * np.nansum(r[:, inside], axis=1)
            acc[scope][1][:] += weight[:, [u]] * avail[inside].sum(axis=0)[None, :]
    return {scope: _summary(total, count, methods, level) for scope, (total, count) in acc.items()}


def _board_rows(heads: pd.DataFrame, scores: pd.DataFrame) -> tuple:
    """The headline columns (cols: COLUMN + higher_is_better, as str), the methods (sorted), and each stored
    score's value, sample_id, column index and method index (-1: not a board cell), found per group of the
    scores table (its string keys are converted once per group, not per row)."""
    methods = sorted(heads["method"].astype(str).unique())
    cols = heads[COLUMN + ["higher_is_better"]].drop_duplicates(COLUMN).reset_index(drop=True).astype(
        {c: str for c in COLUMN})
    s = scores[scores["metric"].isin(set(cols["metric"]))]
    g = s.groupby(COLUMN + ["method"], observed=True, sort=True)
    keys = g.size().index.to_frame(index=False).astype(str)
    keys = keys.merge(heads[COLUMN + ["method"]].astype(str).assign(_head=True), how="left", on=COLUMN + ["method"])
    col_of = pd.MultiIndex.from_frame(cols[COLUMN]).get_indexer(pd.MultiIndex.from_frame(keys[COLUMN]))
    col_of = np.where(keys["_head"].eq(True), col_of, -1)                                 # -1: not on the board
    method_of = np.asarray([methods.index(m) if m in methods else -1 for m in keys["method"]], dtype=np.int64)
    group = g.ngroup().to_numpy()
    return (cols, methods, s["value"].to_numpy(np.float64), s["sample_id"].to_numpy(), col_of[group],
            method_of[group])


def _summary(total: np.ndarray, count: np.ndarray, methods: list[str], level: float) -> pd.DataFrame:
    """Replicates' rank sums and weights (n_boot, K) -> rank CI and p_best per method (NaN: never in scope)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_rank = total / count                                                         # (n_boot, K), NaN: not drawn
    key = np.where(np.isfinite(mean_rank), mean_rank, np.inf)
    ranks = np.where(np.isfinite(mean_rank), scipy.stats.rankdata(key, axis=1, method="average"), np.nan)
    first = np.isfinite(key) & (key == key.min(axis=1, keepdims=True))                    # (n_boot, K)
    share = first / np.maximum(first.sum(axis=1, keepdims=True), 1)
    seen = np.isfinite(ranks).any(axis=0)                                                 # (K,)
    low, high = np.full(len(methods), np.nan), np.full(len(methods), np.nan)
    if seen.any():
        low[seen], high[seen] = np.nanquantile(ranks[:, seen], [(1 - level) / 2, (1 + level) / 2], axis=0)
    return pd.DataFrame({"rank_ci_low": low, "rank_ci_high": high, "p_best": share.mean(axis=0)},
                        index=pd.Index(methods, name="method"))


def _counts(draws: np.ndarray, n: int) -> np.ndarray:
    """(R, m) indices in [0, n) -> (R, n): how often each index was drawn in each row."""
    flat = (np.arange(draws.shape[0])[:, None] * n + draws).ravel()
    return np.bincount(flat, minlength=draws.shape[0] * n).reshape(draws.shape[0], n).astype(np.float64)


def controls(manifests: list[dict]) -> set[str]:
    """The methods of the runs whose `_target_` is one of CONTROL_TARGETS (as `methods.<name>` or
    `methods.controls.<name>`)."""
    return {name for m in manifests for name, node in ((m.get("config") or {}).get("method") or {}).items()
            if str((node or {}).get("_target_", "")).replace("methods.controls.", "methods.") in CONTROL_TARGETS}


def below_control(heads: pd.DataFrame, control_names: set[str]) -> pd.DataFrame:
    """One row per (headline column, method, control) where a method that is not a control has a mean worse
    than the control's in the score's direction (strictly; NaN means are not compared): a method that does
    worse than chance-level maps on the score that ranks its metric. Columns of UNFLAGGED_FAMILIES are left out."""
    if "family" in heads:
        heads = heads[~heads["family"].isin(UNFLAGGED_FAMILIES)]
    ctrl = heads[heads["method"].isin(control_names)][COLUMN + ["method", "mean"]]
    rest = heads[~heads["method"].isin(control_names)]
    pairs = rest.merge(ctrl.rename(columns={"method": "control", "mean": "control_mean"}), on=COLUMN)
    hib = pairs["higher_is_better"].astype(bool)
    worse = np.where(hib, pairs["mean"] < pairs["control_mean"], pairs["mean"] > pairs["control_mean"])
    out = pairs[worse]
    cols = BELOW_COLUMNS + (["family"] if "family" in out else [])
    return out[cols].sort_values(BELOW_COLUMNS[:6], ignore_index=True)


def model_agreement(heads: pd.DataFrame) -> pd.DataFrame:
    """Kendall tau-b (scipy.stats.kendalltau) between the method rankings of every pair of (dataset, model):
    each unit's ranking is its methods' mean rank over its headline columns (tables.overall_rank), compared
    on the methods both ranked; fewer than 2 such methods: NaN. Does the ranking generalise across models?"""
    per_unit = heads.groupby(UNIT + ["method"], observed=True)["rank"].mean().unstack("method")   # (units, methods)
    rows = []
    for a, b in itertools.combinations(per_unit.index, 2):
        pair = per_unit.loc[[a, b]].T.dropna()
        res = scipy.stats.kendalltau(pair.iloc[:, 0], pair.iloc[:, 1]) if len(pair) >= 2 else None
        rows.append({"dataset_a": a[0], "model_a": a[1], "dataset_b": b[0], "model_b": b[1],
                     "tau": float(res.statistic) if res else np.nan, "p_value": float(res.pvalue) if res else np.nan,
                     "n_methods": len(pair)})
    return pd.DataFrame(rows, columns=KENDALL_COLUMNS)
