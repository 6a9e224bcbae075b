"""Report figures (seaborn/matplotlib) drawn from bench.tables' tables, each saved as PNG (pages, READMEs) and
PDF (papers)."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from bench.files import write_atomic
from bench.tables import COLUMN_KEYS, OTHER, by_family, overall_rank


def plot_curves(band: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """One PNG per (metric, curve) of `band` (bench.tables.curve_bands): mean y vs x per method, 95% bootstrap
    band, one column per model.

    A metric that stores both a "morf" and a "lerf" curve (pixel flipping or ROAD with
    order="both") gets one figure `curves_<metric>_morf_lerf` with both orders: MoRF solid,
    LeRF dashed, one colour per method. Non-empty x_label values (e.g. the layer randomized
    at an MPRT stage) become the x tick labels.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = sorted(band["method"].unique())
    palette = dict(zip(methods, sns.color_palette(n_colors=len(methods))))
    paths = []
    for metric, by_metric in band.groupby("metric", sort=True):
        names = sorted(by_metric["curve"].unique())
        paired = {"morf", "lerf"} <= set(names)
        figures = [(c, by_metric[by_metric["curve"].eq(c)]) for c in names if not (paired and c in _ORDERS)]
        if paired:
            both = by_metric[by_metric["curve"].isin(_ORDERS)]
            figures.insert(0, ("morf_lerf", both.assign(order=both["curve"].map(_ORDERS))))
        for curve, data in figures:
            style = {"style": "order", "style_order": list(_ORDERS.values()),
                     "dashes": dict(zip(_ORDERS.values(), ["", (4, 2)]))} if curve == "morf_lerf" else {}
            g = sns.relplot(data=data, x="x", y="mean", hue="method", hue_order=methods, palette=palette,
                            kind="line", row="dataset", col="model", marker="o", errorbar=None, height=3.5,
                            facet_kws={"sharex": False}, **style)
            try:
                for (dataset, model), ax in g.axes_dict.items():
                    facet = data[data["dataset"].eq(dataset) & data["model"].eq(model)]
                    for (method, _), m in facet.groupby(["method", "curve"]):
                        ax.fill_between(m["x"], m["ci_low"], m["ci_high"], color=palette[method], alpha=0.2, lw=0)
                    ticks = facet.drop_duplicates("x")
                    if ticks["x_label"].ne("").any():
                        ax.set_xticks(ticks["x"], ticks["x_label"], rotation=45, ha="right")
                two = curve == "morf_lerf"
                what = "MoRF (solid) and LeRF (dashed)" if two else curve
                g.set_titles("{row_name} / {col_name}").set_axis_labels(
                    *(("fraction removed", "target output") if two else ("x", curve)))
                g.figure.suptitle(f"{metric}: {what} (mean, 95% bootstrap CI over samples)", y=1.03)
                paths.append(save_figure(g.figure, out_dir / f"curves_{metric}_{curve}"))
            finally:
                plt.close(g.figure)
    return paths


_ORDERS = {"morf": "MoRF", "lerf": "LeRF"}     # curve name -> legend label of the paired figure


def plot_critical_difference(ranks: pd.DataFrame, friedman: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Demšar (2006) diagrams: methods on an axis of average rank, bars join methods whose average ranks
    differ by less than the critical difference (not significantly different). One PNG per column."""
    paths = []
    for key, part in ranks.groupby(COLUMN_KEYS, sort=True):
        row = friedman.set_index(COLUMN_KEYS).loc[key]
        part = part.sort_values("average_rank")
        r, names, cd, k = part["average_rank"].to_numpy(), part["method"].to_numpy(), row["critical_difference"], len(part)
        fig, ax = plt.subplots(figsize=(8, 1.0 + 0.2 * k))
        half = (k + 1) // 2                                     # best half labelled left, the rest right
        ax.set_xlim(-1.5, k + 2.5)
        ax.set_ylim(-0.45 - 0.25 * half, 1.2)
        ax.hlines(0, 1, k, color="black")
        ax.set_xticks(range(1, k + 1))
        for i, (x, name) in enumerate(zip(r, names)):
            left = i < half
            y, end = -0.3 - 0.25 * (i if left else k - 1 - i), (0.8 if left else k + 0.2)
            ax.plot([x, x, end], [0, y, y], color="black", lw=0.8)
            ax.text(end + (-0.05 if left else 0.05), y, f"{name} ({x:.2f})", va="center",
                    ha="right" if left else "left", fontsize=8)
        cliques = [(i, j) for i in range(k) for j in range(k - 1, i, -1) if r[j] - r[i] < cd][:k]
        maximal = [c for c in cliques if not any(o != c and o[0] <= c[0] and c[1] <= o[1] for o in cliques)]
        for level, (i, j) in enumerate(sorted(set(maximal))):
            ax.hlines(0.25 + 0.15 * level, r[i] - 0.03, r[j] + 0.03, color="tab:red", lw=3)
        if np.isfinite(cd):
            ax.hlines(0.95, 1, 1 + cd, color="black", lw=1.5)
            ax.text(1 + cd / 2, 1.02, f"CD = {cd:.2f} (average rank, 1 = best)", ha="left", fontsize=8)
        ax.set_yticks([])
        ax.spines["bottom"].set_visible(False)
        ax.tick_params(axis="x", top=True, bottom=False, labeltop=True, labelbottom=False)
        ax.set_xlabel("")
        ax.set_title(f"{key[0]} / {key[1]}: {key[2]}/{key[3]}  (Friedman p = {row['p']:.2g}, n = {int(row['n'])})", fontsize=9)
        for side in ("left", "right", "top"):
            ax.spines[side].set_visible(False)
        try:
            paths.append(save_figure(fig, Path(out_dir) / f"cd_{key[0]}_{key[1]}_{key[2]}_{key[3]}"))
        finally:
            plt.close(fig)
    return paths



def plot_summary(board: pd.DataFrame, agreement: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Per (dataset, model): every leaderboard column as a point plot with 95% CIs (methods in overall-rank
    order), the rank heatmap methods x columns, and the Kendall tau heatmap between columns."""
    paths, overall = [], overall_rank(board)
    for (dataset, model), table in board.groupby(["dataset", "model"], sort=True):
        order = overall[overall["dataset"].eq(dataset) & overall["model"].eq(model)].sort_values("rank")["method"]
        table = table.assign(column=table["metric"] + "/" + table["score"] + np.where(table["higher_is_better"], " ↑", " ↓"))
        columns = by_family(table)                              # panels grouped by the metrics' families
        family = dict(zip(table["column"], table["family"] if "family" in table else [OTHER] * len(table)))
        ncols = min(len(columns), _PANELS_PER_ROW)
        nrows = -(-len(columns) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, nrows * (0.4 * len(order) + 1.2)), sharey=True,
                                 squeeze=False)
        for ax, column in zip(axes.flat, columns):
            t = table[table["column"].eq(column)].set_index("method").reindex(order)
            y = np.arange(len(order))
            ax.errorbar(t["mean"], y, xerr=[t["mean"] - t["ci_low"], t["ci_high"] - t["mean"]], fmt="o", capsize=3)
            ax.set_yticks(y, order)
            ax.tick_params(axis="y", labelleft=ax.get_subplotspec().is_first_col())
            ax.set_title(f"{family[column]}: {column}", fontsize=9)
        for ax in axes.flat[len(columns):]:
            ax.set_visible(False)                               # the last row's unused panels
        axes[0, 0].invert_yaxis()
        fig.tight_layout()
        fig.suptitle(f"{dataset} / {model}: mean and 95% bootstrap CI", y=1.02)
        paths.append(save_figure(fig, Path(out_dir) / f"scores_{dataset}_{model}"))
        plt.close(fig)
        for name, wide, kwargs in [
            ("ranks", table.pivot(index="method", columns="column", values="rank").reindex(index=order, columns=columns),
             {"cmap": "viridis_r", "fmt": ".1f"}),
            ("agreement", _square(agreement[agreement["dataset"].eq(dataset) & agreement["model"].eq(model)]),
             {"cmap": "RdBu", "vmin": -1, "vmax": 1, "fmt": ".2f"}),
        ]:
            if wide.empty:
                continue
            fig, ax = plt.subplots(figsize=(1.1 * wide.shape[1] + 2.5, 0.45 * wide.shape[0] + 1.5))
            sns.heatmap(wide, annot=True, ax=ax, cbar=False, **kwargs)
            ax.set_title(f"{dataset} / {model}: " + ("rank per column (1 = best)" if name == "ranks"
                                                      else "Kendall tau between method rankings"), fontsize=9)
            ax.set_xlabel(""), ax.set_ylabel("")
            paths.append(save_figure(fig, Path(out_dir) / f"{name}_{dataset}_{model}"))
            plt.close(fig)
    return paths



_PANELS_PER_ROW = 4     # point plots wrap after this many leaderboard columns, so a README can show them


def _square(agreement: pd.DataFrame) -> pd.DataFrame:
    """Symmetric column x column matrix of Kendall tau with 1 on the diagonal."""
    names = sorted(set(agreement["column_a"]) | set(agreement["column_b"]))
    m = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
    for a, b, tau in agreement[["column_a", "column_b", "kendall_tau"]].itertuples(index=False):
        m.loc[a, b] = m.loc[b, a] = tau
    return m



def save_figure(fig, stem: Path) -> Path:
    """Write `fig` as stem.png (for pages and READMEs) and stem.pdf (for papers); return the PNG path.

    The tight bounding box (what bbox_inches="tight" computes, padded by 0.1 in) is measured once
    and reused for both files: one draw less per file, the same images.
    """
    bbox = fig.get_tightbbox(fig.canvas.get_renderer()).padded(0.1)
    for suffix, dpi in ((".png", 120), (".pdf", None)):
        write_atomic(stem.with_name(stem.name + suffix), partial(fig.savefig, dpi=dpi, bbox_inches=bbox))
    return stem.with_name(stem.name + ".png")
