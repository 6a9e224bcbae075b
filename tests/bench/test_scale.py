"""Experiments at scale: resume after a kill, and sweeps through Hydra's joblib and submitit launchers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.report import load

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.net.width=4", "model.train.epochs=1", "model.train.n_train=96", "model.train.n_test=32",
        "batch_size=16", "dataset.n_samples=64", "method=[saliency,gradient_x_input,random,edge]",
        "metric=[pixel_flipping,pointing_game]", "report=false"]
pytestmark = pytest.mark.slow


def _bench(tmp_path: Path, results: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "bench", *TINY, f"results_dir={tmp_path / results}",
            f"cache_dir={tmp_path / 'cache'}", *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _scores(root: Path):
    s = load(root).scores.drop(columns="run_id")
    return s.sort_values(["model", "method", "metric", "score", "sample_id"]).reset_index(drop=True)


def test_killed_run_resumes_without_losing_or_duplicating_cells(tmp_path: Path) -> None:
    done = subprocess.run(_bench(tmp_path, "whole", "model=small_cnn"), cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cells = tmp_path / "killed/shapes/small_cnn/cells"
    proc = subprocess.Popen(_bench(tmp_path, "killed", "model=small_cnn"), cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(cells.glob("*.scores.parquet")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)                                   # no chance to clean up
    proc.wait()
    stored = len(list(cells.glob("*.scores.parquet")))
    assert 1 <= stored < 8, f"the kill should land mid-run, {stored} of 8 cells were stored"
    assert not (cells.parent / "manifest.json").exists()
    resumed = subprocess.run(_bench(tmp_path, "killed", "model=small_cnn"), cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    computed = sum(int(line.split("(")[1].split()[0]) for line in resumed.stderr.splitlines() + resumed.stdout.splitlines()
                   if "metrics stored (" in line)
    assert computed == 8 - stored                                      # only the missing cells ran again
    assert _scores(tmp_path / "killed").equals(_scores(tmp_path / "whole"))   # same rows, same numbers


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_sweep_through_a_hydra_launcher(tmp_path: Path, launcher: str) -> None:
    pytest.importorskip({"joblib": "hydra_plugins.hydra_joblib_launcher",
                         "submitit_local": "hydra_plugins.hydra_submitit_launcher"}[launcher])
    cmd = _bench(tmp_path, "sweep", f"hydra/launcher={launcher}", "model=small_cnn,resnet",
                 "metric=[pointing_game]", "method=[saliency,random]")
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = load(tmp_path / "sweep").scores
    # each job wrote its own folder; the report merges them
    assert sorted(scores.model.unique()) == ["resnet", "small_cnn"]
    assert len(scores) == 2 * 2 * 64 and not scores.duplicated(["model", "method", "metric", "score", "sample_id"]).any()
