"""Reports from the result store: tidy tables, a bootstrap leaderboard, Markdown and seaborn figures.

A report reads only the store (DESIGN): every ``manifest.json`` below a folder and
exactly the Parquet cells it lists. Directions come from each run's ``score_meta``.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench import stats
from bench.checks import check_name
from bench.page import render_page
from bench.store import CURVE_COLUMNS, SCORE_COLUMNS, remove_stale_temporaries, write_atomic

log = logging.getLogger(__name__)
META_COLUMNS = ["metric", "score", "higher_is_better"]
SAMPLE_COLUMNS = ["run_id", "sample_id", "target"]
FAILURE_COLUMNS = ["run_id", "dataset", "model", "method", "metric", "error"]
_NUMERIC = {"sample_id", "value", "step", "x", "y"}
_BOARD_KEYS = ["dataset", "model", "method", "metric", "score"]
_COLUMN_KEYS = ["dataset", "model", "metric", "score"]   # one leaderboard column of one table
_STATS = ["mean", "ci_low", "ci_high", "n", "n_nan"]


@dataclass(frozen=True)
class Results:
    """Everything the runs below one folder stored, as tidy tables."""

    scores: pd.DataFrame      # SCORE_COLUMNS: one row per sample and score
    curves: pd.DataFrame      # CURVE_COLUMNS: one row per sample and step; x_label "" when absent
    meta: pd.DataFrame        # META_COLUMNS: one row per (metric, score)
    failures: pd.DataFrame    # FAILURE_COLUMNS: one row per failed (method, metric) of a run
    manifests: list[dict]
    paths: list[Path] = field(default_factory=list)   # each manifest's file, in the order of `manifests`
    samples: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SAMPLE_COLUMNS))   # each sample's class


def load(root: str | Path) -> Results:
    """Read every run below `root`: each manifest.json and exactly the cells it lists.

    Other Parquet files beside a manifest (stale cells of an older config) are ignored.
    NaN values are kept: they mean "undefined for this sample".
    """
    root = Path(root)
    paths = sorted(root.rglob("manifest.json")) if root.is_dir() else []
    if not paths:
        raise ValueError(f"no manifest.json found below {str(root)!r}; run `python -m bench` first, "
                         "or pass the folder it wrote its results to")
    manifests, scores, curves, meta, failures, samples = [], [], [], [], [], []
    for path in paths:
        manifest = _read_manifest(path)
        manifests.append(manifest)
        if manifest.get("samples"):
            samples.append(_read_cell(path, manifest["samples"]).assign(run_id=manifest["run_id"])[SAMPLE_COLUMNS])
        for cell in manifest["cells"]:                   # the manifest says whose a cell is (it may be a copy)
            scores.append(_read_cell(path, cell.get("scores")).assign(run_id=manifest["run_id"]))
            if cell.get("curves"):
                curves.append(_read_cell(path, cell["curves"]).assign(run_id=manifest["run_id"]))
        meta += manifest.get("score_meta", [])
        run = {key: manifest[key] for key in ("run_id", "dataset", "model")}
        failures += [{**failure, **run} for failure in manifest.get("failures", [])]
    return Results(scores=_table(scores, SCORE_COLUMNS), curves=_table(curves, CURVE_COLUMNS),
                   meta=_directions(pd.DataFrame(meta, columns=META_COLUMNS)),
                   failures=pd.DataFrame(failures, columns=FAILURE_COLUMNS), manifests=manifests, paths=paths,
                   samples=pd.concat(samples, ignore_index=True) if samples else pd.DataFrame(columns=SAMPLE_COLUMNS))


def group_of(manifest: dict) -> str:
    """The report group of a run: its identity's group (bench.run.identity: tag and configuration, less dataset and
    model), so the models of one experiment share a table and other experiments or swept values do not."""
    return str((manifest.get("identity") or {}).get("group") or "legacy")


def groups(results: Results) -> dict[str, tuple[Results, list[str]]]:
    """Split `results` by `group_of`: {group: (its results, notes)}. Within a group, a (dataset, model) with
    several runs keeps the newest (by `finished`); each superseded run is named in the notes, never mixed in."""
    by_group: dict[str, dict[tuple[str, str], list[int]]] = {}
    for i, m in enumerate(results.manifests):
        by_group.setdefault(group_of(m), {}).setdefault((m["dataset"], m["model"]), []).append(i)
    out = {}
    for group, pairs in sorted(by_group.items()):
        keep, notes = [], []
        for (dataset, model), idx in sorted(pairs.items()):
            idx = sorted(idx, key=lambda i: str(results.manifests[i].get("finished", "")))
            keep.append(idx[-1])
            notes += [f"{dataset} / {model}: run {results.manifests[i]['run_id']} ({results.paths[i].parent}) is "
                      f"superseded by the newer run {results.manifests[idx[-1]]['run_id']} and left out" for i in idx[:-1]]
        runs = {results.manifests[i]["run_id"] for i in keep}
        out[group] = (replace(results, scores=_rows_of(results.scores, runs), curves=_rows_of(results.curves, runs),
                              failures=_rows_of(results.failures, runs), samples=_rows_of(results.samples, runs),
                              manifests=[results.manifests[i] for i in keep],
                              paths=[results.paths[i] for i in keep]), notes)
    return out


def _rows_of(table: pd.DataFrame, runs: set[str]) -> pd.DataFrame:
    """The rows of `table` whose run_id is one of `runs`."""
    return table[table["run_id"].astype(str).isin(runs)].reset_index(drop=True)


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


def leaderboard(results: Results, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Tidy leaderboard: one row per (dataset, model, method, metric, score), "@" stage scores and "_std"
    spreads of repeated randomization draws excluded (they describe a score, they are not ranked).

    mean and n use the n non-NaN samples, n_nan counts the undefined ones; ci_low/ci_high
    are `bootstrap_ci` at 95%. rank orders methods within each (dataset, model, metric,
    score) by mean in the score's direction: 1 = best, ties averaged, NaN mean last.
    """
    detail = results.scores["score"].str.contains("@", regex=False) | results.scores["score"].str.endswith("_std")
    scores = results.scores[~detail]                        # per-stage scores and the spread of repeated draws
    board = _summarise(scores, _BOARD_KEYS, value="value", n_boot=n_boot, seed=seed)
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
    board["rank"] = key.groupby([board[c] for c in _COLUMN_KEYS]).rank(method="average", na_option="bottom")
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
    rows = s[[k in wanted for k in zip(s["run_id"], s["metric"], s["score"])]]
    rows = rows.merge(results.samples, on=["run_id", "sample_id"], how="inner")
    if rows.empty:
        return pd.DataFrame(columns=_BOARD_KEYS + _STATS), pd.DataFrame(columns=META_COLUMNS)
    out = []
    for key, g in rows.groupby(_BOARD_KEYS, sort=True):
        v, c = g["value"].to_numpy(np.float64), g["target"].to_numpy(np.int64)
        low, high = _class_mean_ci(v, c, n_boot=n_boot, seed=seed)
        mean = float(class_mean(torch.tensor(v), torch.tensor(c)))
        out.append({**dict(zip(_BOARD_KEYS, key)), "score": f"{key[-1]}_class_mean", "mean": mean, "ci_low": low,
                    "ci_high": high, "n": int(np.isfinite(v).sum()), "n_nan": int((~np.isfinite(v)).sum())})
    means = pd.DataFrame(out, columns=_BOARD_KEYS + _STATS)
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


def overall_rank(board: pd.DataFrame) -> pd.DataFrame:
    """Mean of each method's ranks over the leaderboard columns it has, ranked again (1 = best)."""
    out = board.groupby(["dataset", "model", "method"])["rank"].mean().rename("mean_rank").reset_index()
    out["rank"] = out.groupby(["dataset", "model"])["mean_rank"].rank(method="average")
    return out


def format_leaderboard(board: pd.DataFrame) -> str:
    """Markdown: one table per (dataset, model), methods by overall rank, the best per column in bold."""
    overall = overall_rank(board)
    sections = []
    for (dataset, model), table in board.groupby(["dataset", "model"], sort=True):
        ranks = overall[overall["dataset"].eq(dataset) & overall["model"].eq(model)].sort_values(["rank", "method"])
        arrow = np.where(table["higher_is_better"], " (↑)", " (↓)")
        table = table.assign(column=table["metric"] + "/" + table["score"] + arrow, cell=_cells(table))
        columns = table.sort_values(["metric", "score"])["column"].unique()
        wide = table.pivot(index="method", columns="column", values="cell")
        wide = wide.reindex(index=ranks["method"], columns=columns).fillna("–").assign(**{"mean rank": ranks["mean_rank"].map("{:.2f}".format).to_numpy()})
        sections.append(f"## {dataset} / {model}\n\n{_markdown(wide)}\n\n{_sample_note(table)}\n")
    return "\n".join(sections)


def format_latex(board: pd.DataFrame) -> str:
    """LaTeX (booktabs) leaderboard, one tabular per (dataset, model): mean [95% CI], best in bold."""
    sections = []
    for (dataset, model), table in board.groupby(["dataset", "model"], sort=True):
        arrow = np.where(table["higher_is_better"], r" $\uparrow$", r" $\downarrow$")
        cells = [rf"\textbf{{{c[2:-2]}}}" if c.startswith("**") else c for c in _cells(table)]
        wide = table.assign(column=_tex_escape(table["metric"] + "/" + table["score"]) + arrow, cell=cells)
        wide = wide.pivot(index="method", columns="column", values="cell").fillna("--")
        lines = [f"% {dataset} / {model}", r"\begin{tabular}{l" + "r" * wide.shape[1] + "}", r"\toprule",
                 " & ".join(["method", *wide.columns]) + r" \\", r"\midrule",
                 *(" & ".join([m, *row]) + r" \\" for m, row in zip(_tex_escape(wide.index.to_series()), wide.to_numpy())),
                 r"\bottomrule", r"\end{tabular}"]
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def significance(results: Results, *, alpha: float = 0.05) -> dict[str, pd.DataFrame]:
    """Per leaderboard column (dataset, model, metric, score), on the samples every method scored:

    - ``friedman``: Friedman test across methods, Nemenyi critical difference (Demšar 2006), and the
      reliability of the metric (Tomsett et al. 2020): inter-rater (Krippendorff's ordinal alpha of
      per-sample method ranks) and inter-method (mean Spearman of per-sample scores over method pairs);
    - ``pairwise``: Wilcoxon signed-rank tests for every method pair, Holm-corrected;
    - ``ranks``: each method's average per-sample rank (1 = best), what the CD diagram draws.
    """
    scores = results.scores[~results.scores["score"].str.contains("@", regex=False)]
    direction = results.meta.set_index(["metric", "score"])["higher_is_better"]
    friedman, pairwise, ranks = [], [], []
    for key, part in scores.groupby(_COLUMN_KEYS, sort=True):
        table = stats.sample_matrix(part)
        hib = bool(direction[key[2], key[3]])
        keys = dict(zip(_COLUMN_KEYS, key))
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

# Randomization tests of the sanity table: metric function -> its score there (Spearman of |maps|)
SANITY_TESTS = ("metrics.mprt", "metrics.smprt", "metrics.random_logit", "metrics.data_randomization")
SANITY_SCORES = ("spearman", "spearman_signed")      # Adebayo et al.'s ABS and signed maps, side by side
SANITY_STAGED = ("metrics.mprt", "metrics.smprt")     # cascading: also after the first stage (the logit layer)
SANITY_COLUMNS = ["dataset", "model", "method", "metric", "score", "stage", "mean", "ci_low", "ci_high", "n", "n_nan",
                  "threshold", "passed"]


def sanity(board: pd.DataFrame, manifests: list[dict], *, threshold: float = 0.3, results: Results | None = None,
           n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The sanity table (Adebayo et al. 2018): per (dataset, model, method) and randomization test,
    the Spearman correlation of the ABS maps (sum_c |E_c|, `spearman`) and of the signed maps
    (sum_c E_c, `spearman_signed`) before and after the change, mean and 95% CI over samples (from
    `board`). Tests: mprt / smprt in a cascading order (stage "last": every layer randomized;
    `independent` is left out, its last stage is one layer), random_logit (map for another class)
    and data_randomization (model trained on permuted labels), found by each run's `_target_`,
    whatever the metric's name. With `results`, cascading tests also get their first stage (the
    layer randomized first, the logit layer top-down: the paper's gradual decorrelation), summarised
    as `leaderboard` does. passed = |mean| < threshold: the map changed with the model (a control such
    as edge fails; a strongly anti-correlated signed map has not changed either); NaN where every
    sample is undefined.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"sanity threshold must be in (0, 1] (a Spearman correlation), got {threshold}")
    keep, staged = set(), set()
    for m in manifests:
        for name, node in ((m.get("config") or {}).get("metric") or {}).items():
            target = str((node or {}).get("_target_"))
            if target in SANITY_TESTS and (node or {}).get("order", "cascading") != "independent":
                keep |= {(m["dataset"], m["model"], name, score) for score in SANITY_SCORES}
                if target in SANITY_STAGED:
                    staged.add((m["dataset"], m["model"], name))
    rows = board[[k in keep for k in zip(board["dataset"], board["model"], board["metric"], board["score"])]]
    rows = rows.assign(stage="last")
    if results is not None and staged and len(results.curves):
        c = results.curves
        first = c[(c["step"] == 0) & c["curve"].isin(SANITY_SCORES) & c["x_label"].astype(str).ne("")]
        first = first[[k in staged for k in zip(first["dataset"], first["model"], first["metric"])]]
        first = first.assign(stage=first["x_label"].astype(str), score=first["curve"].astype(str), value=first["y"])
        summary = _summarise(first, _BOARD_KEYS + ["stage"], value="value", n_boot=n_boot, seed=seed)
        rows = pd.concat([rows, summary], ignore_index=True)
    passed = (rows["mean"].abs() < threshold).astype(object).where(rows["mean"].notna())
    out = rows.assign(threshold=threshold, passed=passed)
    out = out.assign(_last=out["stage"].eq("last"))
    return out.sort_values(["dataset", "model", "metric", "_last", "score", "method"], ignore_index=True)[SANITY_COLUMNS]


def format_sanity(table: pd.DataFrame) -> str:
    """Markdown: one table per (dataset, model), methods x tests, 'mean [CI] pass|fail'."""
    if table.empty:
        return "No randomization tests (mprt, smprt, random_logit, data_randomization) in these runs.\n"
    threshold = float(table["threshold"].iloc[0])
    verdict = table["passed"].map({True: "pass", False: "fail"}).fillna("undefined")
    cells = table.assign(cell=[f"{m:.3g} [{lo:.3g}, {hi:.3g}] {v}" if np.isfinite(m) else f"– {v}"
                               for m, lo, hi, v in zip(table["mean"], table["ci_low"], table["ci_high"], verdict)],
                         column=[f"{metric} {'signed' if score == 'spearman_signed' else 'ABS'}"
                                 + ("" if stage == "last" else f" @{stage}")
                                 for metric, score, stage in zip(table["metric"], table["score"], table["stage"])])
    sections = [f"Spearman rank correlation of the maps before and after each randomization, ABS (sum_c |E_c|) and "
                f"signed (sum_c E_c) side by side (mprt: every layer randomized, `@layer`: after the first stage "
                f"alone; random_logit: another class; data_randomization: model trained on permuted labels), "
                f"mean [95% CI] over samples. pass: |mean| < {threshold:g}, the map changed with the model; controls "
                f"(edge) are expected to fail.\n"]
    for (dataset, model), part in cells.groupby(["dataset", "model"], sort=True):
        wide = part.pivot(index="method", columns="column", values="cell").fillna("–")
        wide = wide[list(dict.fromkeys(part["column"]))]                       # the table's order, first stage first
        sections.append(f"## {dataset} / {model}\n\n{_markdown(wide)}\n")
    return "\n".join(sections)


def write_report(root: str | Path, out_dir: str | Path | None = None, *, n_boot: int = 1000, seed: int = 0,
                 gallery: bool = False, sanity_threshold: float = 0.3) -> Path:
    """Write the report into ``<root>/report`` (or `out_dir`) and return the folder; every file atomically.

    One report per run group (`groups`): with one group (one experiment over its models) the files lie in
    the folder itself; with several, each group's in ``<folder>/<group>/`` and an index.md lists them, so two
    experiments, or two values of a sweep, never share a table. The files of one report are `_write_group`'s.
    """
    out = Path(root) / "report" if out_dir is None else Path(out_dir)
    split = groups(load(root))
    if len(split) == 1:
        (results, notes), = split.values()
        return _write_group(results, notes, out, n_boot=n_boot, seed=seed, gallery=gallery,
                            sanity_threshold=sanity_threshold)
    for stale in out.glob("*.*"):                       # a single report written here before: it would read as current
        if stale.is_file() and stale.suffix in {".csv", ".md", ".tex", ".parquet", ".png", ".pdf", ".html"}:
            stale.unlink()
    lines = ["# Runs below this folder, one report per group", ""]
    for group, (results, notes) in split.items():
        _write_group(results, notes, out / group, n_boot=n_boot, seed=seed, gallery=gallery,
                     sanity_threshold=sanity_threshold)
        runs = ", ".join(f"{m['dataset']}/{m['model']}" for m in results.manifests)
        overrides = sorted({o for m in results.manifests for o in (m.get("identity") or {}).get("overrides", [])
                            if not o.startswith(("model=", "dataset="))})
        lines.append(f"- [{group}]({group}/leaderboard.md): {runs}" + (f"; {' '.join(overrides)}" if overrides else ""))
    write_atomic(out / "index.md", partial(Path.write_text, data="\n".join(lines) + "\n", encoding="utf-8"))
    print(f"{len(split)} report groups written to {out} (index.md)")
    return out


def _write_group(results: Results, notes: list[str], out: Path, *, n_boot: int, seed: int, gallery: bool,
                 sanity_threshold: float) -> Path:
    """One group's report into `out`, every file atomically.

    Tables: leaderboard.{csv,md,tex,parquet}, overall_rank.csv, significance.csv (Friedman, critical
    difference, reliability), pairwise.csv (Wilcoxon + Holm), agreement.csv (Kendall tau between
    metrics), cost.csv, failures.csv, sanity.{csv,md} (randomization tests, pass/fail at
    `sanity_threshold`). Figures (PNG and PDF): scores_*, ranks_*, agreement_*, curves_*,
    cd_*; with `gallery`, gallery_* and mprt_grid_* (bench.gallery, maps recomputed from the cached models).
    Page: leaderboard.html, self-contained, with every figure and manifest.
    """
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)                        # hidden half-written files of a killed report
    board = leaderboard(results, n_boot=n_boot, seed=seed)
    markdown = format_leaderboard(board)
    for note in notes:
        log.warning("report: %s", note)
        markdown += f"\nNote: {note}.\n"
    if len(results.failures):
        markdown += f"\n{len(results.failures)} failed cells: see failures.csv\n"
        write_atomic(out / "failures.csv", partial(results.failures.to_csv, index=False))
    else:
        (out / "failures.csv").unlink(missing_ok=True)   # a stale list would blame runs that now pass
    write_atomic(out / "leaderboard.csv", partial(board.to_csv, index=False))
    write_atomic(out / "overall_rank.csv", partial(_wide_ranks(board).to_csv, index=False))
    write_atomic(out / "leaderboard.md", partial(Path.write_text, data=markdown, encoding="utf-8"))
    write_atomic(out / "leaderboard.tex", partial(Path.write_text, data=format_latex(board), encoding="utf-8"))
    write_atomic(out / "leaderboard.parquet", partial(board.to_parquet, index=False))
    tests = significance(results)
    tables = {"significance": tests["friedman"], "pairwise": tests["pairwise"],
              "agreement": stats.metric_agreement(board), "cost": cost(results)}
    for name, table in tables.items():
        write_atomic(out / f"{name}.csv", partial(table.to_csv, index=False))
    sanity_table = sanity(board, results.manifests, threshold=sanity_threshold, results=results, n_boot=n_boot,
                          seed=seed)
    write_atomic(out / "sanity.csv", partial(sanity_table.to_csv, index=False))
    write_atomic(out / "sanity.md", partial(Path.write_text, data=format_sanity(sanity_table), encoding="utf-8"))
    from bench import figures as fig                    # matplotlib and seaborn only when figures are due
    figures = fig.plot_summary(board, tables["agreement"], out) + fig.plot_curves(results, out, n_boot=n_boot, seed=seed)
    if len(tests["ranks"]):
        figures += fig.plot_critical_difference(tests["ranks"], tests["friedman"], out)
    if gallery:                                         # gallery_*, mprt_grid_*: maps recomputed by bench.gallery
        from bench.gallery import write_gallery
        for path in results.paths:
            figures += write_gallery(path.parent, out, errors="warn")
    page = render_page(board, overall_rank(board), figures, results.manifests, sanity=sanity_table)
    write_atomic(out / "leaderboard.html", partial(Path.write_text, data=page, encoding="utf-8"))
    print(markdown)
    print(f"report written to {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m bench.report RESULTS_DIR [--out DIR] [--n-boot N] [--seed S]``."""
    parser = argparse.ArgumentParser(prog="python -m bench.report", description="Leaderboard and figures of a results folder.")
    parser.add_argument("results_dir", help="folder that `python -m bench` wrote its runs to")
    parser.add_argument("--out", default=None, help="output folder (default: RESULTS_DIR/report)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples per CI")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--gallery", action=argparse.BooleanOptionalAction, default=True,
                        help="also the gallery of maps and MPRT grids (bench.gallery; needs the cached models)")
    parser.add_argument("--sanity-threshold", type=float, default=0.3,
                        help="sanity table: a randomization test passes when the mean Spearman is below this")
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")                 # the CLI writes files only, never opens a window
    try:
        write_report(args.results_dir, args.out, n_boot=args.n_boot, seed=args.seed, gallery=args.gallery,
                     sanity_threshold=args.sanity_threshold)
    except (ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")


def _read_manifest(path: Path) -> dict:
    """Parse one manifest and check what a report takes from it: the keys it needs, names that become
    file names (dataset, model, run_id), and cell files inside the manifest's folder."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno}, column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise ValueError(f"{path} is not valid JSON ({where}); it was cut off or edited: remove it or re-run "
                         "that run") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not a run manifest (a JSON object); remove it or re-run that run")
    missing = [k for k in ("run_id", "dataset", "model", "cells") if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it was not written by `python -m bench`, remove or re-run it")
    for key in ("dataset", "model", "run_id"):
        try:
            if not isinstance(manifest[key], str):
                raise ValueError(f"{key} name {manifest[key]!r} cannot be used in a file name: it is not a string")
            check_name(key, manifest[key])
        except ValueError as e:
            raise ValueError(f"{path}: {e}; this manifest was not written by `python -m bench`, remove it") from None
    folder = path.parent.resolve()
    for cell in manifest["cells"]:
        for relative in (cell.get("scores"), cell.get("curves")):
            if relative and not (folder / relative).resolve().is_relative_to(folder):
                raise ValueError(f"{path} lists the cell file {relative!r}, outside its folder; remove the manifest")
    return manifest


def _read_cell(manifest: Path, relative: str | None) -> pd.DataFrame:
    """Read one Parquet file listed in a manifest, relative to the manifest's folder."""
    path = manifest.parent / (relative or "")
    if not relative or not path.is_file():
        raise ValueError(f"{manifest} lists the cell file {relative!r}, which is missing; re-run that run")
    return pd.read_parquet(path)


def _table(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """Concatenate cells into one table with plain string keys (categories differ between files)."""
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    if missing := sorted(set(columns) - set(df.columns)):
        raise ValueError(f"result cells lack columns {missing}; re-run them with the current runner")
    df = df[columns].copy()
    for c in set(columns) - _NUMERIC:
        df[c] = df[c].astype(object).fillna("").astype(str)
    return df


def _directions(meta: pd.DataFrame) -> pd.DataFrame:
    """One direction per (metric, score); runs that disagree are an error."""
    meta = meta.astype({"higher_is_better": bool}).drop_duplicates(ignore_index=True)
    clash = meta.loc[meta.duplicated(["metric", "score"]), ["metric", "score"]]
    if len(clash):
        names = ", ".join(clash["metric"] + "/" + clash["score"])
        raise ValueError(f"runs disagree on whether higher is better for {names} (e.g. pixel flipping "
                         "MoRF vs LeRF); report them from separate folders")
    return meta


def _summarise(df: pd.DataFrame, keys: list[str], *, value: str, n_boot: int, seed: int) -> pd.DataFrame:
    """Mean, bootstrap CI, n (non-NaN) and n_nan of `value` per group of `keys`."""
    if df.empty:
        return pd.DataFrame(columns=keys + _STATS)
    g = df.groupby(keys, sort=True)[value]
    out = g.agg(["mean", "count", "size"]).rename(columns={"count": "n"})
    ci = g.apply(lambda v: bootstrap_ci(v.to_numpy(), n_boot=n_boot, seed=seed))
    out[["ci_low", "ci_high"]] = pd.DataFrame(ci.tolist(), index=ci.index)
    out["n_nan"] = out.pop("size") - out["n"]
    return out[_STATS].reset_index()


def _cells(table: pd.DataFrame) -> list[str]:
    """'mean [ci_low, ci_high]' to 3 significant digits, in bold where the rank is the column's best."""
    best = table["rank"].eq(table.groupby(_COLUMN_KEYS)["rank"].transform("min")) & table["mean"].notna()
    text = [("–" if np.isnan(m) else f"{m:.3g}" if np.isnan(lo) else f"{m:.3g} [{lo:.3g}, {hi:.3g}]")
            for m, lo, hi in zip(table["mean"], table["ci_low"], table["ci_high"])]
    return [f"**{t}**" if b else t for t, b in zip(text, best)]


def _markdown(wide: pd.DataFrame) -> str:
    """A plain Markdown table, index first (tabulate is not a dependency)."""
    header = [wide.index.name or "", *wide.columns]
    rows = [[str(i), *map(str, row)] for i, row in zip(wide.index, wide.to_numpy())]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])


def _sample_note(table: pd.DataFrame) -> str:
    """One line: samples per cell and where NaN values were excluded."""
    total = table["n"] + table["n_nan"]
    note = f"n = {total.min()}" + ("" if total.min() == total.max() else f"–{total.max()}") + " samples per cell"
    nan = table[table["n_nan"] > 0]
    if len(nan):
        where = ", ".join(f"{r.method} {r.metric}/{r.score}: {r.n_nan}" for r in nan.itertuples())
        note += f"; {nan['n_nan'].sum()} NaN values (undefined, excluded from mean and CI): {where}"
    return note + "."


def _tex_escape(text: pd.Series) -> pd.Series:
    """Escape LaTeX's special characters in names that come from configs."""
    return text.str.replace(r"[\\_&%#$\{\}~^]", lambda m: _TEX[m.group()], regex=True)


_TEX = {"\\": r"\textbackslash{}", "_": r"\_", "&": r"\&", "%": r"\%", "#": r"\#", "$": r"\$",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _wide_ranks(board: pd.DataFrame) -> pd.DataFrame:
    """overall_rank plus one rank column per metric/score."""
    ranks = board.assign(column=board["metric"] + "/" + board["score"])
    ranks = ranks.pivot(index=["dataset", "model", "method"], columns="column", values="rank").reset_index()
    return overall_rank(board).merge(ranks, on=["dataset", "model", "method"])


if __name__ == "__main__":
    main()
