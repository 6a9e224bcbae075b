"""bench.figures: the curve figures' grouping (one figure per metric, a row of panels per curve)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from bench import figures  # noqa: E402


def _band(metric: str, curves: list[str], pairs=(("shapes", "cnn"), ("shapes", "mlp"))) -> pd.DataFrame:
    """A curve_bands table: two methods, three steps, for each curve and (dataset, model)."""
    rows = [{"dataset": d, "model": m, "method": method, "metric": metric, "curve": c, "x": float(x),
             "x_label": f"layer{x}", "mean": 0.1 * x + k, "ci_low": 0.1 * x + k - 0.05, "ci_high": 0.1 * x + k + 0.05,
             "n": 4, "n_nan": 0}
            for d, m in pairs for c in curves for k, method in enumerate(["random", "saliency"]) for x in range(3)]
    return pd.DataFrame(rows)


@pytest.fixture
def saved(monkeypatch):
    """What each saved figure holds: {file stem: [(panel title, y label) of every visible axes]}."""
    out, save = {}, figures.save_figure

    def record(fig, stem: Path, **kwargs):
        out[stem.name] = [(ax.get_title(), ax.get_ylabel()) for ax in fig.axes if ax.get_visible() and ax.has_data()]
        out[stem.name + " suptitle"] = fig._suptitle.get_text()
        out[stem.name + " x"] = [(ax.xaxis.label.get_visible(), ax.xaxis.get_tick_params()["labelbottom"])
                                 for ax in fig.axes if ax.get_visible() and ax.has_data()]
        return save(fig, stem, **kwargs)

    monkeypatch.setattr(figures, "save_figure", record)
    return out


def test_several_curves_of_a_metric_share_one_figure_a_row_each(tmp_path: Path, saved: dict) -> None:
    band = pd.concat([_band("mprt", ["ssim", "spearman"]), _band("flip", ["curve"])], ignore_index=True)
    paths = figures.plot_curves(band, tmp_path, axes={"mprt": ("layer randomized", "similarity ({curve})")},
                                controls={"random"})
    assert sorted(p.name for p in paths) == ["curves_flip_curve.png", "curves_mprt.png"]
    assert all(p.is_file() for p in paths) and not (tmp_path / "curves_mprt_ssim.png").exists()
    # rows in curve-name order, one panel per (dataset, model); the y label names the row's curve
    assert saved["curves_mprt"] == [("shapes / cnn: spearman", "similarity (spearman)"), ("shapes / mlp: spearman", ""),
                                    ("shapes / cnn: ssim", "similarity (ssim)"), ("shapes / mlp: ssim", "")]
    assert saved["curves_mprt suptitle"].startswith("mprt: spearman, ssim (mean")
    # a column shares its x axis: ticks and label under its last panel only
    assert saved["curves_mprt x"] == [(False, False), (False, False), (True, True), (True, True)]
    # a metric with one curve keeps its own name and plain panel titles
    assert saved["curves_flip_curve"] == [("shapes / cnn", "curve"), ("shapes / mlp", "")]


def test_morf_and_lerf_stay_paired_beside_a_metrics_other_curves(tmp_path: Path, saved: dict) -> None:
    paths = figures.plot_curves(_band("flip", ["morf", "lerf", "extra"], pairs=(("shapes", "cnn"),)), tmp_path)
    assert sorted(p.name for p in paths) == ["curves_flip_extra.png", "curves_flip_morf_lerf.png"]
    assert [t for t, _ in saved["curves_flip_morf_lerf"]] == ["shapes / cnn: MoRF", "shapes / cnn: LeRF"]
    assert saved["curves_flip_morf_lerf x"] == [(False, False), (True, True)]
    assert saved["curves_flip_extra x"] == [(True, True)]
    assert [t for t, _ in saved["curves_flip_extra"]] == ["shapes / cnn"]


@pytest.mark.parametrize("gaps", [[], [3], [0, 1, 6], [2, 4, 7]])
def test_band_draws_what_fill_between_draws(gaps: list[int]) -> None:
    # same pixels and data limits as matplotlib's fill_between, NaN runs (a CI undefined at some x) included
    x = np.linspace(0, 1, 8)
    low, high = np.sin(3 * x), np.sin(3 * x) + 0.3 + x
    low[gaps] = np.nan
    images, limits = [], []
    for draw in ("fill_between", "band"):
        fig = figures.new_figure(figsize=(3, 2))
        ax = fig.subplots()
        if draw == "band":
            figures._band(ax, x, low, high, color="tab:blue", alpha=0.2, lw=0, zorder=1)
        else:
            ax.fill_between(x, low, high, color="tab:blue", alpha=0.2, lw=0, zorder=1)
        fig.canvas.draw()
        images.append(np.asarray(fig.canvas.buffer_rgba()).copy())
        limits.append((ax.get_xlim(), ax.get_ylim()))
    assert limits[0] == limits[1]
    np.testing.assert_array_equal(images[0], images[1])
    assert (images[0][..., :3] < 255).any()                                        # something was drawn
