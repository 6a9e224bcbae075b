"""The result store (issue 21): a cell's writer owns its files, commits only whole cells, and stored
cells are verified from their footers; the report names a bad manifest and clears a killed report's
temporaries. Unit tests on hand-made cells; tests/bench/test_concurrency.py runs real processes.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest
import torch

from bench import files, store
from bench.report import load, write_report
from metrics import Curve, MetricResult

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"run_id": "r", "dataset": "shapes", "model": "cnn", "method": "saliency", "metric": "flip"}


def _result(ids: list[int], *, curves: bool = True) -> MetricResult:
    """auc = sample_id / 10; a 3-step curve y = sample_id + step."""
    sid = torch.tensor(ids, dtype=torch.float64)
    return MetricResult(scores={"auc": sid / 10},
                        curves={"curve": Curve(torch.tensor([0.0, 0.5, 1.0]), sid[:, None] + torch.arange(3))}
                        if curves else {},
                        higher_is_better={"auc": False})


def _cell(tmp_path: Path, n: int = 8, **options) -> tuple[store.CellWriter, Path, Path]:
    scores, curves = store.cell_paths(tmp_path, "saliency", "flip", "k1")
    return store.CellWriter(scores, curves, n_samples=n, **KEYS), scores, curves


def _write_whole_cell(tmp_path: Path, *, failed: tuple[int, ...] = ()) -> tuple[Path, Path]:
    w, scores, curves = _cell(tmp_path)
    assert w.claim()
    ids = [i for i in range(8) if i not in failed]
    w.append(_result(ids[:4]), torch.tensor(ids[:4]))
    w.append(_result(ids[4:]), torch.tensor(ids[4:]))
    for i in failed:
        w.fail(i, "method", "RuntimeError: injected")
    assert w.commit()
    return scores, curves


def test_a_live_writer_keeps_its_parts_while_another_run_cleans_the_folder(tmp_path):
    """The hostile probe: a second run's start-up cleanup deleted the first run's live part files, and the
    first crashed at commit (FileNotFoundError) and lost its cell."""
    w, scores, _ = _cell(tmp_path)
    assert w.claim()
    w.append(_result([0, 1, 2, 3]), torch.arange(4))
    parts = sorted(p.name for p in scores.parent.glob("*.part"))
    assert len(parts) == 2 and all(f".{os.getpid()}-" in p for p in parts)      # named after their owner
    assert store.remove_parts(tmp_path) == 0                                      # another run starting here
    assert sorted(p.name for p in scores.parent.glob("*.part")) == parts
    other, _, _ = _cell(tmp_path)
    assert not other.lock.acquire(wait=False)                                    # the cell is owned
    w.append(_result([4, 5, 6, 7]), torch.arange(4, 8))
    assert w.commit() and not list(scores.parent.glob("*.part"))
    assert pd.read_parquet(scores).sample_id.tolist() == list(range(8))
    assert other.lock.acquire(wait=False)                                        # released at commit
    other.lock.release()


def test_a_dead_writers_parts_are_removed_and_its_cell_is_free(tmp_path):
    """A writer killed with -9 leaves its parts; the kernel drops its lock, so the next run removes them."""
    code = ("import sys, os, torch; from pathlib import Path; from bench import store;"
            "from metrics import MetricResult;"
            "s, c = store.cell_paths(Path(sys.argv[1]), 'saliency', 'flip', 'k1');"
            f"w = store.CellWriter(s, c, n_samples=8, **{KEYS!r}); assert w.claim();"
            "w.append(MetricResult(scores={'auc': torch.zeros(2)}), torch.arange(2)); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(list((tmp_path / "cells").glob("*.part"))) == 1
    assert store.remove_parts(tmp_path) == 1 and not list((tmp_path / "cells").glob("*.part"))
    w, scores, _ = _cell(tmp_path)
    assert w.claim()
    w.abort()


def test_a_cell_missing_samples_is_not_committed(tmp_path):
    """A run stopped mid-cell committed 72 of 128 samples, which every later run skipped as complete."""
    w, scores, curves = _cell(tmp_path)
    assert w.claim()
    w.append(_result([0, 1, 2, 3]), torch.arange(4))
    w.fail(4, "metric", "RuntimeError: injected")
    with pytest.raises(ValueError, match=r"4 samples scored and 1 failed, but the dataset has 8; not stored"):
        w.commit()
    w.abort()
    assert not scores.exists() and not curves.exists() and not list(scores.parent.glob("*.part"))
    assert store.verify_cell(scores, curves, n_samples=8) == store.MISSING


def test_commit_records_counts_and_a_whole_cell_verifies(tmp_path):
    scores, curves = _write_whole_cell(tmp_path, failed=(3, 6))
    counts = json.loads(store.pq.read_metadata(scores).metadata[store.CELL_META])
    assert counts == {"n_samples": 8, "n_scored": 6, "n_failed": 2,
                      "rows": {"scores": 6, "curves": 18, "failures": 2}}
    assert store.verify_cell(scores, curves, n_samples=8) is None
    assert store.read_metadata(scores) == {"higher_is_better": {"auc": False}}     # what the runner reads
    assert pd.read_parquet(scores).value.tolist() == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.5, 0.7])
    assert store.verify_cell(scores, curves, n_samples=9) == "6 samples scored and 2 failed, the dataset has 9"


@pytest.mark.parametrize("damage, problem", [
    ("truncate scores", "unreadable: Parquet magic bytes not found"),
    ("delete curves", "curves.parquet is missing or unreadable"),
    ("delete failures", "failures.parquet is missing or unreadable"),
    ("truncate curves", "curves.parquet is missing or unreadable"),
    ("rewrite scores", "lacks the sample counts"),
])
def test_a_damaged_cell_is_named_and_not_reused(tmp_path, damage, problem, caplog):
    scores, curves = _write_whole_cell(tmp_path, failed=(5,))
    target = {"scores": scores, "curves": curves, "failures": store.failures_path(scores)}[damage.split()[1]]
    if damage.startswith("truncate"):
        target.write_bytes(target.read_bytes()[:-40])
    elif damage.startswith("delete"):
        target.unlink()
    else:                                                            # a cell as the previous runner wrote it
        pd.read_parquet(target).to_parquet(target)
    assert problem in store.verify_cell(scores, curves, n_samples=8)
    with caplog.at_level("WARNING", logger="bench.store"):
        assert not store.stored_cell(scores, curves, n_samples=8)
    assert str(scores) in caplog.text and "recomputing it" in caplog.text
    w, _, _ = _cell(tmp_path)
    assert w.claim()                                                 # a damaged cell is claimed for recomputing
    w.abort()


def test_write_atomic_syncs_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.csv"
    with pytest.raises(RuntimeError, match="boom"):
        store.write_atomic(target, lambda tmp: (tmp.write_text("half"), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert not list(tmp_path.iterdir())
    store.write_atomic(target, lambda tmp: tmp.write_text("whole"))
    assert target.read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["a.csv"]


# ---- reports: a bad manifest is named; a killed report's temporaries are cleared ----------------
def _results_tree(root: Path, **manifest_fields) -> Path:
    run = root / "shapes" / "cnn"
    _write_whole_cell(run)
    manifest = {"run_id": "r", "dataset": "shapes", "model": "cnn", "score_meta": [],
                "cells": [{"method": "saliency", "metric": "flip", "scores": "cells/saliency__flip__k1.scores.parquet",
                           "curves": "cells/saliency__flip__k1.curves.parquet"}],
                "failures": [], "timings": {}, **manifest_fields}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run / "manifest.json"


def test_a_manifest_that_does_not_parse_is_named(tmp_path):
    path = _results_tree(tmp_path)
    path.write_text(path.read_text()[:-20])                          # cut off, as by a full disk
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON \(line 1, column \d+: "):
        load(tmp_path)


@pytest.mark.parametrize("field, value", [("dataset", "../../evil"), ("model", "a/b"), ("run_id", ".hidden"),
                                          ("dataset", 3)])
def test_a_manifest_naming_a_path_is_refused(tmp_path, field, value):
    path = _results_tree(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=rf"^{path}: {field} name {value!r} cannot be used in a file name"):
        load(tmp_path)


def test_a_manifest_listing_a_cell_outside_its_folder_is_refused(tmp_path):
    path = _results_tree(tmp_path)
    manifest = json.loads(path.read_text())
    manifest["cells"][0]["scores"] = "../../../../etc/passwd"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"^{path} lists the cell file '../../../../etc/passwd', outside its folder"):
        load(tmp_path)


def test_a_killed_reports_temporary_png_is_cleared_by_the_next_report(tmp_path):
    _results_tree(tmp_path, score_meta=[{"metric": "flip", "score": "auc", "higher_is_better": False}])
    out = tmp_path / "report"
    code = ("import os, sys; from pathlib import Path; from bench.store import write_atomic;"
            "write_atomic(Path(sys.argv[1]) / 'scores_shapes.png', lambda tmp: (tmp.write_bytes(b'half a png'),"
            " os.kill(os.getpid(), 9)))")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".scores_shapes.png.~") and left[0].endswith(".png")
    live = out / f".leaderboard.csv.~{files._HOST}~{os.getpid()}~abc.csv"        # a live report's (this process)
    live.write_text("being written")
    write_report(tmp_path, n_boot=10, gallery=False)
    assert not (out / left[0]).exists() and live.exists()
    assert not [p.name for p in out.glob(".*") if p != live]
    assert (out / "leaderboard.csv").is_file()


def test_written_files_are_readable_under_the_users_umask(tmp_path):
    """tempfile's 0600 never survives the rename: every file gets what open() gives (0644 under umask 022)."""
    from bench.zoo.train import _save

    before = os.umask(0o022)
    try:
        files.write_atomic(tmp_path / "report" / "leaderboard.md", lambda tmp: tmp.write_text("x"))
        files.write_json({"run_id": "r"}, tmp_path / "manifest.json")
        writer, scores, curves = _cell(tmp_path, n=3)
        assert writer.claim()
        writer.append(_result([0, 1]), torch.tensor([0, 1]))
        writer.fail(2, "metric", "ValueError: x")
        assert writer.commit()
        (tmp_path / "cache").mkdir()
        _save(tmp_path / "cache" / "model.pt", {"w": torch.zeros(2)})        # the zoo's cached model
        written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
        assert len(written) == 7                      # md, json, scores, curves, failures, model.pt, its sha256
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == \
            {p.name: "0o644" for p in written}
        os.umask(0o077)                               # a private umask is honoured too
        files.write_atomic(tmp_path / "private.txt", lambda tmp: tmp.write_text("x"))
        assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
        assert files.shared_mode() == 0o600
    finally:
        os.umask(before)
