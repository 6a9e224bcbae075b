"""The result store: tidy rows in Parquet, one file pair per (method, metric) cell, written atomically.

The store never computes; it flattens MetricResults into the long tables of DESIGN.md. The file
primitives (atomic writes, temporaries, folder checks, manifests) are bench.files', re-exported here.

Processes that share a results folder (two runs of one config, a joblib sweep) never touch each
other's files: a cell is owned by the process holding its lock (`flock` on a hidden `.<cell>.lock`
beside it, released by the kernel when the process dies, so a killed run never leaves a cell
locked), each writer writes part files with its own pid and token in their names, and leftovers
are removed only when no live process owns them. A cell is committed (fsync, then rename, scores
last) only when every sample of the dataset is in it, scored or recorded as failed, and its
counts are written into the scores file's footer, so `verify_cell` checks a stored cell from
footers alone before a run reuses it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from torch import Tensor

from bench.files import (check_space, check_writable, fsync_path, map_path, read_maps,  # noqa: F401
                         remove_stale_temporaries, write_atomic, write_error_text, write_json, write_maps)
from metrics import MetricResult

log = logging.getLogger(__name__)
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
# One failed sample of one cell, the one failure schema: cells' failure files, the run's failures.parquet and
# the report's failures table (stage: "method" or "metric"; a manifest's method-stage summary has metric None)
FAILURE_COLUMNS = KEY_COLUMNS + ["sample_id", "stage", "error"]
PART = ".part"
CELL_META = b"saliency_bench_cell"                     # footer key: the counts a stored cell is verified against
# <cell>.<scores|curves>.parquet[.<pid>-<token>].part (the bare form is an older runner's)
_PART_NAME = re.compile(r"^(?P<stem>.+)\.(?:scores|curves)\.parquet(?:\.[^.]+)?\.part$")


def _arrow(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(df, schema=schema, preserve_index=False).replace_schema_metadata(None)


class _Lock:
    """An exclusive `flock` on a lock file, released on `release` or by the kernel when the process dies."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, None

    def acquire(self, *, wait: bool) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())    # for the waiting process's message
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text() or "another process"
        except OSError:
            return "another process"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)                                     # closing the descriptor drops the flock
            self.fd = None


def _lock_path(scores_path: Path) -> Path:
    return scores_path.with_name(f".{_cell_stem(scores_path)}.lock")


def _cell_stem(scores_path: Path) -> str:
    return scores_path.name.removesuffix(".scores.parquet")


def _remove_cell_parts(scores_path: Path) -> int:
    """Delete every part file of one cell; only call while holding its lock."""
    stem, n = _cell_stem(scores_path), 0
    for p in scores_path.parent.glob(f"{stem}.*{PART}"):
        m = _PART_NAME.match(p.name)
        if m and m["stem"] == stem:
            p.unlink(missing_ok=True)
            n += 1
    return n


class CellWriter:
    """One (method, metric) cell written batch by batch by the one process that owns it.

    `claim` takes the cell's lock (waiting while another process computes it; False when the cell
    is stored by then). Each batch is a row group of part files named after this writer (pid and
    a random token), so memory stays flat in the number of samples and no other writer's files are
    touched. `commit` checks that the parts hold exactly the rows appended and that every one of
    the `n_samples` samples was scored or recorded as failed, records those counts in the scores
    footer, fsyncs and renames the parts into place (curves and failures first, scores last,
    whose presence marks the cell done) and releases the lock. `abort` deletes the parts.
    """

    def __init__(self, scores_path: Path, curves_path: Path, *, n_samples: int, **keys: str) -> None:
        self.paths = {"scores": scores_path, "curves": curves_path, "failures": failures_path(scores_path)}
        self.keys, self.n_samples = keys, int(n_samples)
        self.token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.rows: dict[str, int] = {}
        self.failures: list[dict[str, Any]] = []                 # only failed samples: the fault path
        self.n_scored = 0
        scores_path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = _Lock(_lock_path(scores_path))

    def _part(self, kind: str) -> Path:
        return self.paths[kind].with_name(f"{self.paths[kind].name}.{self.token}{PART}")

    def claim(self) -> bool:
        """Own the cell; False (and not owned) when it is stored and whole, e.g. committed meanwhile by
        the process this one waited for. Part files a killed writer left are removed."""
        if not self.lock.acquire(wait=False):
            log.info("cell %s is being computed by %s; waiting for it", _cell_stem(self.paths["scores"]),
                     self.lock.holder())
            self.lock.acquire(wait=True)
        try:
            if verify_cell(self.paths["scores"], self.paths["curves"], n_samples=self.n_samples) is None:
                self.lock.release()
                return False
            _remove_cell_parts(self.paths["scores"])
        except BaseException:
            self.lock.release()
            raise
        return True

    def _write(self, kind: str, df: pd.DataFrame, schema: pa.Schema, metadata: dict | None = None) -> None:
        if self.lock.fd is None:
            raise RuntimeError(f"cell {self.paths['scores'].name} is written before it is claimed")
        if kind not in self.writers:
            if metadata:
                schema = schema.with_metadata({b"saliency_bench": json.dumps(metadata).encode()})
            self.writers[kind] = pq.ParquetWriter(str(self._part(kind)), schema)
            self.rows[kind] = 0
        self.writers[kind].write_table(_arrow(df, self.writers[kind].schema))
        self.rows[kind] += len(df)

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
        self.failures.append({**{k: self.keys.get(k) for k in KEY_COLUMNS}, "sample_id": int(sample_id),
                              "stage": stage, "error": error})

    def commit(self) -> bool:
        """Move the parts into place; False (and nothing stored) when no sample was scored.

        A ValueError, and nothing stored, when the parts or the sample count are not what was appended."""
        if not self.n_scored:
            self.abort()
            return False
        name = self.paths["scores"].name
        n_failed = len({f["sample_id"] for f in self.failures})
        if self.n_scored + n_failed != self.n_samples:
            raise ValueError(f"cell {name}: {self.n_scored} samples scored and {n_failed} failed, but the dataset has "
                             f"{self.n_samples}; not stored, run the same command again to recompute it")
        counts = {"n_samples": self.n_samples, "n_scored": self.n_scored, "n_failed": n_failed,
                  "rows": {"scores": self.rows["scores"], "curves": self.rows.get("curves", 0),
                           "failures": len(self.failures)}}
        self.writers["scores"].add_key_value_metadata({CELL_META.decode(): json.dumps(counts)})
        for writer in self.writers.values():
            writer.close()
        for kind in self.writers:
            part = self._part(kind)
            if _rows(part) != self.rows[kind]:
                raise ValueError(f"cell {name}: {part.name} holds {_rows(part)} rows, {self.rows[kind]} were written; "
                                 "not stored, run the same command again to recompute it")
        if self.failures:
            write_table(pd.DataFrame(self.failures, columns=FAILURE_COLUMNS), self.paths["failures"])
        else:
            self.paths["failures"].unlink(missing_ok=True)
        for kind in ("curves", "scores"):
            if kind in self.writers:
                fsync_path(self._part(kind))
                os.replace(self._part(kind), self.paths[kind])
        fsync_path(self.paths["scores"].parent)
        self.writers = {}
        self.lock.release()
        return True

    def abort(self) -> None:
        """Close and delete the part files and release the cell; nothing of this cell is stored."""
        for kind, writer in self.writers.items():
            try:
                writer.close()
            except Exception:                                    # noqa: BLE001 - already broken, removed next
                pass
            self._part(kind).unlink(missing_ok=True)
        self.writers = {}
        self.lock.release()


def _rows(path: Path) -> int | None:
    """Rows of a Parquet file from its footer; None when it has none (truncated, not Parquet, absent)."""
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException):
        return None


MISSING = "not stored"


def verify_cell(scores_path: Path, curves_path: Path, *, n_samples: int) -> str | None:
    """None when the stored cell is whole, else what is wrong (MISSING when it was never stored).

    Whole: the scores file's footer is readable and records the counts of `CellWriter.commit`;
    scored + failed samples equal `n_samples`; the scores, curves (when it had curves) and
    failures (when it had failures) files hold the rows recorded. Footers only, no rows are read.
    """
    if not scores_path.exists():
        return MISSING
    try:
        meta = pq.read_metadata(scores_path)
        counts = json.loads((meta.metadata or {})[CELL_META])
    except (OSError, pa.ArrowException) as e:
        return f"unreadable: {e}"
    except (KeyError, ValueError):
        return "its footer lacks the sample counts (written by an older runner)"
    if counts["n_scored"] + counts["n_failed"] != n_samples:
        return (f"{counts['n_scored']} samples scored and {counts['n_failed']} failed, the dataset has "
                f"{n_samples}")
    expected = {scores_path: counts["rows"]["scores"], curves_path: counts["rows"]["curves"],
                failures_path(scores_path): counts["rows"]["failures"]}
    if meta.num_rows != expected.pop(scores_path):
        return f"{scores_path.name} holds {meta.num_rows} rows, {counts['rows']['scores']} were recorded"
    for path, rows in expected.items():
        if rows and (found := _rows(path)) != rows:
            return f"{path.name} " + ("is missing or unreadable" if found is None else
                                      f"holds {found} rows, {rows} were recorded")
    return None


def stored_cell(scores_path: Path, curves_path: Path, *, n_samples: int) -> bool:
    """Whether a run may reuse this cell (`verify_cell`); a cell stored but not whole gets a warning naming it
    and will be recomputed."""
    problem = verify_cell(scores_path, curves_path, n_samples=n_samples)
    if problem not in (None, MISSING):
        log.warning("stored cell %s is not whole (%s): recomputing it", scores_path, problem)
    return problem is None


def failures_path(scores_path: Path) -> Path:
    """Where a stored cell keeps the samples it could not score (absent when none failed)."""
    return scores_path.with_name(scores_path.name.replace(".scores.parquet", ".failures.parquet"))


def read_failures(scores_path: Path) -> pd.DataFrame:
    """The failed samples of a stored cell (FAILURE_COLUMNS), empty when none failed."""
    path = failures_path(scores_path)
    if not path.exists():
        return pd.DataFrame(columns=FAILURE_COLUMNS)
    df = pd.read_parquet(path).reindex(columns=FAILURE_COLUMNS)     # an older cell's file lacks the run keys
    return df.astype({c: object for c in FAILURE_COLUMNS if c != "sample_id"})


def remove_parts(run_dir: Path) -> int:
    """Delete what killed writers left in `run_dir`: the part files of cells that no live process owns
    (their lock is free) and the temporaries of dead processes. A live writer's files are left alone,
    so two runs may share the folder. Returns how many files were removed."""
    run_dir, n = Path(run_dir), 0
    cells = run_dir / "cells"
    stems = {m["stem"] for p in cells.glob(f"*{PART}") if (m := _PART_NAME.match(p.name))}
    for stem in sorted(stems):
        scores = cells / f"{stem}.scores.parquet"
        lock = _Lock(_lock_path(scores))
        if lock.acquire(wait=False):
            try:
                n += _remove_cell_parts(scores)
            finally:
                lock.release()
    for folder in [run_dir, cells, run_dir / "report_maps", *(p for p in (run_dir / "maps").rglob("*") if p.is_dir())]:
        n += remove_stale_temporaries(folder) if folder.is_dir() else 0
    return n


def copy_cell(scores_path: Path, curves_path: Path, to_scores: Path, to_curves: Path) -> None:
    """Copy a stored cell (failures, curves, then scores, which marks it stored) to another run's folder, each
    file atomically. Its rows keep the run_id of the run that computed them; a report takes the run from the
    manifest that lists the cell."""
    for src, dst in ((failures_path(scores_path), failures_path(to_scores)), (curves_path, to_curves),
                     (scores_path, to_scores)):
        if src.exists():
            write_atomic(dst, lambda tmp, src=src: shutil.copyfile(src, tmp))


def reuse_stored_cells(out_dir: Path, paths: dict[tuple[str, str], tuple[Path, Path]], todo: dict[str, list[str]],
                       n_samples: int) -> int:
    """Copy into this run the cells that a run folder beside it (results/<dataset>/<model>/*) stored under the
    same key, verified whole (the key hashes everything that determines a cell), and drop them from `todo`: a
    run of a changed configuration gets its own folder yet recomputes only the cells the change touches."""
    copied = 0
    for method_name, metric_names in todo.items():
        for metric_name in list(metric_names):
            scores, curves = paths[method_name, metric_name]
            for other in sorted(out_dir.parent.glob(f"*/cells/{scores.name}")):
                if other.parent.parent == out_dir or not stored_cell(
                        other, other.with_name(curves.name), n_samples=n_samples):
                    continue
                copy_cell(other, other.with_name(curves.name), scores, curves)
                if stored_cell(scores, curves, n_samples=n_samples):
                    metric_names.remove(metric_name)
                    copied += 1
                    break
    return copied
