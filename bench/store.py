"""The result store: tidy rows in Parquet, one file pair per (method, metric) cell, written atomically.

The store never computes; it flattens MetricResults into the long tables of DESIGN.md.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from torch import Tensor

from metrics import MetricResult

SCORE_COLUMNS = ["run_id", "dataset", "model", "method", "metric", "score", "sample_id", "value"]
CURVE_COLUMNS = ["run_id", "dataset", "model", "method", "metric", "curve", "sample_id", "step", "x", "x_label", "y"]
KEY_COLUMNS = ["run_id", "dataset", "model", "method", "metric"]


def score_rows(result: MetricResult, sample_id: Tensor, **keys: str) -> pd.DataFrame:
    """Flatten one metric result into tidy rows; `keys` fills run_id, dataset, model, method, metric."""
    ids = sample_id.cpu().numpy()
    frames = [pd.DataFrame({"score": name, "sample_id": ids, "value": v.detach().double().cpu().numpy()})
              for name, v in result.scores.items()]
    return pd.concat(frames, ignore_index=True).assign(**keys)[SCORE_COLUMNS]


def curve_rows(result: MetricResult, sample_id: Tensor, **keys: str) -> pd.DataFrame:
    """Flatten every curve of a result into long rows, one per (sample, step)."""
    frames = []
    for name, curve in result.curves.items():
        B, K = curve.y.shape
        labels = list(curve.labels) if curve.labels else [""] * K
        frames.append(pd.DataFrame({
            "curve": name,
            "sample_id": sample_id.cpu().numpy().repeat(K),
            "step": list(range(K)) * B,
            "x": curve.x.detach().double().cpu().numpy().tolist() * B,
            "x_label": labels * B,
            "y": curve.y.detach().double().cpu().numpy().reshape(-1),
        }))
    if not frames:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    return pd.concat(frames, ignore_index=True).assign(**keys)[CURVE_COLUMNS]


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write` on a temporary file beside `path`, then rename it over `path`: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_table(df: pd.DataFrame, path: Path, *, metadata: dict[str, Any] | None = None) -> None:
    """Atomic Parquet write; string key columns stored as categories, `metadata` as JSON in the file's schema."""
    df = df.astype({c: "category" for c in KEY_COLUMNS + ["score", "curve", "x_label"] if c in df.columns})
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        table = table.replace_schema_metadata({**table.schema.metadata, b"saliency_bench": json.dumps(metadata).encode()})
    write_atomic(path, lambda tmp: pq.write_table(table, str(tmp)))


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata written with `write_table`, without reading the rows."""
    raw = (pq.read_schema(path).metadata or {}).get(b"saliency_bench")
    return json.loads(raw) if raw else {}


def write_cell(scores_path: Path, curves_path: Path, result: MetricResult, sample_id: Tensor, **keys: str) -> None:
    """Store one (method, metric) cell: curves first, then scores, whose presence marks the cell done.

    The scores file carries the score directions, so a resumed run knows them without recomputing.
    """
    curves = curve_rows(result, sample_id, **keys)
    if len(curves):
        write_table(curves, curves_path)
    write_table(score_rows(result, sample_id, **keys), scores_path,
                metadata={"higher_is_better": result.higher_is_better})


def write_json(obj: Any, path: Path) -> None:
    """Atomic, human-readable JSON write."""
    def dump(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
    write_atomic(path, dump)


def cell_paths(run_dir: Path, method: str, metric: str, key: str) -> tuple[Path, Path]:
    """Where one (method, metric) cell keeps its scores and curves; `key` hashes what determines it."""
    stem = Path(run_dir) / "cells" / f"{method}__{metric}__{key}"
    return stem.parent / f"{stem.name}.scores.parquet", stem.parent / f"{stem.name}.curves.parquet"
