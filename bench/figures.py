"""Report figures drawn from bench.tables' tables with plain matplotlib (no pyplot state, no seaborn), each saved
as PNG (pages, READMEs) and, when asked, PDF (papers).

Per-column figures (point plots, critical-difference panels) show each metric's headline score when the board
marks them (a boolean `headline` column), every ranked column otherwise. Controls (methods.controls: random,
edge, centre, constant) are drawn dashed and on top, so they stay visible where a method's curve overlaps them.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from bench.files import write_atomic
from bench.tables import COLUMN_KEYS, OTHER, by_family, overall_rank

DPI = 100                  # PNG resolution: a 7 in wide figure is 700 px, full width on the page
PNG_LEVEL = 3              # zlib level: a default run's figures encode in half the time of 6, 4% larger
# what a curve's axes show, by the metric's function (its `_target_`); "{curve}" is the stored curve's name
CURVE_AXES = {
    "pixel_flipping": ("fraction of pixels removed", "model output (target class)"),
    "deletion": ("fraction of pixels deleted", "model output (target class)"),
    "insertion": ("fraction of pixels inserted", "model output (target class)"),
    "road": ("fraction of pixels imputed", "model output (target class)"),
    "monotonicity": ("fraction of pixels added, least relevant first", "model output (target class)"),
    "sensitivity_n": ("subset size n (fraction of pixels)", "Pearson r: attribution sum vs output drop"),
    "mprt": ("layer randomized", "similarity to the original map ({curve})"),
    "smprt": ("layer randomized", "similarity to the original map ({curve})"),
}
_ORDERS = {"morf": "MoRF", "lerf": "LeRF"}     # curve name -> panel label of the paired figure
_PANELS_PER_ROW = 4                            # panels wrap after this many columns


def curve_axes(manifests: list[dict]) -> dict[str, tuple[str, str]]:
    """Axis labels (x, y with "{curve}") per metric name of the runs, from CURVE_AXES by the metric's target."""
    out = {}
    for m in manifests:
        for name, node in ((m.get("config") or {}).get("metric") or {}).items():
            function = str((node or {}).get("_target_", "")).rsplit(".", 1)[-1]
            if function in CURVE_AXES:
                out.setdefault(name, CURVE_AXES[function])
    return out


def plot_curves(band: pd.DataFrame, out_dir: str | Path, *, axes: dict[str, tuple[str, str]] | None = None,
                controls: set[str] = frozenset(), board: pd.DataFrame | None = None, pdf: bool = False) -> list[Path]:
    """One figure per metric of `band` (bench.tables.curve_bands): mean y vs x per method with its 95% bootstrap
    band, one panel per (dataset, model) and a row of panels per curve: `curves_<metric>_<curve>` for a metric
    with one curve, `curves_<metric>` with a row per curve for several (mprt's five similarity measures). A metric
    with both a "morf" and a "lerf" curve gets the figure `curves_<metric>_morf_lerf`, MoRF panels above LeRF
    panels, and its other curves their own. x_label values (the layer randomized at
    an MPRT stage) become the x tick labels; `axes` (`curve_axes`) names what the axes show. Where `board` marks
    headline columns, a curve named as one of its metric's scores is drawn only for a headline score (mprt's
    spearman, not its four other measures); other curves (pixel flipping's) always."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = sorted(band["method"].unique())
    colour = dict(zip(methods, _colours(len(methods))))
    paths, keep = [], _headline_keys(board)
    skip = set() if keep is None else {(m, s) for m, s in zip(board["metric"], board["score"])} - {k[2:] for k in keep}
    for metric, by_metric in band.groupby("metric", sort=True):
        names = sorted(c for c in by_metric["curve"].unique() if (metric, c) not in skip)
        paired = {"morf", "lerf"} <= set(names)
        rest = [c for c in names if not (paired and c in _ORDERS)]
        figures = ([("morf_lerf", list(_ORDERS))] if paired else []) + (
            [(rest[0], rest)] if len(rest) == 1 else [("", rest)] if rest else [])   # one figure, a row per curve
        xlabel, ylabel = (axes or {}).get(metric, ("step", "{curve}"))
        for name, curves in figures:
            data = by_metric[by_metric["curve"].isin(curves)]
            pairs = sorted(set(zip(data["dataset"], data["model"])))
            ncols = min(len(pairs), _PANELS_PER_ROW)
            nrows = -(-len(pairs) // ncols) * len(curves)
            below = 0.45 + 0.7 * _text_width(data["x_label"].unique(), 7)       # x tick labels at 45 degrees
            block = nrows // len(curves)                                        # panel rows of one curve
            # a column's panels share their x axis (one (dataset, model)): its ticks and label under the last only
            gap = 0.55 if block == 1 and len(curves) > 1 else below + 0.35
            fig, grid = _grid(nrows, ncols, panel=(3.0, 2.2), left=0.8, right=_text_width(methods, 8) + 0.7,
                              top=0.75, bottom=below, wgap=0.5, hgap=gap)
            drawn = {}
            for r, curve in enumerate(curves):
                for i, (dataset, model) in enumerate(pairs):
                    ax = grid[r * block + i // ncols, i % ncols]
                    facet = data[data["dataset"].eq(dataset) & data["model"].eq(model) & data["curve"].eq(curve)]
                    for method, m in facet.groupby("method", sort=True):
                        control = method in controls
                        _band(ax, m["x"], m["ci_low"], m["ci_high"], color=colour[method], alpha=0.2, lw=0,
                              zorder=2.5 if control else 1)
                        drawn[method] = ax.plot(m["x"], m["mean"], "--" if control else "-", marker="o", ms=3,
                                                color=colour[method], lw=1.6 if control else 1.2,
                                                zorder=3 if control else 2, label=method)[0]
                    ticks = facet.drop_duplicates("x")
                    if ticks["x_label"].ne("").any():
                        ax.set_xticks(ticks["x"], ticks["x_label"], rotation=45, ha="right", fontsize=7)
                    row = _ORDERS[curve] if name == "morf_lerf" else curve if len(curves) > 1 else ""
                    ax.set_title(f"{dataset} / {model}" + (f": {row}" if row else ""),
                                 fontsize=9, y=1)
                    last = r == len(curves) - 1
                    ax.set_xlabel(xlabel, fontsize=8, visible=last)
                    if i % ncols == 0:
                        ax.set_ylabel(ylabel.format(curve=curve), fontsize=8)
                    ax.tick_params(labelsize=7, labelbottom=last)        # the panel below has the same x ticks
            for ax in grid.flat:
                if not ax.has_data():
                    ax.set_visible(False)
            grid[0, -1].legend(handles=list(drawn.values()), loc="upper left", bbox_to_anchor=(1.03, 1), fontsize=8,
                               frameon=False, title="dashed: control" if set(drawn) & set(controls) else None,
                       title_fontsize=7)
            what = {"morf_lerf": ": most relevant first (MoRF) and least relevant first (LeRF)", "curve": ""}
            fig.suptitle(f"{metric}{what.get(name, ': ' + ', '.join(curves))} (mean, 95% bootstrap CI over samples)",
                         fontsize=10, y=1 - 0.15 / fig.get_figheight())
            paths.append(save_figure(fig, out_dir / "_".join(["curves", metric] + ([name] if name else [])), pdf=pdf,
                                     tight=False))
    return paths


def _band(ax, x, low, high, **kwargs) -> None:
    """What ``ax.fill_between(x, low, high, **kwargs)`` draws, without its per-call argument handling: a polygon per
    run of finite points (from (x, high), along low, then back along high), as one PolyCollection."""
    x, low, high = (np.asarray(v, dtype=np.float64) for v in (x, low, high))
    finite = np.isfinite(x) & np.isfinite(low) & np.isfinite(high)
    edges = np.flatnonzero(np.diff(np.r_[0, finite.astype(np.int8), 0]))          # start, end of every finite run
    polygons = [np.concatenate([[[x[a], high[a]]], np.c_[x[a:b], low[a:b]], [[x[b - 1], high[b - 1]]],
                                np.c_[x[a:b], high[a:b]][::-1]]) for a, b in zip(edges[::2], edges[1::2])]
    ax.add_collection(PolyCollection(polygons, **kwargs))


def plot_critical_difference(ranks: pd.DataFrame, friedman: pd.DataFrame, out_dir: str | Path, *,
                             board: pd.DataFrame | None = None, pdf: bool = False) -> list[Path]:
    """Demšar (2006) diagrams, one figure per (dataset, model) with a panel per column (the headline columns
    where `board` marks them): methods on an axis of average rank, bars join methods whose average ranks
    differ by less than the critical difference (not significantly different)."""
    tests = friedman.set_index(COLUMN_KEYS)
    keep = _headline_keys(board)
    paths = []
    for (dataset, model), by_model in ranks.groupby(["dataset", "model"], sort=True):
        panels = [(key, part) for key, part in by_model.groupby(COLUMN_KEYS, sort=True) if keep is None or key in keep]
        if not panels:
            continue
        heights = [1.0 + 0.2 * len(part) for _, part in panels]
        fig = new_figure(figsize=(8, sum(heights) + 0.3 * len(panels)))
        axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
        for ax, (key, part) in zip(axes, panels):
            _cd_panel(ax, part.sort_values("average_rank"), tests.loc[key], key)
        fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.6 / fig.get_figheight(), bottom=0.02, hspace=0.5)
        paths.append(save_figure(fig, Path(out_dir) / f"cd_{dataset}_{model}", pdf=pdf, tight=False))
    return paths


def _cd_panel(ax, part: pd.DataFrame, row: pd.Series, key: tuple) -> None:
    """One column's diagram: best half of the methods labelled left, the rest right, cliques in red."""
    r, names, cd, k = part["average_rank"].to_numpy(), part["method"].to_numpy(), row["critical_difference"], len(part)
    half = (k + 1) // 2
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
    ax.tick_params(axis="x", top=True, bottom=False, labeltop=True, labelbottom=False, labelsize=8)
    ax.set_title(f"{key[0]} / {key[1]}: {key[2]}/{key[3]}  (Friedman p = {row['p']:.2g}, n = {int(row['n'])})",
                 fontsize=9, loc="left")
    for side in ("left", "right", "top", "bottom"):
        ax.spines[side].set_visible(False)


def plot_summary(board: pd.DataFrame, agreement: pd.DataFrame, out_dir: str | Path, *, pdf: bool = False) -> list[Path]:
    """Per (dataset, model): a point plot with 95% CIs per column (methods in overall-rank order), the rank
    heatmap methods x columns, and the Kendall tau heatmap between columns; each of the headline columns only
    where the board marks them."""
    paths, overall, keep = [], overall_rank(board), _headline_keys(board)
    for (dataset, model), table in board.groupby(["dataset", "model"], sort=True):
        order = overall[overall["dataset"].eq(dataset) & overall["model"].eq(model)].sort_values("rank")["method"]
        table = table.assign(column=table["metric"] + "/" + table["score"] + np.where(table["higher_is_better"], " ↑", " ↓"))
        columns = by_family(table)                              # panels grouped by the metrics' families
        family = dict(zip(table["column"], table["family"] if "family" in table else [OTHER] * len(table)))
        shown = [c for c in columns if keep is None or any(
            k in keep for k in table.loc[table["column"].eq(c), COLUMN_KEYS].itertuples(index=False, name=None))]
        ncols = min(len(shown), _PANELS_PER_ROW)
        nrows = -(-len(shown) // ncols)
        fig, axes = _grid(nrows, ncols, panel=(2.4, 0.25 * len(order) + 0.3), left=_text_width(order, 7) + 0.2,
                          right=0.15, top=0.7, bottom=0.35, wgap=0.25, hgap=0.6, sharey=True)
        y = np.arange(len(order))
        for ax, column in zip(axes.flat, shown):
            t = table[table["column"].eq(column)].set_index("method").reindex(order)
            ax.errorbar(t["mean"], y, xerr=[t["mean"] - t["ci_low"], t["ci_high"] - t["mean"]], fmt="o", ms=4,
                        capsize=3)
            ax.set_title(f"{family[column]}: {column}", fontsize=8, y=1)
            ax.tick_params(labelsize=7)
        axes[0, 0].set_yticks(y, order)
        axes[0, 0].invert_yaxis()
        for ax in axes.flat[len(shown):]:
            ax.set_visible(False)                               # the last row's unused panels
        fig.suptitle(f"{dataset} / {model}: mean and 95% bootstrap CI", fontsize=10, y=1 - 0.15 / fig.get_figheight())
        paths.append(save_figure(fig, Path(out_dir) / f"scores_{dataset}_{model}", pdf=pdf, tight=False))
        ranks = table.pivot(index="method", columns="column", values="rank").reindex(index=order, columns=shown)
        tau = _square(agreement[agreement["dataset"].eq(dataset) & agreement["model"].eq(model)])
        if keep is not None:                                    # the headline columns' agreement only
            names = [n for n in tau.index if (dataset, model, *n.split("/", 1)) in keep]
            tau = tau.loc[names, names]
        for name, wide, cmap, fmt, limits, title in [
            ("ranks", ranks, "viridis_r", "{:.1f}", (1, max(len(order), 2)), "rank per column (1 = best)"),
            ("agreement", tau, "RdBu", "{:.2f}", (-1, 1), "Kendall tau between method rankings"),
        ]:
            if not wide.empty:
                paths.append(_heatmap(wide, cmap, fmt, limits, f"{dataset} / {model}: {title}",
                                      Path(out_dir) / f"{name}_{dataset}_{model}", pdf=pdf))
    return paths


def _heatmap(wide: pd.DataFrame, cmap: str, fmt: str, limits: tuple[float, float], title: str, stem: Path, *,
             pdf: bool) -> Path:
    """An annotated heatmap of `wide` (rows x columns), text in black or white by the cell's lightness."""
    values = wide.to_numpy(dtype=float)
    bottom = 0.7 * _text_width(wide.columns, 7) + 0.2                        # column names at 45 degrees
    fig, ax = _grid(1, 1, panel=(0.6 * wide.shape[1], 0.3 * wide.shape[0]), left=_text_width(wide.index, 7) + 0.2,
                    right=0.2, top=0.4, bottom=bottom, wgap=0, hgap=0)
    ax = ax[0, 0]
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=limits[0], vmax=limits[1], aspect="auto")
    rgb = image.to_rgba(np.nan_to_num(values, nan=limits[0]))[..., :3] @ [0.299, 0.587, 0.114]   # luma per cell
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                    color="black" if rgb[i, j] > 0.5 else "white")
    ax.set_xticks(range(wide.shape[1]), wide.columns, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(wide.shape[0]), wide.index, fontsize=7)
    ax.set_title(title, fontsize=9, y=1)
    return save_figure(fig, stem, pdf=pdf, tight=False)


# Titles above axes without top tick labels are set at y=1 (where matplotlib would place them): a fixed position
# saves the layout pass over every tick label that its automatic placement makes at each draw.


def _grid(nrows: int, ncols: int, *, panel: tuple[float, float], left: float, right: float, top: float,
          bottom: float, wgap: float, hgap: float, **kwargs):
    """A figure of nrows x ncols panels of `panel` inches, margins and gaps in inches: a fixed layout, so no
    layout pass draws the text once more (tight_layout, constrained layout). Returns (figure, axes (nrows, ncols))."""
    w, h = panel
    width, height = left + ncols * w + (ncols - 1) * wgap + right, top + nrows * h + (nrows - 1) * hgap + bottom
    fig = new_figure(figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                        wspace=wgap / w, hspace=hgap / h)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kwargs)


def _text_width(labels, fontsize: float) -> float:
    """Inches a line of the longest of `labels` takes at `fontsize` (about 0.6 em per character)."""
    return max((len(str(s)) for s in labels), default=0) * fontsize * 0.6 / 72


def _headline_keys(board: pd.DataFrame | None) -> set[tuple] | None:
    """The (dataset, model, metric, score) columns the board marks `headline`; None (every column) without one."""
    if board is None or "headline" not in board:
        return None
    return set(board.loc[board["headline"].astype(bool), COLUMN_KEYS].itertuples(index=False, name=None))


def new_figure(**kwargs) -> Figure:
    """A Figure drawn by Agg, outside pyplot's state (nothing to close, no backend to choose)."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _colours(n: int) -> list:
    """n distinct colours: tab10, tab20 past ten methods."""
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _square(agreement: pd.DataFrame) -> pd.DataFrame:
    """Symmetric column x column matrix of Kendall tau with 1 on the diagonal."""
    names = sorted(set(agreement["column_a"]) | set(agreement["column_b"]))
    pairs = pd.concat([agreement[["column_a", "column_b", "kendall_tau"]],
                       agreement.rename(columns={"column_a": "column_b", "column_b": "column_a"})
                       [["column_a", "column_b", "kendall_tau"]]])
    m = pairs.pivot_table(index="column_a", columns="column_b", values="kendall_tau", aggfunc="first")
    values = m.reindex(index=names, columns=names).to_numpy(dtype=float, copy=True)
    np.fill_diagonal(values, 1.0)
    return pd.DataFrame(values, index=names, columns=names)


def save_figure(fig, stem: Path, *, pdf: bool = False, tight: bool = True) -> Path:
    """Write `fig` as stem.png (for pages and READMEs, at DPI) and, with `pdf`, stem.pdf (for papers); return
    the PNG path. With `tight`, the tight bounding box (padded by 0.1 in) is measured once (a layout pass over
    every text) and reused for both files; the figures of this module are laid out in inches (`_grid`) and
    saved as they are."""
    bbox = fig.get_tightbbox(fig.canvas.get_renderer()).padded(0.1) if tight else None
    formats = [(".png", DPI, {"pil_kwargs": {"compress_level": PNG_LEVEL}}), (".pdf", None, {})]
    for suffix, dpi, extra in formats[:2 if pdf else 1]:
        write_atomic(stem.with_name(stem.name + suffix), partial(fig.savefig, dpi=dpi, bbox_inches=bbox, **extra))
    return stem.with_name(stem.name + ".png")
