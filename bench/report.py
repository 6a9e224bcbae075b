"""Reports from the result store: the one module that writes them (Markdown, LaTeX, CSV, Parquet, figures, page).

A report reads only the store (DESIGN): bench.results loads what the runs below a folder stored,
bench.tables computes every table from it, bench.figures and bench.gallery draw them (the gallery and the
MPRT grid from the maps each run kept, bench.keep: no model is loaded), bench.page renders the page and
this module writes the files, each atomically. Directions come from each run's ``score_meta``; every
leaderboard column carries its metric's family (bench.tables.families), and methods are ranked within
each family as well as overall.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from bench.files import remove_stale_temporaries, write_atomic
from bench.keep import read_report_maps
from bench.formats import documents, markdown as _markdown, sanity_sections, tex_escape as _tex_escape
from bench.page import render_page
from bench.ranking import controls
from bench.results import Results, group_of, groups, load
from bench.tables import (COLUMN_KEYS, MAX_DEGENERATE, SANITY_COLUMNS, Tables, bootstrap_ci, by_family, compute, cost, family_order,
                          family_rank, leaderboard, overall_rank, sanity, significance, wide_ranks)

__all__ = ["Results", "SANITY_COLUMNS", "Tables", "bootstrap_ci", "compute", "cost", "format_latex",
           "format_leaderboard", "format_sanity", "group_of", "groups", "leaderboard", "load", "main", "overall_rank",
           "sanity", "significance", "wide_ranks", "write_report"]
log = logging.getLogger(__name__)


def format_leaderboard(board: pd.DataFrame, unsupported: pd.DataFrame | None = None) -> str:
    """Markdown: one table per (dataset, model), methods by overall rank, the best per column in bold; columns
    grouped by family ("family · metric/score"), then each family's mean rank and the overall mean rank.
    Headline columns (the one score per metric that the ranks count) end in " *", explained under the table;
    a cell that cannot run (`unsupported`: Results.unsupported) reads "n/a", a method that ran nowhere here
    gets a row of them, below the ranked ones."""
    overall, per_family = overall_rank(board), family_rank(board)
    unsupported = pd.DataFrame(columns=["dataset", "model", "method", "metric"]) if unsupported is None else unsupported
    marked = "headline" in board and bool(board["headline"].any())
    sections = []
    for (dataset, model), table in board.groupby(["dataset", "model"], sort=True):
        ranks = overall[overall["dataset"].eq(dataset) & overall["model"].eq(model)].sort_values(["rank", "method"])
        arrow = np.where(table["higher_is_better"], " (↑)", " (↓)")
        star = np.where(table["headline"].astype(bool), " *", "") if marked else ""
        table = table.assign(column=table["family"] + " · " + table["metric"] + "/" + table["score"] + arrow + star,
                             cell=_cells(table))
        here = unsupported[unsupported["dataset"].eq(dataset) & unsupported["model"].eq(model)]
        rows = [*ranks["method"], *sorted(set(here["method"].astype(str)) - set(ranks["method"]))]
        wide = table.pivot(index="method", columns="column", values="cell")
        wide = wide.reindex(index=rows, columns=by_family(table)).fillna("–")
        metric_of = table.drop_duplicates("column").set_index("column")["metric"]
        na = set(zip(here["method"], here["metric"]))
        wide[:] = np.where([[(m, metric_of[c]) in na for c in wide.columns] for m in wide.index], "n/a", wide)
        fam = per_family[per_family["dataset"].eq(dataset) & per_family["model"].eq(model)]
        fam = fam.pivot(index="method", columns="family", values="mean_rank").reindex(rows)
        for f in family_order(table["family"]):
            wide[f"mean rank ({f})"] = fam[f].map(_rank_text).to_numpy()
        wide["mean rank"] = ranks.set_index("method")["mean_rank"].reindex(rows).map(_rank_text).to_numpy()
        legend = ("\n\nColumns ending in * are each metric's headline score, the one the mean ranks count."
                  if marked else "")
        sections.append(f"## {dataset} / {model}\n\n{_markdown(wide)}\n\n{_sample_note(table)}{legend}\n")
    return "\n".join(sections)


def _rank_text(v: float) -> str:
    return "–" if pd.isna(v) else f"{v:.2f}"


def format_latex(board: pd.DataFrame) -> str:
    """LaTeX (booktabs) leaderboard, one tabular per (dataset, model): mean [95% CI], best in bold."""
    sections = []
    for (dataset, model), table in board.groupby(["dataset", "model"], sort=True):
        arrow = np.where(table["higher_is_better"], r" $\uparrow$", r" $\downarrow$")
        cells = [rf"\textbf{{{c[2:-2]}}}" if c.startswith("**") else c for c in _cells(table)]
        table = table.assign(column=_tex_escape(table["metric"] + "/" + table["score"]) + arrow, cell=cells)
        columns = by_family(table)                                  # grouped under their family's name
        family = dict(zip(table["column"], table.get("family", pd.Series("other", index=table.index))))
        spans = [(f, sum(family[c] == f for c in columns)) for f in dict.fromkeys(family[c] for c in columns)]
        wide = table.pivot(index="method", columns="column", values="cell")[columns].fillna("--")
        lines = [f"% {dataset} / {model}", r"\begin{tabular}{l" + "r" * wide.shape[1] + "}", r"\toprule",
                 " & ".join(["", *(rf"\multicolumn{{{n}}}{{c}}{{{_tex_escape(pd.Series([f]))[0]}}}" for f, n in spans)])
                 + r" \\",
                 " & ".join(["method", *wide.columns]) + r" \\", r"\midrule",
                 *(" & ".join([m, *row]) + r" \\" for m, row in zip(_tex_escape(wide.index.to_series()), wide.to_numpy())),
                 r"\bottomrule", r"\end{tabular}"]
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def format_sanity(table: pd.DataFrame) -> str:
    """Markdown: one table per (dataset, model), methods x tests, 'mean [CI] pass|fail'."""
    if table.empty:
        return ("No randomization tests in these runs (a metric joins the sanity table by declaring its scores in "
                "its YAML: `_sanity_: [spearman, spearman_signed]`).\n")
    threshold = float(table["threshold"].iloc[0])
    sections = [f"Spearman rank correlation of the maps before and after each randomization, ABS (sum_c |E_c|) and "
                f"signed (sum_c E_c) side by side (mprt: every layer randomized, `@layer`: after the first stage "
                f"alone; random_logit: another class; data_randomization: model trained on permuted labels), "
                f"mean [95% CI] over samples. pass: |mean| < {threshold:g}, the map changed with the model; controls "
                f"(edge) are expected to fail; degenerate: more than {MAX_DEGENERATE:.0%} of the samples have a "
                f"constant map before or after the change (Spearman 0 by convention, not measured).\n"]
    sections += [f"## {title}\n\n{_markdown(wide)}\n" for title, wide in sanity_sections(table)]
    return "\n".join(sections)


def write_report(root: str | Path, out_dir: str | Path | None = None, *, n_boot: int = 1000, seed: int = 0,
                 gallery: bool = False, sanity_threshold: float = 0.3, pdf: bool = False) -> Path:
    """Write the report into ``<root>/report`` (or `out_dir`) and return the folder; every file atomically.

    One report per run group (`groups`): with one group (one experiment over its models) the files lie in
    the folder itself; with several, each group's in ``<folder>/<group>/`` and an index.md lists them, so two
    experiments, or two values of a sweep, never share a table. The files of one report are `_write_group`'s;
    `pdf` adds a PDF twin of every figure.
    """
    with _frozen_heap():
        return _write_report(Path(root), out_dir, n_boot=n_boot, seed=seed, gallery=gallery,
                             sanity_threshold=sanity_threshold, pdf=pdf)


@contextlib.contextmanager
def _frozen_heap():
    """Leave the objects that exist before the report out of the garbage collector's passes while it runs
    (gc.freeze): after a run, the heap holds torch and the run's objects, and each full collection that the
    report's many small matplotlib objects trigger would walk all of them (about 10% of a default report)."""
    mine = gc.isenabled() and gc.get_freeze_count() == 0          # never thaw what a caller froze
    if mine:
        gc.freeze()
    try:
        yield
    finally:
        if mine:
            gc.unfreeze()


def _write_report(root: Path, out_dir: str | Path | None, *, n_boot: int, seed: int, gallery: bool,
                  sanity_threshold: float, pdf: bool) -> Path:
    out = root / "report" if out_dir is None else Path(out_dir)
    split = groups(load(root))
    if len(split) == 1:
        (results, notes), = split.values()
        return _write_group(results, notes, out, n_boot=n_boot, seed=seed, gallery=gallery,
                            sanity_threshold=sanity_threshold, pdf=pdf)
    for stale in out.glob("*.*"):                       # a single report written here before: it would read as current
        if stale.is_file() and stale.suffix in {".csv", ".md", ".tex", ".parquet", ".png", ".pdf", ".html"}:
            stale.unlink()
    lines = ["# Runs below this folder, one report per group", ""]
    for group, (results, notes) in split.items():
        _write_group(results, notes, out / group, n_boot=n_boot, seed=seed, gallery=gallery,
                     sanity_threshold=sanity_threshold, pdf=pdf)
        runs = ", ".join(f"{m['dataset']}/{m['model']}" for m in results.manifests)
        overrides = sorted({o for m in results.manifests for o in (m.get("identity") or {}).get("overrides", [])
                            if not o.startswith(("model=", "dataset="))})
        lines.append(f"- [{group}]({group}/leaderboard.md): {runs}" + (f"; {' '.join(overrides)}" if overrides else ""))
    write_atomic(out / "index.md", partial(Path.write_text, data="\n".join(lines) + "\n", encoding="utf-8"))
    print(f"{len(split)} report groups written to {out} (index.md)")
    return out


def _write_group(results: Results, notes: list[str], out: Path, *, n_boot: int, seed: int, gallery: bool,
                 sanity_threshold: float, pdf: bool = False) -> Path:
    """One group's report into `out`, every file atomically.

    Tables (bench.tables): leaderboard.{csv,md,tex,parquet} (with each metric's family), overall_rank.csv
    (overall, per family, per column), significance.csv (Friedman, critical difference, reliability),
    pairwise.csv (Wilcoxon + Holm), agreement.csv (Kendall tau between metrics), cost.csv, failures.csv
    (store.FAILURE_COLUMNS), sanity.{csv,md,tex} (the randomization tests the metrics' YAMLs declare, pass/fail
    at `sanity_threshold`); ranking.{csv,md,tex}, kendall.{csv,md,tex} and below_control.csv (bench.ranking:
    across the group's models), significance and agreement also as .md and .tex (bench.formats).
    Figures (PNG; with `pdf` also PDF): scores_*, ranks_*, agreement_*, curves_*, cd_*;
    with `gallery`, gallery_* and mprt_grid_* from the maps each run kept (bench.keep). Page: leaderboard.html,
    self-contained, with every figure and manifest. Figures of an earlier report that this one did not draw (a
    model no longer in the store, a PDF twin no longer asked for) are removed (`_remove_stale_figures`).
    """
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)                        # hidden half-written files of a killed report
    t = compute(results, notes, n_boot=n_boot, seed=seed, sanity_threshold=sanity_threshold)
    markdown = format_leaderboard(t.board, results.unsupported)
    for note in t.notes:
        log.warning("report: %s", note)
        markdown += f"\nNote: {note}.\n"
    for (dataset, model, method, why), cells in results.unsupported.groupby(["dataset", "model", "method", "reason"]):
        markdown += f"\nUnsupported on {dataset} / {model}, not scored: {method} × {', '.join(cells['metric'])}: {why}\n"
    if n_failed := int((results.failures["stage"] != "unsupported").sum()):
        markdown += f"\n{n_failed} failed samples: see failures.csv\n"
    if len(results.failures):                            # failed samples and unsupported cells, with the reason
        write_atomic(out / "failures.csv", partial(results.failures.to_csv, index=False))
    else:
        (out / "failures.csv").unlink(missing_ok=True)   # a stale list would blame runs that now pass
    write_atomic(out / "leaderboard.csv", partial(t.board.to_csv, index=False))
    write_atomic(out / "overall_rank.csv", partial(t.ranks.to_csv, index=False))
    write_atomic(out / "leaderboard.md", partial(Path.write_text, data=markdown, encoding="utf-8"))
    write_atomic(out / "leaderboard.tex", partial(Path.write_text, data=format_latex(t.board), encoding="utf-8"))
    write_atomic(out / "leaderboard.parquet", partial(t.board.to_parquet, index=False))
    tables = {"significance": t.friedman, "pairwise": t.pairwise, "agreement": t.agreement, "cost": t.cost,
              "sanity": t.sanity}
    for name, table in tables.items():
        write_atomic(out / f"{name}.csv", partial(table.to_csv, index=False))
    write_atomic(out / "sanity.md", partial(Path.write_text, data=format_sanity(t.sanity), encoding="utf-8"))
    ranking = {"ranking": t.ranking.methods, "kendall": t.ranking.kendall, "below_control": t.ranking.below_control}
    for name, table in ranking.items():                 # across the group's models (bench.ranking)
        write_atomic(out / f"{name}.csv", partial(table.to_csv, index=False))
    for name, text in documents(t).items():             # Markdown and LaTeX of the tables (bench.formats)
        write_atomic(out / name, partial(Path.write_text, data=text, encoding="utf-8"))
    figures = _figures(t, out, gallery=gallery, pdf=pdf)
    _remove_stale_figures(out, figures, pdf=pdf)
    page = render_page(t, figures)
    write_atomic(out / "leaderboard.html", partial(Path.write_text, data=page, encoding="utf-8"))
    print(markdown)
    print(f"report written to {out}")
    return out


def _figures(t: Tables, out: Path, *, gallery: bool, pdf: bool = False) -> list[Path]:
    """Every figure of a report group (PNG paths): bench.figures' from the tables; with `gallery`, the gallery and
    MPRT grids of each run from the maps it kept (a run that kept none is named in the log and left out).
    A progress bar counts the steps (shown on a terminal only)."""
    from tqdm import tqdm

    from bench import figures as fig                    # matplotlib only when figures are due
    from bench.gallery import draw

    manifests = t.results.manifests
    steps = [partial(fig.plot_summary, t.board, t.agreement, out, pdf=pdf),
             partial(fig.plot_curves, t.curves, out, axes=fig.curve_axes(manifests), controls=controls(manifests),
                     pdf=pdf)]
    if len(t.average_ranks):
        steps.append(partial(fig.plot_critical_difference, t.average_ranks, t.friedman, out, board=t.board, pdf=pdf))
    for path, manifest in zip(t.results.paths, manifests) if gallery else ():
        steps.append(partial(_draw_kept, draw, path, manifest, out, pdf=pdf))
    paths = []
    for step in tqdm(steps, desc="report figures", unit="step", disable=None, leave=False):
        paths += step()
    return paths


def _draw_kept(draw, path: Path, manifest: dict, out: Path, *, pdf: bool) -> list[Path]:
    """The gallery and MPRT grids of one run from the maps it kept; none (logged) where it kept none."""
    kept = read_report_maps(path, manifest)
    return [] if kept is None else draw(kept, manifest, out, f"{manifest['dataset']}_{manifest['model']}", pdf=pdf)


FIGURE_PREFIXES = ("scores_", "ranks_", "agreement_", "curves_", "cd_", "gallery_", "mprt_grid_")   # what reports draw


def _remove_stale_figures(out: Path, drawn: list[Path], *, pdf: bool) -> list[Path]:
    """Delete the figures in `out` that an earlier report drew and this one did not: files named as a report's
    figures (FIGURE_PREFIXES, .png or .pdf) other than `drawn` (PNG paths) and, with `pdf`, their PDF twins.
    Nothing else is touched. Returns the removed paths."""
    keep = {p.name for p in drawn} | ({p.with_suffix(".pdf").name for p in drawn} if pdf else set())
    stale = [p for p in out.iterdir() if p.suffix in {".png", ".pdf"} and p.name.startswith(FIGURE_PREFIXES)
             and p.name not in keep and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("report: removed %d figures of an earlier report from %s", len(stale), out)
    return stale


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m bench.report RESULTS_DIR [--out DIR] [--n-boot N] [--seed S]``."""
    parser = argparse.ArgumentParser(prog="python -m bench.report", description="Leaderboard and figures of a results folder.")
    parser.add_argument("results_dir", help="folder that `python -m bench` wrote its runs to")
    parser.add_argument("--out", default=None, help="output folder (default: RESULTS_DIR/report)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples per CI")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--gallery", action=argparse.BooleanOptionalAction, default=True,
                        help="also the gallery of maps and MPRT grids (bench.gallery; needs the cached models)")
    parser.add_argument("--pdf", action="store_true", help="also a PDF twin of every figure (for papers)")
    parser.add_argument("--sanity-threshold", type=float, default=0.3,
                        help="sanity table: a randomization test passes when the mean Spearman is below this")
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")                 # the CLI writes files only, never opens a window
    try:
        write_report(args.results_dir, args.out, n_boot=args.n_boot, seed=args.seed, gallery=args.gallery,
                     sanity_threshold=args.sanity_threshold, pdf=args.pdf)
    except (ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")


def _cells(table: pd.DataFrame) -> list[str]:
    """'mean [ci_low, ci_high]' to 3 significant digits, in bold where the rank is the column's best."""
    best = table["rank"].eq(table.groupby(COLUMN_KEYS)["rank"].transform("min")) & table["mean"].notna()
    text = [("–" if np.isnan(m) else f"{m:.3g}" if np.isnan(lo) else f"{m:.3g} [{lo:.3g}, {hi:.3g}]")
            for m, lo, hi in zip(table["mean"], table["ci_low"], table["ci_high"])]
    return [f"**{t}**" if b else t for t, b in zip(text, best)]


def _sample_note(table: pd.DataFrame) -> str:
    """One line: samples per cell and where NaN values were excluded."""
    total = table["n"] + table["n_nan"]
    note = f"n = {total.min()}" + ("" if total.min() == total.max() else f"–{total.max()}") + " samples per cell"
    nan = table[table["n_nan"] > 0]
    if len(nan):
        where = ", ".join(f"{r.method} {r.metric}/{r.score}: {r.n_nan}" for r in nan.itertuples())
        note += f"; {nan['n_nan'].sum()} NaN values (undefined, excluded from mean and CI): {where}"
    return note + "."


if __name__ == "__main__":
    main()
