"""The leaderboard page: one self-contained static HTML file (no server, no network).

On top the overall ranking of methods across every model and dataset (Tables.ranking, where the tables
have one: rank, rank CI, P(best), each family's rank, a flag where a method scores worse than a control,
Kendall tau between models); then one view per (dataset, model), switched by tabs, with its headline
columns grouped by family, cells coloured by rank within their column and unsupported or undefined
cells marked with their reason; the sanity table; figures at full width; cost and provenance in
folded sections; and a card per method and metric (what it measures, paper, direction, the parameters
the runs used; description and paper as bench.catalog derives them). Every text from configs, names or
manifests is escaped; CSS and JS are the package's own files (bench/page_assets), inlined.
"""
from __future__ import annotations

import base64
import html
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from bench.catalog import describe
from bench.tables import MAP_LABELS, OTHER, Tables, by_family, family_order

_e = html.escape


def render_page(t: Tables, figures: list[Path], *, title: str = "saliency-bench leaderboard") -> str:
    """The page's HTML for the tables of one report group and its figures (PNG paths)."""
    manifests = t.results.manifests
    board = t.board.assign(column=t.board["metric"] + "/" + t.board["score"])
    if "family" not in board:
        board = board.assign(family=OTHER)
    ranking = t.ranking                                   # None where the tables have no ranking across models
    below = _below_control(ranking)
    views = sorted(board.groupby(["dataset", "model"]).groups)
    placed, rest = _place_figures(figures, views)
    tabs = "".join(f'<button class="tab" role="tab" data-view="{i}">{_e(f"{d} / {m}")}</button>'
                   for i, (d, m) in enumerate(views))
    unsupported = _unsupported(t)
    panels = "".join(_view(i, d, m, board, t, unsupported, below, placed.get((d, m), []))
                     for i, (d, m) in enumerate(views))
    extra = set(board.loc[~board["headline"].astype(bool), "column"]) if "headline" in board else set()
    toggle = (f'<label><input type="checkbox" id="all-scores"> every score (the headline score of each metric '
              f'is shown; {len(extra)} more)</label>' if extra else "")
    asset = resources.files(__package__) / "page_assets"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{_e(title)}</title><style>{(asset / "page.css").read_text(encoding="utf-8")}</style></head>
<body><header><h1>{_e(title)}</h1><p>{_summary(board, manifests)}</p>
<nav><a href="#ranking">Ranking</a> <a href="#views">Per model</a> <a href="#sanity-checks">Sanity</a>
<a href="#figures">Figures</a> <a href="#cost">Cost</a> <a href="#provenance">Provenance</a>
<a href="#cards">Methods and metrics</a>
<label>filter methods <input type="search" id="filter" placeholder="name contains…"></label></nav></header>
{_notes(t)}<section id="ranking"><h2>Overall ranking</h2>{_ranking(ranking, board)}</section>
<section id="views"><h2>Per dataset and model</h2>
<p>Mean over samples (95% bootstrap CI, rank and sample count on hover); ↑ higher is better, ↓ lower;
colour: rank within the column, darker is better; bold: best; ▾ worse than a control; n/a: the method or
metric cannot run on this model (reason on hover); –: undefined or not scored. Click a header to sort, a
name for its card.</p>
<div class="tabs" role="tablist">{tabs}{toggle}</div>{panels}</section>
{_sanity_section(t.sanity)}
<section id="figures"><h2>Figures</h2>{_figures(rest) or "<p>Each model's figures are in its view.</p>"}</section>
<details id="cost"><summary><h2>Cost</h2></summary>{_frame(t.cost, "cost-table")}</details>
<details id="provenance"><summary><h2>Provenance ({len(manifests)} runs)</h2></summary>{_provenance(manifests)}</details>
<section id="cards"><h2>Methods and metrics</h2>{_cards(board, manifests)}</section>
<script>{(asset / "page.js").read_text(encoding="utf-8")}</script></body></html>
"""


def _notes(t: Tables) -> str:
    """The report's notes (metrics left out of the rank aggregates, ...) and the failed samples' count."""
    f = t.results.failures
    failed = int(f["stage"].ne("unsupported").sum()) if "stage" in f else len(f)     # unsupported cells: in the views
    items = [*t.notes, *([f"{failed} failed samples: see failures.csv and the provenance below"] if failed else [])]
    return f'<ul class="notes">{"".join(f"<li>{_e(str(n))}</li>" for n in items)}</ul>' if items else ""


def _anchor(kind: str, name: str) -> str:
    """An id for a card: `kind-name` with every character outside [A-Za-z0-9_-] hex-escaped."""
    return f"{kind}-" + re.sub(r"[^A-Za-z0-9_-]", lambda m: f".{ord(m.group()):x}", str(name))


def _link(kind: str, name: str) -> str:
    return f'<a class="card-link" href="#{_anchor(kind, name)}">{_e(str(name))}</a>'


def _num(v: float, fmt: str = "{:.3g}") -> str:
    return "–" if v is None or not np.isfinite(v) else fmt.format(v)


def _shade(rank: float, n: float) -> str:
    """Background for a cell ranked `rank` of `n` (1 best): dark green at best, near white at worst."""
    if not (np.isfinite(rank) and n > 1):
        return ""
    light = 30 + 65 * (rank - 1) / (n - 1)
    return f' style="background:hsl(150,45%,{light:.0f}%)' + (';color:#fff"' if light < 55 else '"')


def _summary(board: pd.DataFrame, manifests: list[dict]) -> str:
    """One line: runs, datasets, models, methods, metrics, commits."""
    commits = sorted({str(m.get("git_commit"))[:10] for m in manifests if m.get("git_commit")})
    parts = [f"{len(manifests)} runs", f"datasets: {', '.join(sorted(board['dataset'].unique()))}",
             f"models: {', '.join(sorted(board['model'].unique()))}",
             f"{board['method'].nunique()} methods", f"{board['metric'].nunique()} metrics",
             f"commit {', '.join(commits) or 'unknown'}"]
    return _e("; ".join(parts))


def _below_control(ranking) -> dict[tuple, list[str]]:
    """(dataset, model, method, metric, score) -> the controls it scores worse than (Ranking.below_control),
    each with both means where the table has them."""
    frame = getattr(ranking, "below_control", None)
    out: dict[tuple, list[str]] = {}
    for r in (frame.to_dict("records") if frame is not None else ()):
        means = f" ({r['mean']:.3g} vs {r['control_mean']:.3g})" if {"mean", "control_mean"} <= set(r) else ""
        out.setdefault((r["dataset"], r["model"], r["method"], r["metric"], r["score"]), []).append(
            f"{r['control']}{means}")
    return out


def _unsupported(t: Tables) -> dict[tuple, str]:
    """(dataset, model, method, metric) -> why it cannot run, from Results.unsupported (the manifests' lists)."""
    u = t.results.unsupported
    return {(d, mo, me, mt): str(why) for d, mo, me, mt, why in
            zip(u["dataset"], u["model"], u["method"], u["metric"], u["reason"])}


def _ranking(ranking, board: pd.DataFrame) -> str:
    """The overall and per-family ranking across models (Ranking.methods) and Kendall tau between models."""
    methods = getattr(ranking, "methods", None)
    if methods is None or methods.empty:
        return "<p>No ranking across models in these tables; each model's ranks are in its view below.</p>"
    overall = methods[methods["scope"] == "overall"].sort_values(["rank", "method"])
    fams = [f for f in family_order(methods["scope"]) if f != "overall" and f in set(methods["scope"])]
    by_scope = methods.set_index(["scope", "method"])
    flags = {}
    for (d, m, method, metric, score), controls in _below_control(ranking).items():
        flags.setdefault(method, []).append(f"{d}/{m} {metric}/{score} below {', '.join(controls)}")
    n = len(overall)
    head = ("<tr><th>rank</th><th>method</th><th>mean rank</th><th>LATEC rank</th><th>rank 95% CI</th>"
            "<th>P(best)</th><th>columns</th>" + "".join(f"<th>{_e(f)}</th>" for f in fams) + "<th>flag</th></tr>")
    rows = []
    for r in overall.itertuples():
        tds = [f'<td data-value="{r.rank!r}"{_shade(r.rank, n)}>{_num(r.rank, "{:g}")}</td>',
               f'<td class="key">{_link("method", r.method)}</td>',
               f'<td data-value="{r.mean_rank!r}">{_num(r.mean_rank, "{:.2f}")}</td>',
               f'<td data-value="{r.latec_rank!r}">{_num(r.latec_rank, "{:.2f}")}</td>',
               f'<td data-value="{r.rank_ci_low!r}">{_num(r.rank_ci_low)}–{_num(r.rank_ci_high)}</td>',
               f'<td data-value="{r.p_best!r}">{_num(r.p_best, "{:.2f}")}</td>',
               f'<td data-value="{r.n_columns!r}">{r.n_columns}</td>']
        for f in fams:
            if (f, r.method) not in by_scope.index:
                tds.append('<td data-value="NaN">–</td>')
                continue
            s = by_scope.loc[(f, r.method)]
            tip = (f"{f}: rank {s['rank']:g} (95% CI {s['rank_ci_low']:g}–{s['rank_ci_high']:g}), mean rank "
                   f"{s['mean_rank']:.2f}, LATEC {s['latec_rank']:.2f}, P(best) {s['p_best']:.2f}")
            tds.append(f'<td data-value="{float(s["rank"])!r}" title="{_e(tip)}"{_shade(s["rank"], n)}>'
                       f'{_num(s["rank"], "{:g}")}</td>')
        flag = flags.get(r.method, [])
        tds.append(f'<td class="flag" title="{_e(chr(10).join(flag))}">⚠ below a control on {len(flag)}</td>'
                   if flag else '<td class="key"></td>')
        rows.append(f'<tr data-method="{_e(str(r.method))}">{"".join(tds)}</tr>')
    note = ("<p>Rank 1 = best, over every headline column of every model and dataset: mean rank (ranks averaged "
            "over columns) and LATEC's rank (Klein et al. 2024: scores median-standardised per column, then "
            "ranked); rank CI and P(best) from a bootstrap over samples and models; each family's rank on hover. "
            "⚠: the method scores worse than a control somewhere (details on hover).</p>")
    table = f'<div class="scroll"><table id="overall"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>'
    kendall = getattr(ranking, "kendall", None)
    agree = ""
    if kendall is not None and len(kendall):
        k = kendall.assign(a=kendall["dataset_a"] + " / " + kendall["model_a"],
                           b=kendall["dataset_b"] + " / " + kendall["model_b"])[["a", "b", "tau", "p_value", "n_methods"]]
        agree = ("<h3>Does the ranking generalise? Kendall τ between models</h3>"
                 + _frame(k.rename(columns={"a": "model A", "b": "model B", "tau": "τ", "p_value": "p"}), "kendall"))
    return note + table + agree


def _view(i: int, dataset: str, model: str, board: pd.DataFrame, t: Tables, unsupported: dict, below: dict,
          figures: list[Path]) -> str:
    """One (dataset, model): methods by rank, its own ranks, then every column grouped by family."""
    part = board[board["dataset"].eq(dataset) & board["model"].eq(model)]
    columns = by_family(part)
    first = part.drop_duplicates("column").set_index("column")
    headline = first["headline"].astype(bool) if "headline" in first else pd.Series(True, index=first.index)
    overall = t.overall[t.overall["dataset"].eq(dataset) & t.overall["model"].eq(model)].sort_values(["rank", "method"])
    fam = t.families[t.families["dataset"].eq(dataset) & t.families["model"].eq(model)]
    fams = family_order(fam.loc[fam["rank"].notna(), "family"]) if len(fam) else []   # families ranked here
    fam_rank = fam.set_index(["method", "family"])
    cells = part.set_index(["method", "column"])
    n_col = part.groupby("column")["mean"].count()
    spans = [(f, [c for c in columns if first.loc[c, "family"] == f]) for f in dict.fromkeys(first.loc[columns, "family"])]
    top = f'<th colspan="{3 + len(fams)}"></th>' + "".join(
        f'<th colspan="{max(1, sum(headline[cs]))}" class="{"" if headline[cs].any() else "extra"}" '
        f'data-span="{max(1, sum(headline[cs]))} {len(cs)}">'
        f"{_e(f)}</th>" for f, cs in spans)
    head = '<th class="key">method</th><th>rank</th><th>mean rank</th>' + "".join(
        f"<th>{_e(f)} rank</th>" for f in fams) + "".join(
        f'<th data-col="{_e(c)}" class="{"" if headline[c] else "extra"}">{_link("metric", first.loc[c, "metric"])}'
        f'<span>{_e(str(first.loc[c, "score"]))} {"↑" if first.loc[c, "higher_is_better"] else "↓"}</span></th>'
        for c in columns)
    here = {k[2:]: why for k, why in unsupported.items() if k[:2] == (dataset, model)}    # (method, metric) -> why
    n = len(overall)
    best = part[part["mean"].notna()].groupby("column")["rank"].min()
    absent = sorted({str(me) for me, _ in here} - set(overall["method"]))        # unsupported on every column
    rows = []
    for method, rank, mean_rank in [*zip(overall["method"], overall["rank"], overall["mean_rank"]),
                                    *((me, np.nan, np.nan) for me in absent)]:
        tds = [f'<td class="key">{_link("method", method)}</td>',
               f'<td data-value="{float(rank)!r}"{_shade(rank, n)}>{_num(rank, "{:g}")}</td>',
               f'<td data-value="{float(mean_rank)!r}">{_num(mean_rank, "{:.2f}")}</td>']
        for f in fams:
            v = float(fam_rank["rank"].get((method, f), np.nan))
            tds.append(f'<td data-value="{v!r}"{_shade(v, n)}>{_num(v, "{:g}")}</td>')
        for c in columns:
            metric, score = first.loc[c, "metric"], first.loc[c, "score"]
            cell = cells.loc[(method, c)] if (method, c) in cells.index else None
            tds.append(_cell(cell, c, n_col.get(c, 0), best.get(c), "" if headline[c] else "extra",
                             here.get((method, metric)), below.get((dataset, model, method, metric, score), [])))
        rows.append(f'<tr data-method="{_e(str(method))}">{"".join(tds)}</tr>')
    figs = f"<details open><summary>Figures of {_e(dataset)} / {_e(model)}</summary>{_figures(figures)}</details>" if figures else ""
    return (f'<section class="view" role="tabpanel" data-view="{i}" data-dataset="{_e(str(dataset))}" '
            f'data-model="{_e(str(model))}"><div class="scroll"><table class="board">'
            f'<thead><tr>{top}</tr><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
            f"{_view_note(part, here)}{figs}</section>")


def _cell(r: pd.Series | None, column: str, n: int, best: float | None, cls: str, reason: str | None,
          controls: list[str]) -> str:
    """One board cell: the mean, shaded by rank; n/a with the reason where unsupported; – with why where NaN."""
    if reason is not None:
        return f'<td data-value="NaN" class="na {cls}" title="{_e(f"unsupported: {reason}")}">n/a</td>'
    if r is None:
        return f'<td data-value="NaN" class="nan {cls}" title="not scored in these runs">–</td>'
    samples = f"n = {int(r['n'])} samples" + (f", {int(r['n_nan'])} undefined (NaN, excluded)" if r["n_nan"] else "")
    if not np.isfinite(r["mean"]):
        return f'<td data-value="NaN" class="nan {cls}" title="{_e(f"undefined on every sample: {samples}")}">–</td>'
    tip = f"{column} = {r['mean']:.4g}, 95% CI [{_num(r['ci_low'], '{:.4g}')}, {_num(r['ci_high'], '{:.4g}')}]; " \
          f"rank {r['rank']:g} of {n}; {samples}"
    mark = ""
    if controls:
        tip += f"; worse than the control {', '.join(controls)}"
        mark = '<span class="below">▾</span>'
    top = " best" if r["rank"] == best else ""                # ties share the best rank
    return (f'<td data-value="{float(r["mean"])!r}" class="{cls}{top}"{_shade(r["rank"], n)} title="{_e(tip)}">'
            f'{r["mean"]:.3g}{mark}</td>')


def _view_note(part: pd.DataFrame, here: dict[tuple, str]) -> str:
    """Samples per cell, the NaN count, and each metric that no method could run here (so it has no column)."""
    total = part["n"] + part["n_nan"]
    nan = int(part["n_nan"].sum())
    gone = {}
    for (_, metric), why in sorted(here.items()):
        if metric not in set(part["metric"]):
            gone.setdefault(str(metric), set()).add(why)
    return (f'<p class="note">n = {total.min()}' + ("" if total.min() == total.max() else f"–{total.max()}")
            + " samples per cell" + (f"; {nan} undefined values (NaN) excluded from means and CIs" if nan else "")
            + "".join(f"; {_e(k)} unsupported for every method ({_e('; '.join(sorted(w)))})" for k, w in gone.items())
            + "</p>")


def _place_figures(figures: list[Path], views: list[tuple]) -> tuple[dict[tuple, list[Path]], list[Path]]:
    """Each figure whose name holds `_<dataset>_<model>` (the longest such view) goes to that view, the rest
    to the Figures section."""
    placed: dict[tuple, list[Path]] = {}
    rest = []
    for p in figures:
        hits = [v for v in views if re.search(f"_{re.escape(f'{v[0]}_{v[1]}')}(_|$)", p.stem)]
        if hits:
            placed.setdefault(max(hits, key=lambda v: len(v[0]) + len(v[1])), []).append(p)
        else:
            rest.append(p)
    return placed, rest


def _figures(paths: list[Path]) -> str:
    """Figures as data URIs at their own size, never wider than the page."""
    return "".join(
        f'<figure><img alt="{_e(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{_e(p.stem)}</figcaption></figure>" for p in paths)


def _frame(df: pd.DataFrame, table_id: str) -> str:
    """A sortable HTML table of any frame: numbers to 4 significant digits, every text escaped."""
    if df is None or df.empty:
        return "<p>None in these runs.</p>"
    head = "".join(f"<th>{_e(str(c))}</th>" for c in df.columns)
    rows = []
    for values in df.itertuples(index=False):
        tds = []
        for v in values:
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
                tds.append(f'<td data-value="{float(v)!r}">{_num(float(v), "{:.4g}")}</td>')
            else:
                tds.append(f'<td class="key">{_e(str(v))}</td>')
        rows.append(f"<tr>{''.join(tds)}</tr>")
    return (f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _provenance(manifests: list[dict]) -> str:
    """A row per run (commit, status, device, accuracy), then each manifest whole (versions, config, timings)."""
    rows = pd.DataFrame([{"run": m.get("run_id"), "dataset": m.get("dataset"), "model": m.get("model"),
                          "status": m.get("status"), "commit": str(m.get("git_commit") or "")[:10],
                          "finished": m.get("finished"), "device": m.get("device"), "samples": m.get("n_samples"),
                          "seed": m.get("seed"), "test accuracy": (m.get("model_info") or {}).get("test_accuracy")}
                         for m in manifests])
    runs = "".join(f"<details><summary>{_e(str(m.get('run_id', '?')))}: versions, config, manifest</summary>"
                   f"<pre>{_e(json.dumps(m, indent=2, default=str))}</pre></details>" for m in manifests)
    return _frame(rows, "runs") + runs


def _cards(board: pd.DataFrame, manifests: list[dict]) -> str:
    """A card per method and metric of the runs: description, paper, (family, scores), target, parameters."""
    out = []
    for kind, group, key in (("method", "methods", "method"), ("metric", "metrics", "metric")):
        names = sorted({str(n) for m in manifests for n in ((m.get("config") or {}).get(key) or {})} | set(board[key]))
        for name in names:
            nodes = [(m, ((m.get("config") or {}).get(key) or {}).get(name) or {}) for m in manifests]
            nodes = [(m, n) for m, n in nodes if n]
            target = str(nodes[0][1].get("_target_", "")) if nodes else ""
            try:
                description, paper = describe(group, name, target) if target else ("", "")
            except (ValueError, OSError) as err:                    # a broken YAML: say so on its card
                description, paper = f"(no description: {err})", ""
            facts = [f"<dt>paper</dt><dd>{_e(paper or '–')}</dd>", f"<dt>target</dt><dd><code>{_e(target or '?')}</code></dd>"]
            if kind == "metric":
                rows = board[board["metric"] == name].drop_duplicates("score")
                scores = ", ".join(f"{s} {'↑' if h else '↓'}" + (" (headline)" if hl else "")
                                   for s, h, hl in zip(rows["score"], rows["higher_is_better"],
                                                       rows["headline"] if "headline" in rows else [False] * len(rows)))
                family = rows["family"].iloc[0] if len(rows) and "family" in rows else OTHER
                facts += [f"<dt>family</dt><dd>{_e(str(family))}</dd>", f"<dt>scores</dt><dd>{_e(scores or '–')}</dd>"]
            facts.append(f"<dt>parameters</dt><dd>{_parameters(nodes)}</dd>")
            out.append(f'<article class="card" id="{_anchor(kind, name)}"><h3>{_e(kind)} {_e(name)}</h3>'
                       f'<p>{_e(description or "–")}</p><dl>{"".join(facts)}</dl></article>')
    return f'<div class="cards">{"".join(out)}</div>'


def _parameters(nodes: list[tuple[dict, dict]]) -> str:
    """The parameters the runs used (keys starting with _ left out); where runs differ, each set with its runs."""
    sets: dict[str, list[str]] = {}
    for m, node in nodes:
        params = {k: v for k, v in node.items() if not str(k).startswith("_")}
        sets.setdefault(json.dumps(params, sort_keys=True, default=str), []).append(f"{m.get('dataset')}/{m.get('model')}")
    parts = []
    for text, runs in sets.items():
        items = ", ".join(f"{k} = {json.dumps(v, default=str)}" for k, v in json.loads(text).items()) or "none"
        parts.append(f"<code>{_e(items)}</code>" + (f" ({_e(', '.join(runs))})" if len(sets) > 1 else ""))
    return "<br>".join(parts) or "–"


def _sanity_section(sanity: pd.DataFrame | None) -> str:
    """The sanity table, one row per (dataset, model, method, test); a line saying there is none otherwise."""
    if sanity is None or sanity.empty:
        return '<section id="sanity-checks"><h2>Sanity checks</h2><p>No randomization tests in these runs.</p></section>'
    rows = []
    for r in sanity.itertuples():
        verdict = getattr(r, "verdict", None) or ("undefined" if pd.isna(r.passed) else "pass" if r.passed else "fail")
        flat = getattr(r, "degenerate", np.nan)
        tip = f' title="{flat:.0%} of the samples have a constant map"' if np.isfinite(flat) and flat > 0 else ""
        text = "–" if np.isnan(r.mean) else f"{r.mean:.3g} [{r.ci_low:.3g}, {r.ci_high:.3g}]"
        map_ = MAP_LABELS.get(r.score, r.score)
        cells = [f'<td class="key">{_e(str(v))}</td>' for v in (r.dataset, r.model, r.method, r.metric, map_, r.stage)]
        rows.append(f'<tr data-method="{_e(str(r.method))}">{"".join(cells)}<td data-value="{float(r.mean)!r}">'
                    f'{_e(text)}</td><td class="{_e(verdict)}"{tip}>{_e(verdict)}</td></tr>')
    head = "".join(f'<th class="key">{c}</th>' for c in ("dataset", "model", "method", "test", "map", "stage")) + \
        "<th>Spearman</th><th>verdict</th>"
    return (f'<section id="sanity-checks"><h2>Sanity checks</h2><p>Spearman rank correlation of the maps before and after '
            f"each randomization (Adebayo et al. 2018), ABS (sum_c |E_c|) and signed (sum_c E_c), after the last "
            f"stage and, for cascading MPRT, the first; mean [95% CI] over samples; pass: |mean| &lt; "
            f"{float(sanity['threshold'].iloc[0]):g}, the map changed with the model; degenerate: too many samples "
            f"have a constant map (its Spearman is 0 by convention, not measured), so it does not pass.</p>"
            f'<div class="scroll"><table id="sanity"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div></section>')
