"""The performance script runs end to end on a tiny setting and writes its tidy table and figure."""
from __future__ import annotations

import time

import pandas as pd
import pytest

from bench import perf


def test_perf_writes_tidy_rows_and_summary(tmp_path):
    df = perf.main(["--workloads", "pixel_flipping", "--sizes", "16", "--n", "4",
                    "--scales", "1", "2", "--repeat", "1", "--no-quantus",
                    "--threads", "1", "--out", str(tmp_path)])
    saved = pd.read_csv(tmp_path / "perf.csv")
    assert len(saved) == len(df) == 2 + 1                      # 2 scales + the model's own limit
    ours = saved[saved.impl == "ours"]
    assert sorted(ours.n) == [4, 8]
    assert (ours.seconds > 0).all() and (ours.samples_per_s == ours.n / ours.seconds).all()
    pf = ours[ours.workload == "pixel_flipping"]
    assert (pf.forward_per_s == pf.n * (1 + 2 * perf.STEPS) / pf.seconds).all()
    limit = perf.summary(saved).loc[("pixel_flipping", 16), "of_model_limit"]
    assert 0 < limit < 10
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_unknown_workload_is_refused():
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        perf.workload("nope", None, {"x": perf.torch.zeros(1, 3, 8, 8)}, "ours")


def test_grid_runs_ours_and_through_quantus():
    """The end-to-end grid workload: the default 7 x 4 grid, ours and the same grid through Quantus."""
    pytest.importorskip("quantus")
    device = perf.torch.device("cpu")
    model = perf.make_model(32, device)
    d = perf.make_inputs(model, 32, 2, device)
    for impl in ("ours", "quantus"):
        run, passes = perf.workload("grid", model, d, impl)
        assert passes == 0
        run()


ISSUE_20 = {"focus", "sparseness", "complexity", "effective_complexity", "faithfulness_estimate", "irof",
            "monotonicity", "monotonicity_correlation", "sensitivity_n", "sufficiency", "selectivity",
            "max_sensitivity", "avg_sensitivity", "local_lipschitz_estimate", "continuity", "consistency",
            "relative_input_stability", "relative_output_stability", "relative_representation_stability",
            "completeness", "non_sensitivity"}


def test_every_new_metric_has_a_quantus_pair():
    quantus = pytest.importorskip("quantus")
    from bench.config import CONF
    from bench.perf_metrics import PAIRS

    assert set(PAIRS) == ISSUE_20 - {"irof", "non_sensitivity"}   # Quantus stops on these inputs (perf_metrics)
    for name, pair in PAIRS.items():
        assert (CONF / "metric" / f"{name}.yaml").exists() and hasattr(quantus, pair(32).quantus), name


# sparseness: Quantus broadcasts a (B, 1, H, W) map over x's 3 channels, so its Gini runs over 3 H W
# values, which moves it by O(1 / n) (here 5e-4)
@pytest.mark.parametrize("name, score, rtol", [("focus", "focus", 1e-4), ("sparseness", "gini", 2e-3),
                                               ("max_sensitivity", None, 0)])
def test_metric_workload_runs_both_on_the_same_maps(name, score, rtol):
    """Ours and Quantus on the same inputs; where the definitions coincide, the same values."""
    pytest.importorskip("quantus")
    device = perf.torch.device("cpu")
    model = perf.make_model(16, device)
    d = perf.make_inputs(model, 16, 4, device, saliency=False)
    ours, passes = perf.workload(name, model, d, "ours")
    theirs, _ = perf.workload(name, model, d, "quantus")
    result, q = ours(), theirs()
    assert passes == 0 and len(q) == 4
    if score is not None:
        np = perf.np
        np.testing.assert_allclose(result.scores[score].double().numpy(), q.astype(float), rtol=rtol, atol=1e-6)


def test_metrics_workload_rows_name_the_metric(tmp_path):
    df = perf.main(["--workloads", "metrics", "--metrics", "focus", "complexity", "--sizes", "16", "--n", "4",
                    "--scales", "1", "--repeat", "1", "--no-quantus", "--threads", "1", "--out", str(tmp_path)])
    assert sorted(df.workload) == ["complexity", "focus"] and (df.impl == "ours").all() and (df.seconds > 0).all()


def test_tuned_workload_rows_are_ratios_of_the_models_best(monkeypatch):
    """Issue 22's table: each workload's images/s over the best of the reference sweep of its pass kind."""
    from bench import perf_tuning, tuning

    monkeypatch.setattr(tuning, "_MEMO", {})
    rows = perf_tuning.measure("other_cnn", n=2, repeat=1, masks=4, samples=2, limit=4)
    df = pd.DataFrame(rows)
    assert sorted(df.workload) == ["integrated_gradients", "pixel_flipping", "rise", "smoothgrad"]
    # throughputs are rounded to 0.1 images/s: at a few images/s (a loaded machine) that moves the ratio ~1 %
    assert ((df.ratio / (df.images_per_s / df.best_images_per_s) - 1).abs() < 0.02).all() and (df.ratio > 0).all()
    assert ((df.spread >= 0) & (df.spread < 1)).all()
    # the reference is sustained (back-to-back calls); its fastest single call can only be faster
    assert (df.peak_images_per_s >= df.best_images_per_s).all() and (df.ratio_peak <= df.ratio + 1e-3).all()
    swept = df.chosen_batch <= 4                                    # the reference timed the chosen size
    assert df.ratio_at_chosen.isna().eq(~swept).all()
    assert (df.ratio_at_chosen[swept] >= df.ratio[swept] - 1e-3).all()   # the best size's rate is the larger
    sizes, _ = tuning.tune(perf_tuning.OtherCNN().eval(), (3, 32, 32), "cpu")      # same architecture: same key
    assert set(df[df["pass"] == "forward"].chosen_batch) == {sizes.forward}
    assert set(df[df["pass"] == "backward"].chosen_batch) == {sizes.backward}
    assert set(df.best_batch) <= {1, 2, 4}


def test_back_to_back_times_calls_until_the_stretch_is_spent():
    """The sustained price: at least `calls` calls, and calls until `seconds` of wall time are spent."""
    from bench.perf_floor import back_to_back

    calls = back_to_back(lambda: time.sleep(0.01), seconds=0.05, calls=3)
    walls = [w for w, _ in calls]
    assert len(calls) >= 5 and sum(walls) >= 0.05 and sum(walls[:-1]) < 0.05 and min(walls) >= 0.01
    assert len(back_to_back(lambda: time.sleep(0.01), seconds=0.0, calls=3)) == 3


def test_a_stray_sample_variable_breaks_only_the_counted_child(tmp_path):
    """FLOOR_SAMPLE_AT is floor()'s message to its child: other modules import whatever it holds, and the
    child stops with a message naming it rather than a traceback."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "FLOOR_SAMPLE_AT": "{not json"}
    imported = subprocess.run([sys.executable, "-c", "import bench.perf_tuning"], env=env, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    child = subprocess.run([sys.executable, "-m", "bench.perf_floor", "--passes", str(tmp_path / "p.json")], env=env,
                           capture_output=True, text=True)
    assert child.returncode != 0 and "FLOOR_SAMPLE_AT is not JSON" in child.stderr


def test_window_prices_each_labels_passes_at_its_own_samples():
    """In-window floor, by hand: a label's passes at its samples' seconds per image; passes outside any label
    at the model's mean over all its samples of that kind; NaN where the model has no sample of the kind."""
    from bench.perf_floor import _window_floor

    data = {"passes": [["m", "ig", "mprt", 64, True, 10],             # 640 images, backward
                       ["m", "sal", "pf", 32, False, 4],              # 128 images, forward
                       ["m", "(run)", "(other)", 8, False, 1],        # 8 images, no label's samples
                       ["m", "(run)", "(other)", 2, True, 1]],        # 2 images, backward
            "prices": {"m|ig|mprt": [["backward", 128, 0.256, 0.5]],   # 2 ms per image
                       "m|sal|pf": [["forward", 64, 0.032, 0.06], ["forward", 64, 0.064, 0.1]]}}   # 0.75 ms
    got = _window_floor(data).set_index(["method", "metric", "batch"])
    assert got.loc[("ig", "mprt", 64)].floor_window_wall_s == pytest.approx(640 * 0.002)
    assert got.loc[("ig", "mprt", 64)].floor_window_cpu_s == pytest.approx(640 * 0.5 / 128)
    assert got.loc[("sal", "pf", 32)].floor_window_wall_s == pytest.approx(128 * 0.096 / 128)
    assert got.loc[("(run)", "(other)", 8)].floor_window_wall_s == pytest.approx(8 * 0.096 / 128)
    assert got.loc[("(run)", "(other)", 2)].floor_window_wall_s == pytest.approx(2 * 0.002)
    data["prices"].pop("m|ig|mprt")                                   # no backward sample at all: unpriced
    assert _window_floor(data).set_index("batch").loc[[64, 2]].floor_window_wall_s.isna().all()


@pytest.mark.slow
def test_floor_counts_the_runs_passes_and_prices_them(tmp_path):
    """Issue 22's floor: a real `python -m bench` in a child process, its passes counted by (method, metric,
    batch, kind) and priced at the model's best seconds per image."""
    from bench import perf_floor

    run = ["model=small_cnn", "~model.train", "model.net.width=4", "dataset.n_samples=6", "batch_size=3",
           "method=[saliency,random]", "metric=[pixel_flipping]", "metric.pixel_flipping.steps=4",
           "report=false", "gallery=false", "progress=false", f"cache_dir={tmp_path / 'cache'}"]
    table = perf_floor.floor(tmp_path, overrides=tuple(run), repeat=2, limit=8)
    passes = pd.read_csv(tmp_path / "floor_passes.csv").set_index(["method", "metric", "kind"])
    # pixel flipping, MoRF: 2 batches of 3 samples x (4 steps + f(x)) = 30 inference images
    assert passes.loc[("saliency", "pixel_flipping", "forward")].images.sum() == 30
    assert passes.loc[("random", "pixel_flipping", "forward")].images.sum() == 30
    assert passes.loc[("saliency", "(attribution)", "backward")].images.sum() == 6   # one gradient per sample
    assert ("random", "(attribution)", "backward") not in passes.index               # a control: no model pass
    total = table.set_index("model").loc["total"]
    # the CSV rounds each row to 4 decimals: at these few milliseconds that is the tolerance
    assert total.floor_wall_s == pytest.approx(passes.floor_wall_s.sum(), rel=1e-3, abs=5e-5 * (len(passes) + 1))
    assert total.run_wall_s > total.scoring_s > 0 and total.ratio_run == pytest.approx(
        total.run_wall_s / total.floor_wall_s, rel=1e-3)
    assert total.forward_passes > 0 and total.backward_passes > 0
    # the second run sampled in-window: a price per label, its seconds off the run's
    assert total.window_sampling_s > 0 and total.floor_window_wall_s > 0 and total.window_run_wall_s > 0
    assert total.ratio_window == pytest.approx(total.window_run_wall_s / total.floor_window_wall_s, rel=1e-3)
    assert total.window_unpriced_images == 0
    # priced at the fastest single call, every pass is cheaper than at the sustained cost of back-to-back calls
    assert (passes.floor_peak_wall_s <= passes.floor_wall_s).all() and total.ratio_run_peak >= total.ratio_run
    labels = pd.read_csv(tmp_path / "floor_labels.csv").set_index(["method", "metric"])
    cell = labels.loc[("saliency", "pixel_flipping")]                               # time spent beside its floor
    assert cell.cpu_s > 0 and cell.floor_cpu_s == pytest.approx(
        passes.loc[("saliency", "pixel_flipping", "forward")].floor_cpu_s.sum(), rel=1e-3)
