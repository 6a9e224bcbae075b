"""What the runs below a folder stored, as tidy tables: the report's one reader of the store.

Every ``manifest.json`` below a folder (bench.files.read_manifests) and exactly the Parquet cells it
lists; other Parquet files beside a manifest (stale cells of an older config) are ignored. NaN values
are kept: they mean "undefined for this sample".
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.files import inside, read_manifests
from bench.store import CURVE_COLUMNS, FAILURE_COLUMNS, SCORE_COLUMNS

META_COLUMNS = ["metric", "score", "higher_is_better"]
SAMPLE_COLUMNS = ["run_id", "sample_id", "target"]
UNSUPPORTED_COLUMNS = ["run_id", "dataset", "model", "method", "metric", "reason"]
_NUMERIC = {"sample_id", "value", "step", "x", "y"}


@dataclass(frozen=True)
class Results:
    """Everything the runs below one folder stored, as tidy tables."""

    scores: pd.DataFrame      # SCORE_COLUMNS: one row per sample and score
    curves: pd.DataFrame      # CURVE_COLUMNS: one row per sample and step; x_label "" when absent
    meta: pd.DataFrame        # META_COLUMNS: one row per (metric, score)
    failures: pd.DataFrame    # store.FAILURE_COLUMNS: one row per failed sample (None: the manifest lists none),
                              # and one per unsupported cell (stage "unsupported", sample_id None)
    manifests: list[dict]
    paths: list[Path] = field(default_factory=list)   # each manifest's file, in the order of `manifests`
    samples: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SAMPLE_COLUMNS))   # each sample's class
    # UNSUPPORTED_COLUMNS: one row per cell that cannot run on its model or data, with the reason (bench/probe.py)
    unsupported: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=UNSUPPORTED_COLUMNS))


def load(root: str | Path) -> Results:
    """Read every run below `root`: each manifest.json and exactly the cells it lists (one Arrow table per file,
    converted to pandas once)."""
    manifests, paths, scores, curves, meta, failures, samples, unsupported = [], [], [], [], [], [], [], []
    for path, manifest in read_manifests(root):
        manifests.append(manifest)
        paths.append(path)
        run_id = manifest["run_id"]
        if manifest.get("samples"):
            samples.append(_read_cell(path, manifest["samples"], run_id))
        for cell in manifest["cells"]:                   # the manifest says whose a cell is (it may be a copy)
            scores.append(_read_cell(path, cell.get("scores"), run_id))
            if cell.get("curves"):
                curves.append(_read_cell(path, cell["curves"], run_id))
        meta += manifest.get("score_meta", [])
        failures += _failure_rows(manifest)
        run = {key: manifest[key] for key in ("run_id", "dataset", "model")}
        unsupported += [{**run, "method": u["method"], "metric": u["metric"], "reason": u["reason"]}
                        for u in manifest.get("unsupported", [])]
    return Results(scores=_table(scores, SCORE_COLUMNS), curves=_table(curves, CURVE_COLUMNS),
                   meta=_directions(pd.DataFrame(meta, columns=META_COLUMNS)),
                   failures=pd.DataFrame(failures, columns=FAILURE_COLUMNS), manifests=manifests, paths=paths,
                   samples=_table(samples, SAMPLE_COLUMNS, keys=False) if samples
                   else pd.DataFrame(columns=SAMPLE_COLUMNS),
                   unsupported=pd.DataFrame(unsupported, columns=UNSUPPORTED_COLUMNS))


def _failure_rows(manifest: dict) -> list[dict]:
    """The manifest's failure summary as FAILURE_COLUMNS rows, one per failed sample (metric None: the method
    failed, for every metric); an entry without sample ids gives one row with sample_id None, as does each
    unsupported cell (stage "unsupported", the reason as its error)."""
    run = {key: manifest[key] for key in ("run_id", "dataset", "model")}
    rows = []
    for f in manifest.get("failures", []):
        for sample_id in f.get("sample_ids") or [None]:
            rows.append({**run, "method": f.get("method"), "metric": f.get("metric"), "sample_id": sample_id,
                         "stage": f.get("stage"), "error": f.get("error")})
    return rows + [{**run, "method": u["method"], "metric": u["metric"], "sample_id": None, "stage": "unsupported",
                    "error": u["reason"]} for u in manifest.get("unsupported", [])]


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
                              unsupported=_rows_of(results.unsupported, runs),
                              manifests=[results.manifests[i] for i in keep],
                              paths=[results.paths[i] for i in keep]), notes)
    return out


def _rows_of(table: pd.DataFrame, runs: set[str]) -> pd.DataFrame:
    """The rows of `table` whose run_id is one of `runs`."""
    return table[table["run_id"].astype(str).isin(runs)].reset_index(drop=True)


def _read_cell(manifest: Path, relative: str | None, run_id: str) -> pa.Table:
    """One Parquet file listed in a manifest (relative to its folder), its run_id column set to `run_id`."""
    path = inside(manifest, relative, "cell") if relative else None
    if path is None or not path.is_file():
        raise ValueError(f"{manifest} lists the cell file {relative!r}, which is missing; re-run that run")
    table = pq.read_table(path)
    run = pa.array([run_id] * table.num_rows, pa.string())
    names = table.column_names
    return table.set_column(names.index("run_id"), "run_id", run) if "run_id" in names else table.append_column(
        "run_id", run)


def _table(tables: list[pa.Table], columns: list[str], *, keys: bool = True) -> pd.DataFrame:
    """Concatenate cells into one table with plain string keys (categories differ between files; "" for a
    missing key); `keys=False` keeps every column's type. One conversion to pandas for all the cells."""
    if not tables:
        return pd.DataFrame(columns=columns)
    if missing := sorted(set(columns) - set.intersection(*(set(t.column_names) for t in tables))):
        raise ValueError(f"result cells lack columns {missing}; re-run them with the current runner")
    strings = [c for c in columns if keys and c not in _NUMERIC]
    tables = [t.select(columns).replace_schema_metadata(None) for t in tables]   # no pandas metadata: plain types
    tables = [t.cast(pa.schema([pa.field(f.name, pa.string()) if f.name in strings else f for f in t.schema]))
              for t in tables]
    table = pa.concat_tables(tables, promote_options="permissive")
    for c in strings:
        table = table.set_column(table.column_names.index(c), c, pc.fill_null(table[c], ""))
    return table.to_pandas()


def _directions(meta: pd.DataFrame) -> pd.DataFrame:
    """One direction per (metric, score); runs that disagree are an error."""
    meta = meta.astype({"higher_is_better": bool}).drop_duplicates(ignore_index=True)
    clash = meta.loc[meta.duplicated(["metric", "score"]), ["metric", "score"]]
    if len(clash):
        names = ", ".join(clash["metric"] + "/" + clash["score"])
        raise ValueError(f"runs disagree on whether higher is better for {names} (e.g. pixel flipping "
                         "MoRF vs LeRF); report them from separate folders")
    return meta
