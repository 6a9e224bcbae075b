"""End-to-end: the runner on a tiny configuration, resume, failures, and the Hydra app."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from bench.config import CONF
from bench.report import load
from bench.run import run

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model=small_cnn", "model.net.width=4", "model.train.epochs=1", "model.train.n_train=96",
    "model.train.n_test=32", "dataset.n_samples=10", "batch_size=4",
    "metric.pixel_flipping.steps=4",
]
METHODS = ["method=[saliency,random]"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Single-threaded torch: on shared cores intra-op threads stall (3x slower measured under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(tmp_path, *extra):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=TINY + METHODS + [f"cache_dir={tmp_path / 'cache'}", *extra])


def test_run_writes_tidy_cells_and_manifest(tmp_path):
    manifest = run(_cfg(tmp_path), out_dir=tmp_path / "out")
    assert manifest["n_samples"] == 10 and manifest["reduce"] == "abs_sum"
    assert {c["method"] for c in manifest["cells"]} == {"saliency", "random"}
    assert len(manifest["cells"]) == 2 * 4
    assert manifest["failures"] == [] and manifest["status"] == "complete" and manifest["skipped"] == 0
    assert manifest["keys"]["checkpoint"] and manifest["keys"]["sample_ids"]
    assert manifest["versions"]["torch"] and manifest["config"]["method"]["saliency"]["_target_"] == "methods.saliency"
    assert 0.0 <= manifest["model_info"]["test_accuracy"] <= 1.0 and manifest["model_info"]["cached"] is False
    assert manifest["consumes"]["pixel_flipping"] == "reduced"                 # which map each metric saw

    results = load(tmp_path / "out")
    s = results.scores
    auc = s[(s.method == "saliency") & (s.metric == "pixel_flipping") & (s.score == "auc")]
    assert sorted(auc.sample_id) == list(range(10))                           # one row per sample
    mprt_measures = {"spearman", "spearman_signed", "ssim", "hog", "top_k", "degenerate"}   # degenerate: context
    assert set(s.score) == {"auc", "aopc", "hit", "rma"} | mprt_measures | {x for x in s.score if "@" in x}
    c = results.curves
    pf = c[(c.method == "random") & (c.metric == "pixel_flipping")]
    assert len(pf) == 10 * 5 and pf.x.min() == 0.0 and pf.x.max() == 1.0
    directions = results.meta.set_index(["metric", "score"]).higher_is_better
    assert directions["pixel_flipping", "auc"] == False and directions["pointing_game", "hit"] == True  # noqa: E712


@pytest.mark.parametrize("kind, expected", [("raw", lambda a: a), ("signed", lambda a: a.sum(1)),
                                            ("reduced", lambda a: a.abs().sum(1))])
def test_each_metric_gets_the_form_of_the_attribution_it_declares(kind, expected):
    """DESIGN: a metric declares what its formula consumes and the runner hands it exactly that, whatever the
    run's `reduce` (here abs_sum, under which a signed map would otherwise arrive as |.|)."""
    from bench.calls import metric_inputs as _inputs
    from metrics import consumes

    @consumes(kind)
    def metric(attribution):
        return attribution

    raw = torch.tensor([[[[1.0, -2.0]], [[-3.0, 1.0]]]])                      # (1, 2, 1, 2): signs differ by channel
    batch = {"x": torch.zeros(1, 2, 1, 2), "target": torch.zeros(1, dtype=torch.long)}
    got = _inputs(metric, None, batch, raw, None, "abs_sum", {})["attribution"]
    assert torch.equal(got, expected(raw))


def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path):
    out = tmp_path / "out"
    run(_cfg(tmp_path), out_dir=out)
    before = load(out).scores.sort_values(["method", "metric", "score", "sample_id"]).reset_index(drop=True)
    cells = sorted((out / "cells").glob("*.scores.parquet"))
    lost = next(p for p in cells if p.name.startswith("saliency__pixel_flipping"))
    lost.unlink()                                                             # as if killed before this cell
    kept = {p: p.stat().st_mtime_ns for p in cells if p != lost}
    manifest = run(_cfg(tmp_path), out_dir=out)
    assert manifest["model_info"]["cached"] is True
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())            # nothing else recomputed
    after = load(out).scores.sort_values(["method", "metric", "score", "sample_id"]).reset_index(drop=True)
    assert after.equals(before)                                               # same numbers, no duplicate rows
    # a changed option never shares the folder (its manifest would replace this run's) and is a new cell
    with pytest.raises(ValueError, match=r"holds run 'shapes-small_cnn-default-\w+' of another configuration \(it "
                                         r"differs in metric\.pixel_flipping\.steps\); a folder is never reused"):
        run(_cfg(tmp_path, "metric.pixel_flipping.steps=2"), out_dir=out)
    assert load(out).scores.sort_values(["method", "metric", "score", "sample_id"]).reset_index(drop=True).equals(before)
    manifest = run(_cfg(tmp_path, "metric.pixel_flipping.steps=2"), out_dir=tmp_path / "other")
    assert manifest["skipped"] == 6                         # the cells the change does not touch: copied, verified
    other = load(tmp_path / "other").scores
    assert other.run_id.eq(manifest["run_id"]).all() and len(other) == len(before)
    same = ["method", "metric", "score", "sample_id", "value"]
    unchanged = before[before.metric != "pixel_flipping"][same].reset_index(drop=True)
    assert other[other.metric != "pixel_flipping"][same].sort_values(same[:4]).reset_index(drop=True).equals(unchanged)
    pf = [c for c in manifest["cells"] if c["metric"] == "pixel_flipping"]
    assert all(c["key"] not in {p.name.split("__")[2].split(".")[0] for p in kept} for c in pf)


def test_bad_reduce_is_refused_before_work(tmp_path):
    with pytest.raises(ValueError, match=r"reduce must be one of \['sum', 'abs_sum', 'max_abs', 'l2'\], got 'mean'"):
        run(_cfg(tmp_path, "reduce=mean"), out_dir=tmp_path / "out")


def test_hydra_app_runs_and_reports(tmp_path):
    """`python -m bench` as a user runs it: a multirun that ends with the report."""
    cmd = [sys.executable, "-m", "bench", *TINY, "method=[saliency,random]", "metric=[pixel_flipping,pointing_game]",
           f"results_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "results/shapes/small_cnn").glob("default-*/manifest.json"))) == 1
    report = tmp_path / "results/report"
    assert (report / "leaderboard.md").exists() and (report / "curves_pixel_flipping_curve.png").exists()
    assert "| saliency |" in proc.stdout and "| random |" in proc.stdout


@pytest.mark.slow
def test_runs_of_different_configurations_get_their_own_folders_and_report_groups(tmp_path):
    """A sweep over anything but dataset/model, and a later experiment into the same results_dir, never share a
    folder, a manifest or a leaderboard table: each run has an identity (tag + configuration) and the report
    shows one group per identity, the earlier runs' rows unchanged."""
    results = tmp_path / "results"
    base = [sys.executable, "-m", "bench", "--multirun", *TINY, "method=[saliency,random]", "metric=[pixel_flipping,pointing_game]",
            f"results_dir={results}", f"cache_dir={tmp_path / 'cache'}", "gallery=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for extra in (["reduce=sum,abs_sum"], ["run_tag=second"]):
        proc = subprocess.run(base + extra, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted(p.parent.name for p in (results / "shapes/small_cnn").glob("*/manifest.json"))
    assert len(folders) == 3 and sum(f.startswith("default-") for f in folders) == 2 and folders[2].startswith("second-")
    manifests = [load(results / "shapes/small_cnn" / f).manifests[0] for f in folders]
    assert sorted(o for m in manifests[:2] for o in m["identity"]["overrides"] if o.startswith("reduce=")) == \
        ["reduce=abs_sum", "reduce=sum"]
    assert len({m["identity"]["group"] for m in manifests}) == 3 and len({m["run_id"] for m in manifests}) == 3
    index = (results / "report/index.md").read_text()
    assert all(m["identity"]["group"] in index for m in manifests) and "reduce=sum" in index
    assert not (results / "report/leaderboard.md").exists()                  # no table mixing the three runs
    for m in manifests:
        board = pd.read_csv(results / "report" / m["identity"]["group"] / "leaderboard.csv")
        assert set(board.method) == {"saliency", "random"} and (board.n + board.n_nan).eq(10).all()


def test_channels_last_and_reduced_precision_agree_with_full_precision(tmp_path, caplog):
    """channels_last gives float32's numbers to rounding; bfloat16 autocast stays close on the
    forward-pass scores; each switch gets its own cells and is written to the manifest."""
    runs, keys = {}, {}
    for name, extra in {"ref": [], "cl": ["channels_last=true"], "bf16": ["precision=bfloat16"]}.items():
        manifest = run(_cfg(tmp_path, "method=[random]", "metric=[pixel_flipping,pointing_game]", *extra),
                       out_dir=tmp_path / name)
        runs[name] = load(tmp_path / name).scores.set_index(["method", "metric", "score", "sample_id"]).value
        keys[name] = {c["key"] for c in manifest["cells"]}
    assert not (keys["ref"] & keys["cl"]) and not (keys["ref"] & keys["bf16"]) and not (keys["cl"] & keys["bf16"])
    assert manifest["precision"] == "bfloat16" and manifest["channels_last"] is False
    assert "precision=bfloat16 on CPU: autocast is meant for GPUs" in caplog.text
    torch.testing.assert_close(torch.tensor(runs["cl"].values), torch.tensor(runs["ref"].values), rtol=1e-4, atol=1e-4)
    auc = lambda r: torch.tensor(r.xs(("random", "pixel_flipping", "auc"), level=(0, 1, 2)).values)
    assert not torch.equal(auc(runs["bf16"]), auc(runs["ref"]))               # autocast did change the passes
    torch.testing.assert_close(auc(runs["bf16"]), auc(runs["ref"]), rtol=0.05, atol=0.05)
    # the random map does not depend on the model: the pointing game is the same
    hit = lambda r: r.xs(("random", "pointing_game", "hit"), level=(0, 1, 2)).values
    assert (hit(runs["bf16"]) == hit(runs["ref"])).all()


@pytest.mark.parametrize("arg", ["+hydra.callbacks.evil._target_=os.system", "hydra.launcher._target_=os.system",
                                 "++hydra.job_logging.handlers.x._target_=os.system", "hydra/callbacks=evil"])
def test_code_in_hydras_own_config_is_refused_from_the_command_line(arg):
    """Hydra instantiates its callbacks, launcher and logging factories itself, before the run's target check:
    the CLI refuses any such override (hydra/launcher=joblib, a config group, stays allowed)."""
    from bench.__main__ import hydra_target

    assert "may not set code in Hydra's own config" in hydra_target(["model=resnet", arg])
    assert hydra_target(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=resnet"]) is None


def test_an_unwritable_results_dir_is_refused_before_hydra_creates_it(tmp_path):
    """Hydra creates the output folder before the run's own check: the CLI checks results_dir first, so a
    folder that cannot be created is one clear line (exit 2), not Hydra's traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "bench", f"results_dir={blocker / 'out'}", "method=[saliency]"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"results folder '{blocker / 'out'}' is not writable" in proc.stderr
    assert "set results_dir to a folder you can write to" in proc.stderr
