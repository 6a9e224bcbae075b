"""The leaderboard page: one self-contained static HTML file (no server, no network).

A sortable, filterable table of the leaderboard (columns grouped under their metric's family, each
family's mean rank beside the overall one), the report's figures embedded as data URIs, and every
run's manifest. Every text that comes from configs, names or manifests is escaped.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from bench.tables import MAP_LABELS, OTHER, by_family, family_order

_SCRIPT = """
const table = document.getElementById('board');
const body = table.tBodies[0];
const columns = table.tHead.rows[table.tHead.rows.length - 1];   // the row under the families
function filter() {
  const d = document.getElementById('dataset').value, m = document.getElementById('model').value;
  for (const row of body.rows) {
    row.hidden = (d !== '' && row.dataset.dataset !== d) || (m !== '' && row.dataset.model !== m);
  }
}
function sortBy(th) {
  const col = th.cellIndex, numeric = th.dataset.numeric === '1';
  const ascending = th.dataset.order !== 'asc';
  for (const other of columns.cells) { delete other.dataset.order; }
  th.dataset.order = ascending ? 'asc' : 'desc';
  const key = row => numeric ? parseFloat(row.cells[col].dataset.value) : row.cells[col].textContent;
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b);
    if (numeric && isNaN(x) !== isNaN(y)) { return isNaN(x) ? 1 : -1; }   // undefined values last
    const c = numeric ? x - y : x.localeCompare(y);
    return ascending ? c : -c;
  });
  rows.forEach(row => body.appendChild(row));
}
for (const th of columns.cells) { th.addEventListener('click', () => sortBy(th)); }
document.getElementById('dataset').addEventListener('change', filter);
document.getElementById('model').addEventListener('change', filter);
"""

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 0.3em 0.6em; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
th[data-order=asc]::after { content: ' \\25B2'; } th[data-order=desc]::after { content: ' \\25BC'; }
td.key, th.key { text-align: left; } td.best { font-weight: bold; }
td.pass { color: #1a7f37; } td.fail { color: #cf222e; font-weight: bold; }
figure { display: inline-block; margin: 1em; } img { max-width: 640px; }
pre { background: #f8f8f8; padding: 1em; overflow-x: auto; font-size: 0.8em; }
"""


def render_page(board: pd.DataFrame, overall: pd.DataFrame, figures: list[Path], manifests: list[dict],
                *, title: str = "saliency-bench leaderboard", sanity: pd.DataFrame | None = None,
                families: pd.DataFrame | None = None) -> str:
    """The page's HTML. `board`, `overall`, `families` (optional) and `sanity` (optional) come from
    bench.tables' leaderboard, overall_rank, family_rank and sanity."""
    e = html.escape
    board = board.assign(column=board["metric"] + "/" + board["score"] + np.where(board["higher_is_better"], " ↑", " ↓"))
    if "family" not in board:
        board = board.assign(family=OTHER)
    columns = by_family(board)
    family_of = dict(zip(board["column"], board["family"]))
    fams = family_order(board["family"]) if families is not None and len(families) else []
    fam_ranks = families.set_index(["dataset", "model", "method", "family"])["mean_rank"] if fams else None
    best = board["rank"].eq(board.groupby(["dataset", "model", "column"])["rank"].transform("min"))
    board = board.assign(best=best & board["mean"].notna())
    cells = board.set_index(["dataset", "model", "method", "column"])
    ranks = overall.set_index(["dataset", "model", "method"])["mean_rank"]
    spans = [(f, sum(family_of[c] == f for c in columns)) for f in dict.fromkeys(family_of[c] for c in columns)]
    top = '<th colspan="3"></th>' + "".join(f'<th colspan="{n}">{e(f)}</th>' for f, n in spans)
    top += f'<th colspan="{len(fams) + 1}">mean rank</th>'
    head = "".join(f'<th class="key">{e(c)}</th>' for c in ("dataset", "model", "method"))
    head += "".join(f'<th data-numeric="1">{e(c)}</th>' for c in [*columns, *fams, "overall"])
    rows = []
    for (dataset, model, method), mean_rank in ranks.sort_values().items():
        tds = [f'<td class="key">{e(str(v))}</td>' for v in (dataset, model, method)]
        for c in columns:
            if (dataset, model, method, c) not in cells.index:
                tds.append('<td data-value="NaN">–</td>')
                continue
            r = cells.loc[(dataset, model, method, c)]
            text = "–" if np.isnan(r["mean"]) else f"{r['mean']:.3g} [{r['ci_low']:.3g}, {r['ci_high']:.3g}]"
            tds.append(f'<td data-value="{float(r["mean"])!r}"{" class=best" if r["best"] else ""}>{e(text)}</td>')
        for f in fams:
            v = fam_ranks.get((dataset, model, method, f), np.nan)
            tds.append(f'<td data-value="{float(v)!r}">{"–" if np.isnan(v) else f"{v:.2f}"}</td>')
        tds.append(f'<td data-value="{float(mean_rank)!r}">{mean_rank:.2f}</td>')
        rows.append(f'<tr data-dataset="{e(str(dataset))}" data-model="{e(str(model))}">{"".join(tds)}</tr>')
    options = {k: "".join(f'<option value="{e(str(v))}">{e(str(v))}</option>' for v in sorted(ranks.index.unique(k)))
               for k in ("dataset", "model")}
    imgs = "".join(
        f'<figure><img alt="{e(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{e(p.stem)}</figcaption></figure>" for p in figures)
    runs = "".join(f"<details><summary>{e(str(m.get('run_id', '?')))}</summary>"
                   f"<pre>{e(json.dumps(m, indent=2, default=str))}</pre></details>" for m in manifests)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{_STYLE}</style></head>
<body><h1>{e(title)}</h1>
<p>Mean [95% bootstrap CI] over samples; ↑ higher is better, ↓ lower is better; bold: best in its
column for that dataset and model. Columns are grouped by metric family; mean rank: a method's ranks
averaged over each family's columns and over all of them. Click a header to sort.</p>
<label>dataset <select id="dataset"><option value="">all</option>{options["dataset"]}</select></label>
<label>model <select id="model"><option value="">all</option>{options["model"]}</select></label>
<table id="board"><thead><tr>{top}</tr><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>
{_sanity_section(sanity)}
<h2>Figures</h2>{imgs}
<h2>Runs</h2>{runs}
<script>{_SCRIPT}</script></body></html>
"""


def _sanity_section(sanity: pd.DataFrame | None) -> str:
    """The sanity table as a plain HTML table, one row per (dataset, model, method, test); empty if none."""
    if sanity is None or sanity.empty:
        return ""
    e = html.escape
    rows = []
    for r in sanity.itertuples():
        verdict = "undefined" if pd.isna(r.passed) else "pass" if r.passed else "fail"
        text = "–" if np.isnan(r.mean) else f"{r.mean:.3g} [{r.ci_low:.3g}, {r.ci_high:.3g}]"
        map_ = MAP_LABELS.get(r.score, r.score)
        cells = [f'<td class="key">{e(str(v))}</td>' for v in (r.dataset, r.model, r.method, r.metric, map_, r.stage)]
        rows.append(f'<tr>{"".join(cells)}<td>{e(text)}</td><td class="{verdict}">{verdict}</td></tr>')
    head = "".join(f'<th class="key">{c}</th>' for c in ("dataset", "model", "method", "test", "map", "stage")) + \
        "<th>Spearman</th><th>verdict</th>"
    return (f"<h2>Sanity checks</h2><p>Spearman rank correlation of the maps before and after each randomization "
            f"(Adebayo et al. 2018), ABS (sum_c |E_c|) and signed (sum_c E_c), after the last stage and, for "
            f"cascading MPRT, the first; mean [95% CI] over samples; pass: |mean| &lt; "
            f"{float(sanity['threshold'].iloc[0]):g}, the map changed with the model.</p>"
            f'<table id="sanity"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
