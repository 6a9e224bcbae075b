"""The performance script runs end to end on a tiny setting and writes its tidy table and figure."""
from __future__ import annotations

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
