"""Parallel runs never touch each other's files (issue 21): real `python -m bench` processes share one
results folder; the run that owns a cell is killed with -9 mid-cell and another is stopped with Ctrl-C at
random moments (seed in the failure message; CONCURRENCY_SEED=n replays one); the live runs take the cell
over, and a rerun ends with every cell complete, none duplicated, and the scores of a clean serial run.

Before the fix each run began by deleting every part file in the folder, the other runs' live ones
included, and two writers of one cell wrote one part file: runs crashed at commit (FileNotFoundError,
exit 1) and lost their cells.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import store
from bench.report import load

ROOT = Path(__file__).resolve().parents[2]
# slow_gradient: |gradient|, but a run's second full batch waits until the file `gate` exists, so the test
# holds the first run mid-cell, with live part files, while the others start up, clean up and claim cells
USER = '''
import time
from pathlib import Path

CALLS = [0]


def slow_gradient(model, x, target, *, gate: str = "", batch_size: int = 8):
    """|d logit_target / d x|; the second call on a full batch waits (up to 240 s) for the file `gate`."""
    CALLS[0] += len(x) == batch_size
    deadline = time.monotonic() + 240
    while CALLS[0] == 2 and gate and not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    x = x.detach().requires_grad_()
    model(x).gather(1, target[:, None]).sum().backward()
    return x.grad.abs()
'''
TINY = ["model=small_cnn", "model.net.width=4", "model.train.epochs=1", "model.train.n_train=96",
        "model.train.n_test=32", "dataset.n_samples=48", "dataset.size=32", "batch_size=8",
        "method=[random,edge]", "+method.slow._target_=userslow.slow_gradient", "+method.slow._partial_=true",
        "metric=[pixel_flipping,pointing_game]", "metric.pixel_flipping.steps=4", "allowed_targets=[userslow.]",
        "report=false"]
N_CELLS, N_SAMPLES = 6, 48
pytestmark = pytest.mark.slow


def _bench(tmp_path: Path, results: str) -> list[str]:
    return [sys.executable, "-m", "bench", *TINY, f"results_dir={tmp_path / results}",
            f"cache_dir={tmp_path / 'cache'}", f"+method.slow.gate={tmp_path / 'gate'}"]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "OMP_NUM_THREADS": "1"}


def _scores(root: Path):
    s = load(root).scores.drop(columns="run_id")
    return s.sort_values(["method", "metric", "score", "sample_id"]).reset_index(drop=True)


def _start(tmp_path: Path, log: str) -> subprocess.Popen:
    out = open(tmp_path / log, "w")                                   # noqa: SIM115 - closed with the process
    return subprocess.Popen(_bench(tmp_path, "shared"), cwd=tmp_path, env=_env(tmp_path), stdout=out,
                            stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.05)


def _started(tmp_path: Path, name: str):
    """True once run `name` has cleaned its folder and counted its stored cells (the log line after both)."""
    return lambda: "cells already stored" in (tmp_path / f"{name}.log").read_text()


def test_concurrent_runs_and_random_kills_end_complete_and_identical_to_a_serial_run(tmp_path: Path) -> None:
    seed = int(os.environ.get("CONCURRENCY_SEED", random.randrange(2**16)))
    rng = random.Random(seed)
    (tmp_path / "userslow.py").write_text(USER)
    (tmp_path / "gate").touch()
    serial = subprocess.run(_bench(tmp_path, "serial"), cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                            text=True, timeout=300)                   # also trains and caches the model
    assert serial.returncode == 0, serial.stderr[-3000:]
    (tmp_path / "gate").unlink()
    shared = tmp_path / "shared"

    # run `killed` holds the slow cells mid-write (live part files); a, b (the same config) and `stopped` start up,
    # clean the folder and wait for those cells; `killed` is killed with -9 and `stopped` gets Ctrl-C at random
    # moments, so a live run takes the cells over (and may be the one stopped); then the gate opens
    killed = _start(tmp_path, "killed.log")
    _wait(killed, lambda: list(shared.rglob("slow__*.part")))
    a, b, stopped = (_start(tmp_path, f"{name}.log") for name in ("a", "b", "stopped"))
    for proc, name in ((a, "a"), (b, "b"), (stopped, "stopped")):
        _wait(proc, _started(tmp_path, name))
    for proc, sig in sorted([(killed, signal.SIGKILL), (stopped, signal.SIGINT)], key=lambda _: rng.random()):
        time.sleep(rng.uniform(0.0, 2.0))
        proc.send_signal(sig)
    time.sleep(rng.uniform(0.0, 2.0))
    (tmp_path / "gate").touch()
    for proc in (a, b, killed, stopped):
        proc.wait(timeout=300)
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("a", "b", "killed", "stopped")}
    assert a.returncode == 0 and b.returncode == 0, f"seed {seed}: {logs['a'][-2000:]}\n{logs['b'][-2000:]}"
    assert killed.returncode == -signal.SIGKILL and stopped.returncode == 130, f"seed {seed}: {logs['stopped']}"
    assert "interrupted: completed cells are stored" in logs["stopped"]
    computed = sorted(int(log.split("slow: 2/2 metrics stored (")[1][0]) for log in (logs["a"], logs["b"]))
    assert computed == [0, 2], f"seed {seed}"                        # one run took the cells over, one waited

    rerun = subprocess.run(_bench(tmp_path, "shared"), cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already stored" in rerun.stderr + rerun.stdout
    cells = sorted(shared.rglob("*.scores.parquet"))
    assert len(cells) == N_CELLS, f"seed {seed}: {cells}"
    assert all(store.verify_cell(p, p.with_name(p.name.replace(".scores.", ".curves.")), n_samples=N_SAMPLES) is None
               for p in cells)
    assert not list(shared.rglob("*.part")), f"seed {seed}: part files left"
    assert not [p for p in shared.rglob(".*") if not p.name.endswith(".lock") and p.name != ".hydra"]
    manifests = load(shared).manifests
    assert [m["status"] for m in manifests] == ["complete"] and len(manifests[0]["cells"]) == N_CELLS
    got, want = _scores(shared), _scores(tmp_path / "serial")
    assert not got.duplicated(["method", "metric", "score", "sample_id"]).any()
    assert len(got) == 3 * N_SAMPLES * 3 and got.equals(want), f"seed {seed}"   # auc, aopc, hit per sample
