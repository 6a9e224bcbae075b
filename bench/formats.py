"""Markdown and LaTeX of the report's tables (bench.tables, bench.ranking): each table is a list of sections,
a title and a wide frame (index first), rendered by `markdown_document` or `latex_document`. bench.report
writes them beside the CSVs; nothing here computes a number or writes a file."""
from __future__ import annotations

import numpy as np
import pandas as pd

from bench.ranking import OVERALL, Ranking
from bench.tables import MAP_LABELS, Tables

Sections = list[tuple[str, pd.DataFrame]]
MISSING = "–"


def documents(t: Tables) -> dict[str, str]:
    """File name -> text of every Markdown and LaTeX table besides the leaderboard's and sanity.md:
    ranking, kendall, significance, agreement (.md and .tex) and sanity.tex."""
    parts = {"significance": (significance_sections(t.friedman), SIGNIFICANCE_NOTE),
             "agreement": (agreement_sections(t.agreement), AGREEMENT_NOTE)}
    if t.ranking is not None:
        parts["ranking"] = (ranking_sections(t.ranking), RANKING_NOTE)
        parts["kendall"] = (kendall_sections(t.ranking), KENDALL_NOTE)
    out = {}
    for name, (sections, note) in parts.items():
        out[f"{name}.md"] = markdown_document(sections, note)
        out[f"{name}.tex"] = latex_document(sections, note)
    out["sanity.tex"] = latex_document(sanity_sections(t.sanity), "Randomization tests: mean [95% CI] and verdict.")
    return out


RANKING_NOTE = ("Methods ranked across every (dataset, model), overall and per metric family, on each metric's "
                "headline score. rank: of the mean rank over the headline columns; 95% CI and P(best): bootstrap "
                "over models and samples; LATEC: Klein et al. 2024's aggregation (per-model clipped min-max "
                "scores, median, rank); below control: headline columns where a control scores better.")
KENDALL_NOTE = "Kendall tau-b (p) between the method rankings of every pair of models: does the ranking generalise?"
SIGNIFICANCE_NOTE = ("Per leaderboard column: Friedman test across methods, Nemenyi critical difference of average "
                     "ranks, Krippendorff's alpha of per-sample ranks and mean inter-method Spearman (Tomsett et al.).")
AGREEMENT_NOTE = "Kendall tau-b between the method rankings of every pair of leaderboard columns."


def ranking_sections(ranking: Ranking) -> Sections:
    """One section per scope (overall first, then each family): methods by rank."""
    m = ranking.methods
    out = []
    for scope in dict.fromkeys([OVERALL, *m["scope"]]):
        part = m[m["scope"].eq(scope)].sort_values(["rank", "method"])
        if part.empty:
            continue
        wide = pd.DataFrame({
            "rank": part["rank"].map(_num), "95% CI": [f"[{_num(lo)}, {_num(hi)}]" if np.isfinite(lo) else MISSING
                                                      for lo, hi in zip(part["rank_ci_low"], part["rank_ci_high"])],
            "P(best)": part["p_best"].map(lambda p: f"{p:.2f}" if np.isfinite(p) else MISSING),
            "mean rank": part["mean_rank"].map(_num), "LATEC rank": part["latec_rank"].map(_num),
            "columns": part["n_columns"].astype(str),
            "below control": part["below_control"].map(lambda n: str(n) if n else "")})
        wide.index = pd.Index(part["method"], name="method")
        out.append((scope, wide))
    return out


def kendall_sections(ranking: Ranking) -> Sections:
    """The model x model matrix of Kendall tau (p value)."""
    k = ranking.kendall
    if k.empty:
        return []
    a, b = k["dataset_a"] + "/" + k["model_a"], k["dataset_b"] + "/" + k["model_b"]
    cells = [f"{t:.2f} (p={p:.2g})" if np.isfinite(t) else MISSING for t, p in zip(k["tau"], k["p_value"])]
    units = list(dict.fromkeys([*a, *b]))
    wide = pd.DataFrame(MISSING, index=pd.Index(units, name="model"), columns=units)
    for x, y, c in zip(a, b, cells):
        wide.loc[x, y] = wide.loc[y, x] = c
    for u in units:
        wide.loc[u, u] = "1"
    return [("between models", wide)]


def significance_sections(friedman: pd.DataFrame) -> Sections:
    """Per (dataset, model): one row per leaderboard column."""
    out = []
    for (dataset, model), part in (friedman.groupby(["dataset", "model"], sort=True) if len(friedman) else ()):
        wide = pd.DataFrame({
            "Friedman chi2": part["statistic"].map(_num), "p": part["p"].map(_p), "n": part["n"].astype(str),
            "k": part["k"].astype(str), "CD": part["critical_difference"].map(_num),
            "alpha": part["inter_rater_alpha"].map(_num), "rho": part["inter_method_rho"].map(_num)})
        wide.index = pd.Index(part["metric"] + "/" + part["score"], name="column")
        out.append((f"{dataset} / {model}", wide))
    return out


def agreement_sections(agreement: pd.DataFrame) -> Sections:
    """Per (dataset, model): the column x column matrix of Kendall tau."""
    out = []
    for (dataset, model), part in (agreement.groupby(["dataset", "model"], sort=True) if len(agreement) else ()):
        columns = sorted({*part["column_a"], *part["column_b"]})
        wide = pd.DataFrame(MISSING, index=pd.Index(columns, name="column"), columns=columns)
        for x, y, tau in zip(part["column_a"], part["column_b"], part["kendall_tau"]):
            wide.loc[x, y] = wide.loc[y, x] = _num(tau, ".2f")
        for c in columns:
            wide.loc[c, c] = "1"
        out.append((f"{dataset} / {model}", wide))
    return out


def sanity_sections(table: pd.DataFrame) -> Sections:
    """Per (dataset, model): methods x randomization tests, 'mean [CI] verdict' (as report.format_sanity)."""
    if table.empty:
        return []
    verdict = table["verdict"] if "verdict" in table else \
        table["passed"].map({True: "pass", False: "fail"}).fillna("undefined")
    cells = table.assign(
        cell=[f"{m:.3g} [{lo:.3g}, {hi:.3g}] {v}" if np.isfinite(m) else f"{MISSING} {v}"
              for m, lo, hi, v in zip(table["mean"], table["ci_low"], table["ci_high"], verdict)],
        column=[f"{metric} {MAP_LABELS.get(score, score)}" + ("" if stage == "last" else f" @{stage}")
                for metric, score, stage in zip(table["metric"], table["score"], table["stage"])])
    out = []
    for (dataset, model), part in cells.groupby(["dataset", "model"], sort=True):
        wide = part.pivot(index="method", columns="column", values="cell").fillna(MISSING)
        out.append((f"{dataset} / {model}", wide[list(dict.fromkeys(part["column"]))]))
    return out


def markdown(wide: pd.DataFrame) -> str:
    """A plain Markdown table, index first (tabulate is not a dependency)."""
    header = [wide.index.name or "", *wide.columns]
    rows = [[str(i), *map(str, row)] for i, row in zip(wide.index, wide.to_numpy())]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])


def markdown_document(sections: Sections, note: str = "") -> str:
    """`note`, then one '## title' and table per section; a line saying so when there is none."""
    body = [f"## {title}\n\n{markdown(wide)}\n" for title, wide in sections] or ["No rows in these runs.\n"]
    return "\n".join([f"{note}\n" if note else "", *body])


def latex_document(sections: Sections, note: str = "") -> str:
    """One booktabs tabular per section, each after a `% title` comment; names escaped (`tex_escape`)."""
    out = [f"% {note}"] if note else []
    for title, wide in sections:
        head = tex_escape(pd.Series([wide.index.name or "", *map(str, wide.columns)], dtype=object))
        body = [" & ".join(tex_escape(pd.Series([str(i), *map(str, row)], dtype=object)).str.replace(MISSING, "--"))
                + r" \\" for i, row in zip(wide.index, wide.to_numpy())]
        out += [f"% {title}", r"\begin{tabular}{l" + "r" * wide.shape[1] + "}", r"\toprule", " & ".join(head) + r" \\",
                r"\midrule", *body, r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out) + "\n"


def tex_escape(text: pd.Series) -> pd.Series:
    """Escape LaTeX's special characters in names that come from configs."""
    return text.str.replace(r"[\\_&%#$\{\}~^]", lambda m: _TEX[m.group()], regex=True)


_TEX = {"\\": r"\textbackslash{}", "_": r"\_", "&": r"\&", "%": r"\%", "#": r"\#", "$": r"\$",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _num(x: float, spec: str = ".3g") -> str:
    return format(x, spec) if x is not None and np.isfinite(x) else MISSING


def _p(p: float) -> str:
    return f"{p:.2g}" if np.isfinite(p) else MISSING
