"""The result store: tidy rows in Parquet, one file pair per (method, metric) cell, written atomically.

The store never computes; it flattens MetricResults into the long tables of DESIGN.md.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
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


# ---- streaming cells: per-batch row groups in part files, committed by rename -----------------
_KEY = pa.dictionary(pa.int32(), pa.string())          # read back as pandas categories, as write_table does
SCORE_SCHEMA = pa.schema([(c, _KEY) for c in KEY_COLUMNS + ["score"]] +
                         [("sample_id", pa.int64()), ("value", pa.float64())])
CURVE_SCHEMA = pa.schema([(c, _KEY) for c in KEY_COLUMNS + ["curve"]] +
                         [("sample_id", pa.int64()), ("step", pa.int64()), ("x", pa.float64()),
                          ("x_label", _KEY), ("y", pa.float64())])
FAILURE_COLUMNS = ["method", "metric", "sample_id", "stage", "error"]
PART = ".part"


def _arrow(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(df, schema=schema, preserve_index=False).replace_schema_metadata(None)


class CellWriter:
    """One (method, metric) cell written batch by batch: each batch is a row group of a part file
    beside the cell; `commit` renames the parts into place (curves and failures first, scores last,
    whose presence marks the cell done), so memory stays flat in the number of samples and a
    reader never sees half a cell. `abort` deletes the parts.
    """

    def __init__(self, scores_path: Path, curves_path: Path, **keys: str) -> None:
        self.paths = {"scores": scores_path, "curves": curves_path, "failures": failures_path(scores_path)}
        self.keys = keys
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.failures: list[dict[str, Any]] = []                 # only failed samples: the fault path
        self.n_scored = 0
        scores_path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, kind: str, df: pd.DataFrame, schema: pa.Schema, metadata: dict | None = None) -> None:
        if kind not in self.writers:
            if metadata:
                schema = schema.with_metadata({b"saliency_bench": json.dumps(metadata).encode()})
            part = self.paths[kind].with_name(self.paths[kind].name + PART)
            self.writers[kind] = pq.ParquetWriter(str(part), schema)
        self.writers[kind].write_table(_arrow(df, self.writers[kind].schema))

    def append(self, result: MetricResult, sample_id: Tensor) -> None:
        """Add one batch's scores and curves."""
        self._write("scores", score_rows(result, sample_id, **self.keys), SCORE_SCHEMA,
                    {"higher_is_better": result.higher_is_better})
        curves = curve_rows(result, sample_id, **self.keys)
        if len(curves):
            self._write("curves", curves, CURVE_SCHEMA)
        self.n_scored += len(sample_id)

    def fail(self, sample_id: int, stage: str, error: str) -> None:
        """Record one sample that this cell could not score, and why."""
        self.failures.append({"method": self.keys["method"], "metric": self.keys["metric"],
                              "sample_id": int(sample_id), "stage": stage, "error": error})

    def commit(self) -> bool:
        """Move the parts into place; False (and nothing stored) when no sample was scored."""
        for writer in self.writers.values():
            writer.close()
        if not self.n_scored:
            self.abort()
            return False
        if self.failures:
            write_table(pd.DataFrame(self.failures, columns=FAILURE_COLUMNS), self.paths["failures"])
        else:
            self.paths["failures"].unlink(missing_ok=True)
        for kind in ("curves", "scores"):
            if kind in self.writers:
                os.replace(self.paths[kind].with_name(self.paths[kind].name + PART), self.paths[kind])
        self.writers = {}
        return True

    def abort(self) -> None:
        """Close and delete the part files; nothing of this cell is stored."""
        for kind, writer in self.writers.items():
            try:
                writer.close()
            except Exception:                                    # noqa: BLE001 - already broken, removed next
                pass
            self.paths[kind].with_name(self.paths[kind].name + PART).unlink(missing_ok=True)
        self.writers = {}


def failures_path(scores_path: Path) -> Path:
    """Where a stored cell keeps the samples it could not score (absent when none failed)."""
    return scores_path.with_name(scores_path.name.replace(".scores.parquet", ".failures.parquet"))


def read_failures(scores_path: Path) -> pd.DataFrame:
    """The failed samples of a stored cell (FAILURE_COLUMNS), empty when none failed."""
    path = failures_path(scores_path)
    if not path.exists():
        return pd.DataFrame(columns=FAILURE_COLUMNS)
    df = pd.read_parquet(path)
    return df.astype({c: object for c in ("method", "metric", "stage", "error")})


def remove_parts(run_dir: Path) -> int:
    """Delete part files a killed run left behind in `run_dir`; returns how many."""
    parts = list((Path(run_dir) / "cells").glob(f"*{PART}")) + list((Path(run_dir) / "maps").glob(f"*/*{PART}"))
    for p in parts:
        p.unlink(missing_ok=True)
    return len(parts)


def check_writable(run_dir: Path) -> None:
    """Refuse, before any work, a results folder that cannot be created or written."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write-check.")
        try:
            os.write(fd, b"0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ValueError(f"results folder {str(run_dir)!r} is not writable ({e.strerror or e}); "
                         "set results_dir to a folder you can write to") from e


def check_space(run_dir: Path, *, need_bytes: int) -> None:
    """Refuse, before the expensive part, a results folder on a disk with less than `need_bytes` free."""
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise ValueError(f"results folder {str(run_dir)!r} has {free / 2**20:.1f} MiB free, this run needs about "
                         f"{need_bytes / 2**20:.1f} MiB: free space or set results_dir to another disk")


# ---- the optional map cache (cache_maps: true) -------------------------------------------------
def map_path(run_dir: Path, method: str, key: str, start: int) -> Path:
    """Where the maps of one method's batch starting at sample `start` are cached; `key` hashes what fixes them."""
    return Path(run_dir) / "maps" / f"{method}__{key}" / f"{start:09d}.pt"


def write_maps(path: Path, maps: Tensor, ok: Tensor, errors: list[str]) -> None:
    """Cache one batch's maps (B, H, W), which rows are valid (B,) and each failed row's reason."""
    def save(tmp: Path) -> None:
        torch.save({"maps": maps.detach().cpu(), "ok": ok.cpu(), "errors": list(errors)}, tmp)
    write_atomic(path, save)


def read_maps(path: Path) -> tuple[Tensor, Tensor, list[str]] | None:
    """A cached batch (maps, ok, errors), or None when absent or unreadable (then it is recomputed).

    Read with weights_only=True: a cache file cannot run code.
    """
    if not path.exists():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        return d["maps"], d["ok"], list(d["errors"])
    except Exception:                                             # noqa: BLE001 - a broken cache is a miss
        return None
