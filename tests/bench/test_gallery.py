"""The gallery and MPRT grid (bench.gallery) and the MoRF + LeRF curve figure, on a tiny stored run."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import numpy as np                                                          # noqa: E402
import pandas as pd                                                         # noqa: E402
import pytest                                                               # noqa: E402
import torch                                                                # noqa: E402
from hydra import compose, initialize_config_dir                            # noqa: E402
from scipy.stats import spearmanr                                           # noqa: E402

from bench import figures, zoo                                              # noqa: E402
from bench.config import CONF
from bench.gallery import (_gallery_figure, _grid_figure, display_scale, load_items, load_run, main,  # noqa: E402
                           mprt_configs, mprt_grid, pick_samples, write_gallery)
from bench.keep import read_report_maps                                     # noqa: E402
from bench.report import write_report                                       # noqa: E402
from bench.results import load                                              # noqa: E402
from bench.run import run                                                   # noqa: E402
from bench.zoo import SmallCNN                                              # noqa: E402
import methods                                                              # noqa: E402
from methods import saliency                                               # noqa: E402
from metrics import mprt, to_map                                            # noqa: E402
from metrics.randomization import _fully_randomized                         # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = [                                                                    # as tests/bench/test_run.py, smaller
    "model=small_cnn", "model.net.width=4", "model.train.epochs=1", "model.train.n_train=96",
    "model.train.n_test=32", "dataset.n_samples=4", "batch_size=4", "metric.pixel_flipping.steps=4",
    "metric.pixel_flipping.order=both", "metric.mprt.measures=[spearman]",
    "method=[saliency,random]", "metric=[pixel_flipping,mprt]",
]


def _no_model(*args, **kwargs):
    raise AssertionError("the report loaded a model")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """A stored run of small_cnn (width 4, one epoch) on 4 shapes: saliency and random x (pixel flipping
    MoRF+LeRF, MPRT), and its report with the gallery; `drawn` records the lines of every figure saved."""
    tmp = tmp_path_factory.mktemp("gallery")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=TINY + [f"cache_dir={tmp / 'cache'}"])
    run(cfg, out_dir=tmp / "results" / "shapes" / "small_cnn")
    drawn, axes, save = {}, {}, figures.save_figure

    def record(fig, stem, **kwargs):
        drawn[stem.name] = [(line.get_label(), line.get_linestyle(), line.get_color()) for ax in fig.axes
                            for line in ax.lines if len(line.get_xdata())]
        axes[stem.name] = [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel(),
                            [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else [])
                           for ax in fig.axes if ax.get_visible()]
        return save(fig, stem, **kwargs)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(figures, "save_figure", record)
        m.setattr(zoo, "load_model", _no_model)                     # the report draws the kept maps only
        report = write_report(tmp / "results", n_boot=20, gallery=True)
    return SimpleNamespace(root=tmp / "results", report=report, drawn=drawn, axes=axes)


def test_pick_samples_takes_one_per_class_in_turn():
    # classes 0,0,1,2,1,0: first occurrences 0, 2, 3, then second ones 1, 4, then 5
    assert pick_samples(torch.tensor([0, 0, 1, 2, 1, 0]), 4).tolist() == [0, 2, 3, 1]
    assert pick_samples(torch.tensor([0, 0, 1, 2, 1, 0]), 9).tolist() == [0, 2, 3, 1, 4, 5]
    with pytest.raises(ValueError, match="samples must be a positive integer, got 0"):
        pick_samples(torch.tensor([0, 1]), 0)


def test_display_scale_divides_by_the_99th_percentile_per_sample():
    ramp = torch.arange(100.0).view(1, 10, 10)                     # q99 of 0..99 = 0.99 * 99 = 98.01 (linear)
    signed = -2 * ramp                                               # q99 of |.| = 196.02, sign kept
    spike = torch.zeros(1, 10, 10)
    spike[0, 0, 0] = 5.0                                             # q99 = 0: falls back to the maximum
    out = display_scale(torch.cat([ramp, signed, spike, torch.zeros(1, 10, 10)]))
    assert out[0, 5, 0].item() == pytest.approx(50 / 98.01, rel=1e-6) and out[0, 9, 9] == 1.0   # 99 / 98.01 clipped
    assert out[1, 5, 0].item() == pytest.approx(-100 / 196.02, rel=1e-6) and out[1, 9, 9] == -1.0
    assert out[2, 0, 0] == 1.0 and out[2].sum() == 1.0
    assert (out[3] == 0).all()                                       # a zero map stays zero


@pytest.mark.parametrize("order", ["cascading_top_down", "cascading_bottom_up", "independent"])
def test_grid_stages_are_the_models_mprt_scores(tiny_cnn, batch, order):
    """mprt_stages drives the grid: its per-stage Spearman equals mprt's spearman@<layer>, in every order."""
    x, target = batch
    kwargs = {"order": order, "seed": 3, "layers": ["conv1", "conv2", "fc"]}
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    grid = mprt_grid(tiny_cnn, x, target, {"saliency": saliency}, reduce="sum", **kwargs)
    expected = mprt(tiny_cnn, x, target, saliency, measures=["spearman"], **kwargs)
    assert grid.labels == (["conv1", "conv2", "fc"] if order == "cascading_bottom_up" else ["fc", "conv2", "conv1"])
    assert grid.maps["saliency"].shape == (4, 5, 8, 8)
    for k, layer in enumerate(grid.labels):
        torch.testing.assert_close(grid.spearman["saliency"][k], expected.scores[f"spearman@{layer}"], rtol=0, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in tiny_cnn.state_dict().items())     # model untouched


def test_grid_computes_a_model_free_map_once(tiny_cnn, batch):
    """A method declared model_free (methods.edge) is called once, on the original model, and shown unchanged
    at every stage, with Spearman 1 as mprt scores it; an undeclared one is called at every stage."""
    x, target = batch
    calls = {"edge": 0, "saliency": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        call.model_free = getattr(fn, "model_free", False)
        return call

    grid = mprt_grid(tiny_cnn, x, target, {"edge": counted("edge", methods.edge),
                                           "saliency": counted("saliency", saliency)}, reduce="sum",
                     layers=["conv1", "conv2", "fc"])
    assert calls == {"edge": 1, "saliency": 4}
    assert all(torch.equal(m, grid.maps["edge"][0]) for m in grid.maps["edge"][1:])
    expected = mprt(tiny_cnn, x, target, methods.edge, measures=["spearman"], layers=["conv1", "conv2", "fc"])
    for k, layer in enumerate(grid.labels):
        torch.testing.assert_close(grid.spearman["edge"][k], expected.scores[f"spearman@{layer}"], rtol=0, atol=0)


def test_gallery_and_grid_of_a_stored_run(tiny: SimpleNamespace):
    run_ = load_run(tiny.root / "shapes" / "small_cnn" / "manifest.json")
    data = load_items(run_, torch.arange(4))
    assert data["target"].tolist() == [0, 1, 2, 3]                   # shapes: sample i has class i mod 6
    figs = {"gallery_shapes_small_cnn", "mprt_grid_shapes_small_cnn_mprt_0"}
    assert figs <= set(tiny.drawn) and all((tiny.report / f"{f}.png").stat().st_size > 5000 for f in figs)
    assert not list(tiny.report.glob("*.pdf"))                       # PDF twins are opt-in (report_pdf, --pdf)
    assert not any(f.startswith("mprt_grid") and not f.endswith("_0") for f in tiny.drawn)   # one grid sample

    # the grid: methods x (stages + 1) panels, stages in mprt's top-down order
    one = {k: v[:1] for k, v in data.items()}
    grid = mprt_grid(run_.model, one["x"], one["target"], run_.methods, reduce="abs_sum",
                     **mprt_configs(run_.cfg)["mprt"])
    S = len(SmallCNN.mprt_layers)
    assert grid.labels == list(SmallCNN.mprt_layers)[::-1] and list(grid.maps) == ["saliency", "random"]
    _, image = _grid_figure({**one, "classes": None}, run_.manifest, grid, "mprt")
    g = 64 // 16                                                     # the gutter between tiles, in pixels
    shown = np.ma.getdata(image.get_array())                        # ONE image: methods x (stages + 1) tiles
    assert shown.shape == (2 * 64 + g, (S + 1) * 64 + S * g) and image.get_cmap().name == "magma"
    for r, name in enumerate(grid.maps):                             # each tile: |map| scaled by itself
        expected = display_scale(grid.maps[name][:, 0].abs()).numpy()                  # (S + 1, H, W)
        for s_ in range(S + 1):
            tile_ = shown[r * (64 + g): r * (64 + g) + 64, s_ * (64 + g): s_ * (64 + g) + 64]
            np.testing.assert_array_equal(tile_, expected[s_])
    assert np.isnan(shown[64:64 + g]).all() and np.isnan(shown[:, 64:64 + g]).all()     # gutters: transparent

    # the last stage is the fully randomized model (emprt's own helper, another code path) ...
    full = _fully_randomized(run_.model, None, (), mprt_configs(run_.cfg)["mprt"]["seed"])   # the seed the run derived
    torch.testing.assert_close(grid.maps["saliency"][-1], to_map(saliency(full, one["x"], one["target"]), "abs_sum"))
    # ... and each stage's similarity is the score the run stored (a batch of 4 there, of 1 here)
    s = load(tiny.root).scores
    s = s[s.metric.eq("mprt") & s.sample_id.eq(0)].set_index(["method", "score"])["value"]
    for name in ("saliency", "random"):
        stored = [s[name, f"spearman@{layer}"] for layer in grid.labels]
        np.testing.assert_allclose(grid.spearman[name][:, 0].numpy(), stored, rtol=0, atol=1e-6)
    # Spearman of the grid's first and last saliency panels, by scipy, is mprt's final "spearman" score
    m = grid.maps["saliency"][:, 0].abs().flatten(1).numpy()          # (S + 1, HW)
    assert spearmanr(m[0], m[-1]).statistic == pytest.approx(s["saliency", "spearman"], abs=1e-6)
    # the random control is drawn per (model, class): a randomized model gets a new draw, chance similarity
    assert abs(s["random", "spearman"]) < 0.1


def test_report_draws_morf_and_lerf_in_one_figure_and_embeds_the_gallery(tiny: SimpleNamespace):
    # one pixel-flipping figure, not one per order: a MoRF panel above a LeRF panel, each method one colour in
    # both; the random control dashed (drawn on top), saliency solid; axes say what they show; the legend
    # lists the two methods drawn
    assert "curves_pixel_flipping_morf_lerf" in tiny.drawn and "curves_pixel_flipping_morf" not in tiny.drawn
    lines = tiny.drawn["curves_pixel_flipping_morf_lerf"]
    assert sorted((label, style) for label, style, _ in lines) == [("random", "--")] * 2 + [("saliency", "-")] * 2
    assert len({(label, c) for label, _, c in lines}) == 2 and len({c for *_, c in lines}) == 2
    panels = tiny.axes["curves_pixel_flipping_morf_lerf"]
    assert [t for t, *_ in panels] == ["shapes / small_cnn: MoRF", "shapes / small_cnn: LeRF"]
    assert {x for _, x, *_ in panels} == {"fraction of pixels removed"}
    assert panels[0][2] == "model output (target class)" and sorted(panels[0][3]) == ["random", "saliency"]
    assert tiny.axes["curves_mprt_spearman"][0][1:3] == ("layer randomized", "similarity to the original map (spearman)")
    page = (tiny.report / "leaderboard.html").read_text(encoding="utf-8")
    assert "<figcaption>gallery_shapes_small_cnn</figcaption>" in page
    # mprt.yaml declares its sanity scores (_sanity_, _staged_): the runner records them, the table follows them
    sanity = pd.read_csv(tiny.report / "sanity.csv")
    assert set(zip(sanity["metric"], sanity["score"], sanity["stage"])) == {
        ("mprt", "spearman", "last"), ("mprt", "spearman", SmallCNN.mprt_layers[-1])}
    assert "<figcaption>mprt_grid_shapes_small_cnn_mprt_0</figcaption>" in page


def test_cli_refuses_missing_runs_and_uncached_models(tiny: SimpleNamespace, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 2 and "no manifest.json found below" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([str(tiny.root), "--cache-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "is not in the cache" in err and "--cache-dir" in err
    # inside a report the same run is logged and left out, and the report goes on
    assert write_gallery(tiny.root, tmp_path / "o", cache_dir=tmp_path / "empty", errors="warn") == []


def test_gallery_rows_are_montages_of_the_scaled_maps(tiny: SimpleNamespace):
    """One image per row: the inputs (min-max per image, mask outlined), then each method's maps, each tile
    the map scaled by its own 99th percentile, in the method's colormap; transparent gutters between tiles."""
    path = tiny.root / "shapes" / "small_cnn" / "manifest.json"
    manifest = load_run(path).manifest
    kept = read_report_maps(path, manifest)
    fig, images = _gallery_figure(kept, manifest)
    assert list(images) == ["input", "saliency", "random"] and len(fig.axes[0].images) == 3
    N, g = len(kept["x"]), 64 // 16
    for name in ("saliency", "random"):
        shown = np.ma.getdata(images[name].get_array())
        assert shown.shape == (64, N * 64 + (N - 1) * g)
        expected = display_scale(kept["maps"][name]).numpy()
        for j in range(N):
            np.testing.assert_array_equal(shown[:, j * (64 + g): j * (64 + g) + 64], expected[j])
        assert np.isnan(shown[:, 64:64 + g]).all()
        assert images[name].get_cmap().name == ("RdBu_r" if (kept["maps"][name] < 0).any() else "magma")
    rgba = np.asarray(images["input"].get_array())                   # (H, N W + ..., 4)
    x = kept["x"][1].double()
    np.testing.assert_allclose(rgba[:, 64 + g: 2 * 64 + g, :3], ((x - x.min()) / (x.max() - x.min())).permute(1, 2, 0))
    assert (rgba[:, 64 + g: 2 * 64 + g, 3] == 1).all() and (rgba[:, 64:64 + g, 3] == 0).all()
    assert len(fig.axes[0].collections) == 1                         # the masks: one contour over the row
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts[:N] == [f"#{i} {['disk', 'square', 'triangle', 'cross'][i]}" for i in range(N)]   # id and class
    assert texts[N:] == ["input", "saliency", "random"]


def test_the_run_keeps_the_maps_the_report_draws(tiny: SimpleNamespace):
    """The runner stored, under its run's key, one sample per class with every method's map and the MPRT stages:
    the maps are the methods' maps of those samples on the cached model, the grid's similarities the stored scores."""
    path = tiny.root / "shapes" / "small_cnn" / "manifest.json"
    run_ = load_run(path)
    kept = read_report_maps(path, run_.manifest)
    assert kept["sample_id"].tolist() == [0, 1, 2, 3] and kept["target"].tolist() == [0, 1, 2, 3]   # one per class
    data = load_items(run_, torch.arange(4))
    torch.testing.assert_close(kept["x"], data["x"].cpu())
    torch.testing.assert_close(kept["maps"]["saliency"], to_map(saliency(run_.model, data["x"], data["target"]), "abs_sum"))
    grid = kept["grids"]["mprt"]
    assert grid["labels"] == list(SmallCNN.mprt_layers)[::-1] and grid["maps"]["saliency"].shape == (len(SmallCNN.mprt_layers) + 1, 4, 64, 64)
    s = load(tiny.root).scores
    s = s[s.metric.eq("mprt") & s.method.eq("saliency")].set_index(["score", "sample_id"])["value"]
    stored = [[s[f"spearman@{layer}", i] for i in range(4)] for layer in grid["labels"]]
    np.testing.assert_allclose(grid["spearman"]["saliency"].numpy(), stored, rtol=0, atol=1e-6)


def test_a_stale_runs_maps_are_never_drawn(tiny: SimpleNamespace, tmp_path: Path, caplog):
    path = tiny.root / "shapes" / "small_cnn" / "manifest.json"
    manifest = load_run(path).manifest
    assert read_report_maps(path, {**manifest, "report_maps": {**manifest["report_maps"], "key": "0" * 16}}) is None
    assert "of another key" in caplog.text
    assert read_report_maps(path, {k: v for k, v in manifest.items() if k != "report_maps"}) is None
    with pytest.raises(ValueError, match="outside its folder"):
        read_report_maps(path, {**manifest, "report_maps": {"file": "../../x.pt", "key": "k"}})
