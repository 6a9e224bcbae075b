"""Every table of a report, computed from what the store holds (bench.results): the leaderboard with each
metric's family, ranks overall and per family, significance, the sanity table, cost and failures, and the
curve bands the figures draw. Nothing here writes a file or draws; bench.report writes, bench.figures draws.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from bench import stats
from bench.checks import resolve_target
from bench.ranking import Ranking, headlines, rank_methods, ranked_rows
from bench.results import META_COLUMNS, Results

BOARD_KEYS = ["dataset", "model", "method", "metric", "score"]
COLUMN_KEYS = ["dataset", "model", "metric", "score"]   # one leaderboard column of one table
STATS = ["mean", "ci_low", "ci_high", "n", "n_nan"]
OTHER = "other"                                          # the family of a metric from outside metrics/ (a plug-in)
MAP_LABELS = {"spearman": "ABS", "spearman_signed": "signed"}    # a sanity score -> the map it compares (Adebayo)
SANITY_COLUMNS = ["dataset", "model", "method", "metric", "score", "stage", "mean", "ci_low", "ci_high", "n", "n_nan",
                  "threshold", "passed", "degenerate", "verdict"]
MAX_DEGENERATE = 0.1        # the sanity verdict is "degenerate" when more of a test's samples have a constant map


@dataclass(frozen=True)
class Tables:
    """The tables of one report group; `results` for what figures draw from the samples (curves)."""

    results: Results
    board: pd.DataFrame                 # leaderboard(): one row per (dataset, model, method, metric, score)
    overall: pd.DataFrame               # overall_rank()
    families: pd.DataFrame              # family_rank()
    ranks: pd.DataFrame                 # wide_ranks(): overall_rank.csv
    friedman: pd.DataFrame              # significance()
    pairwise: pd.DataFrame
    average_ranks: pd.DataFrame
    agreement: pd.DataFrame             # stats.metric_agreement
    cost: pd.DataFrame
    sanity: pd.DataFrame
    curves: pd.DataFrame                # curve_bands()
    notes: list[str] = field(default_factory=list)
    ranking: Ranking | None = None      # bench.ranking.rank_methods: across every (dataset, model) of the group


def compute(results: Results, notes: list[str] = (), *, n_boot: int = 1000, seed: int = 0,
            sanity_threshold: float = 0.3) -> Tables:
    """Every table of one report group (bench.results.groups)."""
    board = leaderboard(results, n_boot=n_boot, seed=seed)
    notes = [*notes, *headlines(results)[1]]
    tests = significance(results)
    return Tables(results=results, board=board, overall=overall_rank(board), families=family_rank(board),
                  ranks=wide_ranks(board), friedman=tests["friedman"], pairwise=tests["pairwise"],
                  average_ranks=tests["ranks"], agreement=stats.metric_agreement(board), cost=cost(results),
                  sanity=sanity(board, results.manifests, threshold=sanity_threshold, results=results,
                                n_boot=n_boot, seed=seed),
                  curves=curve_bands(results, n_boot=n_boot, seed=seed), notes=list(notes),
                  ranking=rank_methods(board, results.scores, results.manifests, n_boot=n_boot, seed=seed))


def bootstrap_ci(values: np.ndarray, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (Efron 1979) over the finite entries of `values`.

    Resample indices are ``np.random.default_rng(seed).integers(0, n, (n_boot, n))`` over
    the n finite values, drawn at once; the CI is the (1 - level)/2 and (1 + level)/2
    quantiles (numpy's linear rule) of the n_boot resampled means. Fewer than 2 finite
    values: (nan, nan). Constant values give exactly (value, value).
    """
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got n_boot={n_boot}, level={level}")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]                                             # (n,)
    if v.size < 2:
        return (np.nan, np.nan)
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))  # (n_boot, n)
    d = v - v[0]                                                      # centred, so a constant stays exact
    means = v[0] + d[idx].mean(axis=1)                                # (n_boot,)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return (float(low), float(high))


def families(manifests: list[dict]) -> dict[str, str]:
    """Each metric's family (metrics.FAMILIES) by its name in the runs, from its `_target_` (resolved as the
    runner checks targets: only inside metrics., nothing else imported); OTHER for any other target."""
    from metrics import family

    out = {}
    for m in manifests:
        for name, node in ((m.get("config") or {}).get("metric") or {}).items():
            target = str((node or {}).get("_target_", ""))
            try:
                out.setdefault(name, family(resolve_target(target, ("metrics.",))))
            except Exception:                                     # noqa: BLE001 - refused, unknown or not a metric
                out.setdefault(name, OTHER)
    return out


def family_order(names) -> list[str]:
    """Families in metrics.FAMILIES order, OTHER last."""
    from metrics import FAMILIES

    order = [*FAMILIES, OTHER]
    return sorted(set(names), key=lambda f: (order.index(f) if f in order else len(order), f))


def by_family(table: pd.DataFrame) -> list[str]:
    """The distinct values of `table["column"]` (one leaderboard column each), grouped by their rows' family in
    `family_order`, then sorted by name: the column order of every table and figure."""
    fam = table["family"] if "family" in table else pd.Series(OTHER, index=table.index)
    order = {f: i for i, f in enumerate(family_order(fam))}
    ranked = table.assign(_family=fam.map(order)).sort_values(["_family", "column"])
    return list(dict.fromkeys(ranked["column"]))


def leaderboard(results: Results, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Tidy leaderboard: one row per (dataset, model, method, metric, score) that metrics.ranked ranks ("@"
    stage scores, "_std" spreads of repeated draws and context scores such as changed_fraction describe a
    score or a run, they are not ranked).

    mean and n use the n non-NaN samples, n_nan counts the undefined ones; ci_low/ci_high
    are `bootstrap_ci` at 95%. rank orders methods within each (dataset, model, metric,
    score) by mean in the score's direction: 1 = best, ties averaged, NaN mean last.
    family: the metric's family (`families`). headline: the column is its metric's headline score
    (`headlines`), the one every rank aggregate uses, so that a metric counts once.
    """
    scores = results.scores[ranked_rows(results.scores)]
    board = summarise(scores, BOARD_KEYS, value="value", n_boot=n_boot, seed=seed)
    means, meta = _class_means(results, n_boot=n_boot, seed=seed)
    board = pd.concat([board, means], ignore_index=True) if len(means) else board
    board = board.merge(pd.concat([results.meta, meta], ignore_index=True) if len(meta) else results.meta,
                        on=["metric", "score"], how="left", validate="many_to_one")
    missing = board.loc[board["higher_is_better"].isna(), ["metric", "score"]].drop_duplicates()
    if len(missing):
        names = ", ".join(missing["metric"] + "/" + missing["score"])
        raise ValueError(f"no direction for {names}: the runs' score_meta lacks them; re-run with the current runner")
    board["higher_is_better"] = board["higher_is_better"].astype(bool)
    key = board["mean"].where(~board["higher_is_better"], -board["mean"])   # smaller key = better
    board["rank"] = key.groupby([board[c] for c in COLUMN_KEYS]).rank(method="average", na_option="bottom")
    family_of = families(results.manifests)
    board["family"] = [family_of.get(m, OTHER) for m in board["metric"]]
    head = headlines(results)[0]
    board["headline"] = [head.get((d, mo, me)) == sc for d, mo, me, sc in
                         zip(board["dataset"], board["model"], board["metric"], board["score"])]
    return board


def _class_means(results: Results, *, n_boot: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Leaderboard rows `<score>_class_mean` for the scores whose papers report the mean over classes
    (metrics.localization.CLASS_MEAN_SCORES, by each run's metric `_target_`: the pointing game, as Zhang et
    al. and TorchRay): `metrics.class_mean` of the samples' scores and classes (the run's samples table), a
    percentile bootstrap CI over samples as `bootstrap_ci`; and their directions (the score's own)."""
    from metrics.localization import CLASS_MEAN_SCORES, class_mean

    wanted = {(m["run_id"], name, score) for m in results.manifests
              for name, node in ((m.get("config") or {}).get("metric") or {}).items()
              for score in CLASS_MEAN_SCORES.get(str((node or {}).get("_target_")), ())}
    s = results.scores
    rows = s[pd.MultiIndex.from_arrays([s["run_id"], s["metric"], s["score"]]).isin(list(wanted))] if wanted else s[:0]
    rows = rows.merge(results.samples, on=["run_id", "sample_id"], how="inner")
    if rows.empty:
        return pd.DataFrame(columns=BOARD_KEYS + STATS), pd.DataFrame(columns=META_COLUMNS)
    out = []
    for key, g in rows.groupby(BOARD_KEYS, sort=True):
        v, c = g["value"].to_numpy(np.float64), g["target"].to_numpy(np.int64)
        low, high = _class_mean_ci(v, c, n_boot=n_boot, seed=seed)
        mean = float(class_mean(torch.tensor(v), torch.tensor(c)))
        out.append({**dict(zip(BOARD_KEYS, key)), "score": f"{key[-1]}_class_mean", "mean": mean, "ci_low": low,
                    "ci_high": high, "n": int(np.isfinite(v).sum()), "n_nan": int((~np.isfinite(v)).sum())})
    means = pd.DataFrame(out, columns=BOARD_KEYS + STATS)
    meta = results.meta.merge(rows[["metric", "score"]].drop_duplicates(), on=["metric", "score"])
    return means, meta.assign(score=meta["score"] + "_class_mean")


def _class_mean_ci(values: np.ndarray, classes: np.ndarray, *, n_boot: int, seed: int) -> tuple[float, float]:
    """`bootstrap_ci` of the class mean: the same resampled indices over the finite values, the mean over the
    classes present in each resample of each class's mean."""
    keep = np.isfinite(values)
    v, c = values[keep], classes[keep]
    if v.size < 2:
        return (np.nan, np.nan)
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))     # (n_boot, n)
    k = int(c.max()) + 1
    flat = (np.arange(n_boot)[:, None] * k + c[idx]).ravel()                          # (n_boot * n,)
    sums = np.bincount(flat, weights=v[idx].ravel(), minlength=n_boot * k).reshape(n_boot, k)
    counts = np.bincount(flat, minlength=n_boot * k).reshape(n_boot, k)
    with np.errstate(invalid="ignore"):
        means = np.nanmean(np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), axis=1)   # (n_boot,)
    low, high = np.quantile(means, [0.025, 0.975])
    return (float(low), float(high))


def _headline_ranks(board: pd.DataFrame) -> pd.Series:
    """board["rank"] on headline columns, NaN elsewhere (a board without the column: every column)."""
    return board["rank"].where(board["headline"].astype(bool)) if "headline" in board else board["rank"]


def overall_rank(board: pd.DataFrame) -> pd.DataFrame:
    """Mean of each method's ranks over the headline columns it has (each metric counts once), ranked again
    (1 = best); NaN for a method without one."""
    out = board.assign(rank=_headline_ranks(board)).groupby(["dataset", "model", "method"])["rank"].mean()
    out = out.rename("mean_rank").reset_index()
    out["rank"] = out.groupby(["dataset", "model"])["mean_rank"].rank(method="average")
    return out


def family_rank(board: pd.DataFrame) -> pd.DataFrame:
    """`overall_rank` within each family: the mean of a method's ranks over the family's headline columns,
    ranked again."""
    keys = ["dataset", "model", "family", "method"]
    out = board.assign(rank=_headline_ranks(board)).groupby(keys)["rank"].mean().rename("mean_rank").reset_index()
    out["rank"] = out.groupby(keys[:3])["mean_rank"].rank(method="average")
    return out


def wide_ranks(board: pd.DataFrame) -> pd.DataFrame:
    """overall_rank, then each family's rank (`rank <family>`), then one rank column per metric/score."""
    keys = ["dataset", "model", "method"]
    fam = family_rank(board)
    fam = fam.assign(column="rank " + fam["family"]).pivot(index=keys, columns="column", values="rank")
    fam = fam[["rank " + f for f in family_order(board["family"])]].reset_index()
    ranks = board.assign(column=board["metric"] + "/" + board["score"])
    ranks = ranks.pivot(index=keys, columns="column", values="rank").reset_index()
    return overall_rank(board).merge(fam, on=keys).merge(ranks, on=keys)


def significance(results: Results, *, alpha: float = 0.05) -> dict[str, pd.DataFrame]:
    """Per leaderboard column (dataset, model, metric, score), on the samples every method scored:

    - ``friedman``: Friedman test across methods, Nemenyi critical difference (Demšar 2006), and the
      reliability of the metric (Tomsett et al. 2020): inter-rater (Krippendorff's ordinal alpha of
      per-sample method ranks) and inter-method (mean Spearman of per-sample scores over method pairs);
    - ``pairwise``: Wilcoxon signed-rank tests for every method pair, Holm-corrected;
    - ``ranks``: each method's average per-sample rank (1 = best), what the CD diagram draws.
    """
    scores = results.scores[ranked_rows(results.scores)]                 # the leaderboard's columns only
    direction = results.meta.set_index(["metric", "score"])["higher_is_better"]
    friedman, pairwise, ranks = [], [], []
    for key, part in scores.groupby(COLUMN_KEYS, sort=True):
        table = stats.sample_matrix(part)
        hib = bool(direction[key[2], key[3]])
        keys = dict(zip(COLUMN_KEYS, key))
        k, n = table.shape[1], table.shape[0]
        friedman.append({**keys, **stats.friedman(table),
                         "critical_difference": stats.critical_difference(k, n, alpha=alpha) if n and k >= 2 else np.nan,
                         "inter_rater_alpha": stats.inter_rater_reliability(table, higher_is_better=hib) if n >= 2 else np.nan,
                         "inter_method_rho": stats.inter_method_reliability(table)})
        pairwise.append(stats.pairwise_wilcoxon(table, alpha=alpha).assign(**keys))
        mean_rank = stats.sample_ranks(table, higher_is_better=hib).mean()
        ranks.append(pd.DataFrame({**keys, "method": mean_rank.index, "average_rank": mean_rank.to_numpy()}))
    frame = lambda parts: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()   # noqa: E731
    return {"friedman": pd.DataFrame(friedman), "pairwise": frame(pairwise), "ranks": frame(ranks)}


def cost(results: Results) -> pd.DataFrame:
    """Seconds per sample of every method (attribution) and metric (all methods together), per run."""
    rows = [{"dataset": m["dataset"], "model": m["model"], "kind": key.split("/")[0], "name": key.split("/", 1)[1],
             "seconds": seconds, "seconds_per_sample": seconds / m.get("n_samples", np.nan)}
            for m in results.manifests for key, seconds in m.get("timings", {}).items() if "/" in key]
    return pd.DataFrame(rows, columns=["dataset", "model", "kind", "name", "seconds", "seconds_per_sample"])


def sanity(board: pd.DataFrame, manifests: list[dict], *, threshold: float = 0.3, results: Results | None = None,
           n_boot: int = 1000, seed: int = 0, max_degenerate: float = MAX_DEGENERATE) -> pd.DataFrame:
    """The sanity table (Adebayo et al. 2018): per (dataset, model, method) and randomization test, the
    scores each metric declares in its YAML (`_sanity_`, the manifest's ``metrics.<name>.sanity``; e.g.
    `spearman` of the ABS maps sum_c |E_c| and `spearman_signed` of the signed maps sum_c E_c before and
    after the change), mean and 95% CI over samples (from `board`), stage "last" (every layer randomized;
    an `independent` order is left out, its last stage is one layer). With `results`, a metric declared
    `_staged_` (cascading mprt / smprt) also gets its first stage (the layer randomized first, the logit
    layer top-down: the paper's gradual decorrelation), summarised as `leaderboard` does. passed =
    |mean| < threshold: the map changed with the model (a control such as edge fails; a strongly
    anti-correlated signed map has not changed either); NaN where every sample is undefined.
    degenerate: with `results`, the fraction of samples whose pair of maps is degenerate (either map
    constant: the metric's context score `degenerate`, `degenerate@<stage>` for a first stage), where the
    similarity is 0 or NaN by convention, not measured; above `max_degenerate` the row does not pass
    (passed False) and its verdict is "degenerate". verdict: pass, fail, undefined or degenerate.
    """
    if not 0 <= max_degenerate < 1:
        raise ValueError(f"max_degenerate must be a fraction of samples in [0, 1), got {max_degenerate}")
    if not 0 < threshold <= 1:
        raise ValueError(f"sanity threshold must be in (0, 1] (a Spearman correlation), got {threshold}")
    keep, staged = set(), set()
    for m in manifests:
        config = (m.get("config") or {}).get("metric") or {}
        for name, meta in (m.get("metrics") or {}).items():
            if not (meta or {}).get("sanity") or (config.get(name) or {}).get("order") == "independent":
                continue
            keep |= {(m["dataset"], m["model"], name, score) for score in meta["sanity"]}
            if meta.get("staged"):
                staged |= {(m["dataset"], m["model"], name, score) for score in meta["sanity"]}
    rows = board[[k in keep for k in zip(board["dataset"], board["model"], board["metric"], board["score"])]]
    rows = rows.assign(stage="last")
    if results is not None and staged and len(results.curves):
        c = results.curves
        first = c[(c["step"] == 0) & c["x_label"].astype(str).ne("")]
        first = first[[k in staged for k in zip(first["dataset"], first["model"], first["metric"], first["curve"])]]
        first = first.assign(stage=first["x_label"].astype(str), score=first["curve"].astype(str), value=first["y"])
        summary = summarise(first, BOARD_KEYS + ["stage"], value="value", n_boot=n_boot, seed=seed)
        rows = pd.concat([rows, summary], ignore_index=True)
    passed = (rows["mean"].abs() < threshold).astype(object).where(rows["mean"].notna())
    degenerate = _degenerate_fraction(rows, results)
    flat = degenerate > max_degenerate
    verdict = passed.map({True: "pass", False: "fail"}).where(passed.notna(), "undefined").where(~flat, "degenerate")
    out = rows.assign(threshold=threshold, passed=passed.where(~flat, False), degenerate=degenerate, verdict=verdict)
    out = out.assign(_last=out["stage"].eq("last"))
    return out.sort_values(["dataset", "model", "metric", "_last", "score", "method"], ignore_index=True)[SANITY_COLUMNS]


def _degenerate_fraction(rows: pd.DataFrame, results: Results | None) -> pd.Series:
    """Mean over samples of the `degenerate` score (`degenerate@<stage>`) of each sanity row's cell; NaN without it."""
    if results is None or rows.empty:
        return pd.Series(np.nan, index=rows.index, dtype=float)
    s = results.scores
    s = s[s["score"].astype(str).str.startswith("degenerate")]
    frac = s.groupby(["dataset", "model", "method", "metric", "score"], observed=True)["value"].mean().to_dict()
    keys = zip(rows["dataset"], rows["model"], rows["method"], rows["metric"],
               ["degenerate" if stage == "last" else f"degenerate@{stage}" for stage in rows["stage"]])
    return pd.Series([frac.get(k, np.nan) for k in keys], index=rows.index, dtype=float)


def curve_bands(results: Results, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean y and its 95% bootstrap band per (dataset, model, method, metric, curve, x, x_label): what the
    curve figures draw."""
    keys = ["dataset", "model", "method", "metric", "curve", "x", "x_label"]
    return summarise(results.curves, keys, value="y", n_boot=n_boot, seed=seed)


def summarise(df: pd.DataFrame, keys: list[str], *, value: str, n_boot: int, seed: int) -> pd.DataFrame:
    """Mean, bootstrap CI, n (non-NaN) and n_nan of `value` per group of `keys`."""
    if df.empty:
        return pd.DataFrame(columns=keys + STATS)
    g = df.groupby(keys, sort=True)[value]
    out = g.agg(["mean", "count", "size"]).rename(columns={"count": "n"})
    codes = g.ngroup().fillna(-1).to_numpy(np.int64)                 # each row's group in `out` (sorted); -1: none
    out[["ci_low", "ci_high"]] = _group_cis(df[value].to_numpy(np.float64), codes, len(out), n_boot=n_boot, seed=seed)
    out["n_nan"] = out.pop("size") - out["n"]
    return out[STATS].reset_index()


_BLOCK = 2**17                 # values one resampling block of `_group_cis` gathers (1 MiB of float64)


def _group_cis(values: np.ndarray, codes: np.ndarray, groups: int, *, n_boot: int, seed: int,
               level: float = 0.95) -> np.ndarray:
    """`bootstrap_ci` of every group at once, the same numbers: (groups, 2) of (low, high); `codes` gives each
    value's group (-1: none). Every group of n finite values resamples with bootstrap_ci's draw
    ``default_rng(seed).integers(0, n, (n_boot, n))``, so that draw is made once per n, and the groups of one n
    are resampled together, in blocks of at most _BLOCK values (cache-sized: faster than one large gather)."""
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got n_boot={n_boot}, level={level}")
    ci = np.full((groups, 2), np.nan)
    keep = np.isfinite(values) & (codes >= 0)
    order = np.argsort(codes[keep], kind="stable")                   # group by group, each in its rows' order
    v, c = values[keep][order], codes[keep][order]
    counts = np.bincount(c, minlength=groups)
    starts = np.cumsum(counts) - counts
    for n in np.unique(counts[counts >= 2]):
        members = np.flatnonzero(counts == n)
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))        # (n_boot, n)
        step = max(1, _BLOCK // (n_boot * n))
        for i in range(0, len(members), step):
            block = v[starts[members[i:i + step], None] + np.arange(n)]           # (G, n)
            d = block - block[:, :1]                                              # centred, as bootstrap_ci
            means = block[:, :1] + d[:, idx].reshape(-1, n).mean(axis=1).reshape(len(block), n_boot)   # (G, n_boot)
            ci[members[i:i + step]] = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=1).T
    return ci
