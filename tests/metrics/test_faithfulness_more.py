"""Faithfulness estimate, monotonicity, monotonicity correlation, sensitivity-n, sufficiency, IROF and
selectivity: hand-computed values, closed forms on linear models, invariances, errors and properties."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist
from torch import nn

from bench.config import CONF, derive_seeds
from bench.provenance import without_meta
from metrics import (faithfulness_estimate, irof, monotonicity, monotonicity_correlation, pixel_flipping,
                     sensitivity_n, sufficiency)

NEW = [faithfulness_estimate, monotonicity, monotonicity_correlation, sensitivity_n, irof]
X4 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])                                   # (1, 1, 2, 2)
T0 = torch.tensor([0])


class Logits(nn.Module):
    """Logits are the first `classes` input values: predictions are set by the input."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        return x.flatten(1)[:, :self.classes]


def _gxi(model, x, target):
    """Gradient x input, channel-summed: the exact contribution of each pixel to a linear model's output."""
    w = model.weight[target]                                                        # (B, C, H, W)
    return (w * x).sum(dim=1)


def _segments(B, H, W, block=2):
    """A grid of block x block superpixels, the same for every image."""
    r = torch.arange(H)[:, None] // block * math.ceil(W / block) + torch.arange(W)[None] // block
    return r.expand(B, H, W).clone()


# ------------------------------------------------------------------ hand-computed values

def test_faithfulness_estimate_by_hand(pixel_sum):
    # each pixel removed alone (baseline 0): the drops are the pixel values 1, 2, 3, 4
    a = torch.tensor([[[1.0, 2.0], [3.0, 5.0]]])
    r = faithfulness_estimate(pixel_sum, X4, T0, a).scores["pearson"]
    torch.testing.assert_close(r, torch.tensor([6.5 / math.sqrt(43.75)]))
    # two groups, most relevant first: {5, 3} -> (a 8, drop 7), {2, 1} -> (3, 3): r = 1
    torch.testing.assert_close(faithfulness_estimate(pixel_sum, X4, T0, a, steps=2).scores["pearson"],
                               torch.tensor([1.0]))


def test_monotonicity_by_hand(pixel_sum):
    x = torch.tensor([[[[1.0, -2.0], [3.0, 4.0]]]])
    # the -2 pixel restored first: outputs -2, -1, 2, 6 (the all-baseline 0 is not compared, AIX360)
    r = monotonicity(pixel_sum, x, T0, torch.tensor([[[1.0, 0.0], [2.0, 3.0]]]), output="logit")
    assert r.scores["monotonic"].tolist() == [1.0]
    torch.testing.assert_close(r.curves["curve"].y, torch.tensor([[0.0, -2.0, -1.0, 2.0, 6.0]]))
    # the 1 pixel first: 1, -1, 2, 6 falls once
    r = monotonicity(pixel_sum, x, T0, torch.tensor([[[0.0, 1.0], [2.0, 3.0]]]), output="logit")
    assert r.scores["monotonic"].tolist() == [0.0]


def test_monotonicity_correlation_by_hand(pixel_sum):
    # baseline 0, one draw: v_i = x_i^2 = 1, 4, 9, 16; |a| = 1, 1, 3, 2 ranks 1.5, 1.5, 4, 3
    x = torch.tensor([[[[1.0, -2.0], [3.0, 4.0]]]])
    a = torch.tensor([[[1.0, -1.0], [3.0, 2.0]]])
    r = monotonicity_correlation(pixel_sum, x, T0, a, steps=None, samples=1, baseline=0.0, output="logit")
    torch.testing.assert_close(r.scores["spearman"], torch.tensor([3.5 / math.sqrt(22.5)]))


def test_sensitivity_n_by_hand(pixel_sum):
    # two pixels (x 1, 3; a 2, 1): n = 1 subsets are one pixel or the other, r = -1; n = 2 always both: NaN
    x, a = torch.tensor([[[[1.0, 3.0]]]]), torch.tensor([[[2.0, 1.0]]])
    r = sensitivity_n(pixel_sum, x, T0, a, sizes=2, max_fraction=1.0)
    torch.testing.assert_close(r.curves["curve"].y, torch.tensor([[-1.0, math.nan]]), equal_nan=True)
    torch.testing.assert_close(r.curves["curve"].x, torch.tensor([0.5, 1.0]))
    assert r.scores["pearson"].tolist() == [-1.0]


def test_sufficiency_by_hand():
    # maps 0, 1 close and 2, 3 close (distance 1 of at most 14.9); predictions 0, 0, 1, 0
    a = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 10.0], [10.0, 11.0]]).view(4, 1, 2)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]).view(4, 1, 1, 2)
    target = torch.zeros(4, dtype=torch.long)
    for distance in ("euclidean", "seuclidean"):
        r = sufficiency(Logits(), x, target, a, distance=distance).scores["sufficiency"]
        assert r.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert sufficiency(Logits(), x, target, a, threshold=0.0).scores["sufficiency"].isnan().all()
    assert sufficiency(Logits(), x[:1], target[:1], a[:1]).scores["sufficiency"].isnan().all()   # no other map


def test_sufficiency_distances_are_scipys():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(7, 3, 4, generator=g, dtype=torch.float64)
    x = torch.randn(7, 1, 3, 4, generator=g)
    target = torch.zeros(7, dtype=torch.long)
    pred = x.flatten(1)[:, :2].argmax(dim=1).numpy()                                 # Logits' classes
    for name in ("euclidean", "seuclidean"):
        d = cdist(a.view(7, -1).numpy(), a.view(7, -1).numpy(), name)
        d = d / d.max()
        for threshold in (0.3, 0.6, 0.9):
            near = (d <= threshold) & ~np.eye(7, dtype=bool)
            expected = np.array([(pred[near[i]] == pred[i]).mean() if near[i].any() else np.nan for i in range(7)])
            got = sufficiency(Logits(), x, target, a.float(), threshold=threshold, distance=name)
            np.testing.assert_allclose(got.scores["sufficiency"].numpy(), expected, rtol=1e-6)


def test_irof_by_hand(pixel_sum):
    # segments: top row (sum 3), bottom row (sum 7, more relevant): outputs 10, 3, 0 -> r 1, 0.3, 0
    a, seg = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]), torch.tensor([[[0, 0], [1, 1]]])
    r = irof(pixel_sum, X4, T0, a, segments=seg, baseline=0.0, output="logit").scores["irof"]
    torch.testing.assert_close(r, torch.tensor([1 - (0.65 + 0.15) / 2]))
    # labels need not be 0..K-1: any integers, per image
    torch.testing.assert_close(irof(pixel_sum, X4, T0, a, segments=seg * 7 - 3, baseline=0.0, output="logit")
                               .scores["irof"], r)


def test_selectivity_config_is_region_perturbation_one_patch_per_step(tiny_cnn, batch):
    x, target = batch
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = derive_seeds(compose("config", overrides=["metric=[selectivity]"]))
    metric = instantiate(without_meta(cfg.metric.selectivity))              # less _headline_
    a = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(0))
    r = metric(tiny_cnn, x, target, a)
    reference = pixel_flipping(tiny_cnn, x, target, a, steps=4, patch=4, order="morf", baseline="image_min")
    assert r.curves["curve"].y.shape == (5, 5)                                      # f_0 and 4 patches of 8 x 8
    torch.testing.assert_close(r.scores["auc"], reference.scores["auc"])
    assert r.higher_is_better["auc"] is False


# ------------------------------------------------------------------ closed forms on linear models

def test_linear_model_gradient_x_input_is_exact(linear_batch):
    model, x, target = linear_batch
    a = _gxi(model, x, target)
    for steps in (None, 5):
        torch.testing.assert_close(faithfulness_estimate(model, x, target, a, steps=steps).scores["pearson"],
                                   torch.ones(4))
    r = sensitivity_n(model, x, target, a, sizes=4, subsets=16)
    torch.testing.assert_close(r.curves["curve"].y, torch.ones(4, 4))
    # the opposite map is exactly anti-faithful
    torch.testing.assert_close(faithfulness_estimate(model, x, target, -a).scores["pearson"], -torch.ones(4))


def test_monotonicity_of_a_linear_model_with_nonnegative_contributions(linear_batch):
    model, x, target = linear_batch
    x = model.weight[target].sign() * x.abs()                                       # every w_i x_i >= 0
    a = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(2))            # any order
    assert monotonicity(model, x, target, a, output="logit").scores["monotonic"].tolist() == [1.0] * 4


def _reference_groups(a, steps, descending):
    """Pixel groups straight from the definition: sort (continuous map, no ties), group k holds the
    pixels ranked ceil((k - 1) n / steps) .. ceil(k n / steps) - 1."""
    order = sorted(range(a.numel()), key=lambda i: -a.flatten()[i].item() if descending else a.flatten()[i].item())
    n = len(order)
    return [order[math.ceil((k - 1) * n / steps):math.ceil(k * n / steps)] for k in range(1, steps + 1)]


def _output(model, x, t):
    with torch.no_grad():
        return model(x[None])[0, t].item()


@pytest.mark.parametrize("steps", [5, 7, 16])
def test_against_per_sample_reference_loops(tiny_cnn, batch, steps):
    """Uneven groups (16 pixels in 5 or 7 groups): each metric against a slow loop over samples and groups."""
    x, target = batch
    x = x[:, :, :4, :4].contiguous()
    a = torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(steps))
    fe = faithfulness_estimate(tiny_cnn, x, target, a, steps=steps).scores["pearson"]
    mono = monotonicity(tiny_cnn, x, target, a, steps=steps, output="logit").curves["curve"].y
    mc = monotonicity_correlation(tiny_cnn, x, target, a, steps=steps, samples=1, baseline=0.0,
                                  output="logit").scores["spearman"]
    for b in range(5):
        f0, drops, sums, curve, var, abs_sums = _output(tiny_cnn, x[b], target[b]), [], [], [], [], []
        for group in _reference_groups(a[b], steps, descending=True):
            keep = torch.ones(16, dtype=torch.bool)
            keep[group] = False
            drops.append(f0 - _output(tiny_cnn, torch.where(keep.view(1, 4, 4), x[b], 0.0), target[b]))
            sums.append(a[b].flatten()[group].sum().item())
        restored = torch.zeros(16, dtype=torch.bool)
        for group in _reference_groups(a[b], steps, descending=False):
            restored[group] = True
            curve.append(_output(tiny_cnn, torch.where(restored.view(1, 4, 4), x[b], 0.0), target[b]))
        for group in _reference_groups(a[b].abs(), steps, descending=False):
            keep = torch.ones(16, dtype=torch.bool)
            keep[group] = False
            var.append((f0 - _output(tiny_cnn, torch.where(keep.view(1, 4, 4), x[b], 0.0), target[b])) ** 2)
            abs_sums.append(a[b].abs().flatten()[group].sum().item())
        assert fe[b].item() == pytest.approx(np.corrcoef(sums, drops)[0, 1], abs=1e-5)
        np.testing.assert_allclose(mono[b, 1:].numpy(), curve, atol=1e-5)
        rank = lambda v: np.argsort(np.argsort(v))
        assert mc[b].item() == pytest.approx(np.corrcoef(rank(abs_sums), rank(var))[0, 1], abs=1e-5)


# ------------------------------------------------------------------ invariances

@pytest.mark.parametrize("metric", NEW, ids=lambda f: f.__name__)
def test_batch_order_chunks_scale_and_purity(metric, tiny_cnn, batch):
    x, target = batch
    a = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = {irof: {"segments": _segments(5, 8, 8)}, monotonicity_correlation: {"steps": 16, "samples": 3},
          sensitivity_n: {"sizes": 4, "subsets": 8}, faithfulness_estimate: {"steps": 32},
          monotonicity: {"steps": 32}}[metric]
    x0, a0 = x.clone(), a.clone()
    state = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    r = metric(tiny_cnn, x, target, a, **kw).scores
    assert torch.equal(x, x0) and torch.equal(a, a0)
    assert all(torch.equal(v, state[k]) for k, v in tiny_cnn.state_dict().items())
    for chunk_size in (3, 7):
        s = metric(tiny_cnn, x, target, a, chunk_size=chunk_size, **kw).scores
        for k in r:
            torch.testing.assert_close(s[k], r[k], equal_nan=True, atol=1e-5, rtol=1e-5)
    perm = torch.tensor([3, 0, 4, 2])                                               # reordered and smaller batch
    kw_p = {"segments": kw["segments"][perm]} if metric is irof else kw
    s = metric(tiny_cnn, x[perm], target[perm], a[perm], **kw_p).scores
    for k in r:
        torch.testing.assert_close(s[k], r[k][perm], equal_nan=True, atol=1e-5, rtol=1e-5)
    s = metric(tiny_cnn, x, target, a * 1e3, **kw).scores                          # a positive rescaling
    for k in r:
        torch.testing.assert_close(s[k], r[k], equal_nan=True, atol=1e-5, rtol=1e-4)


def test_sufficiency_permutes_with_its_batch(tiny_cnn, batch):
    x, target = batch
    a = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(1))
    a[3] = a[0] + 0.01
    a[4] = a[1] - 0.01
    r = sufficiency(tiny_cnn, x, target, a, threshold=0.3).scores["sufficiency"]
    assert (~r.isnan()).sum() == 4
    perm = torch.tensor([4, 2, 0, 1, 3])
    torch.testing.assert_close(sufficiency(tiny_cnn, x[perm], target[perm], a[perm], threshold=0.3)
                               .scores["sufficiency"], r[perm], equal_nan=True)


def test_irof_segments_by_slic(tiny_cnn, batch):
    from skimage.segmentation import slic

    from metrics import slic_segments

    x, target = batch
    seg = slic_segments(x, n_segments=10)
    assert seg.shape == (5, 8, 8) and seg.dtype == torch.long
    np.testing.assert_array_equal(seg[2].numpy(), slic(np.moveaxis(x[2].double().numpy(), 0, -1), n_segments=10,
                                                        start_label=0))
    a = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(irof(tiny_cnn, x, target, a, n_segments=10).scores["irof"],
                               irof(tiny_cnn, x, target, a, segments=seg).scores["irof"])


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("call, match", [
    (lambda m, x, t, a: faithfulness_estimate(m, x, t, a, steps=1), "steps must be between 2"),
    (lambda m, x, t, a: monotonicity(m, x, t, a, steps=65), "steps must be between 2 and the number of pixels"),
    (lambda m, x, t, a: monotonicity_correlation(m, x, t, a, samples=0), "samples must be >= 1"),
    (lambda m, x, t, a: sensitivity_n(m, x, t, a, subsets=1), "subsets must be >= 2"),
    (lambda m, x, t, a: sensitivity_n(m, x, t, a, sizes=60, max_fraction=0.5), "sizes must be between 1"),
    (lambda m, x, t, a: sufficiency(m, x, t, a, distance="cosine"), "distance must be 'seuclidean' or"),
    (lambda m, x, t, a: sufficiency(m, x, t, a, threshold=1.5), "threshold must be between 0 and 1"),
    (lambda m, x, t, a: irof(m, x, t, a, segments=torch.zeros(5, 8, 8)), "segments must be an integer tensor"),
    (lambda m, x, t, a: irof(m, x, t, a, n_segments=1), "n_segments must be >= 2"),
    (lambda m, x, t, a: faithfulness_estimate(m, x, t, a[:, :4]), "attribution must be a channel-reduced map"),
])
def test_bad_input_is_a_clear_value_error(tiny_cnn, batch, call, match):
    x, target = batch
    with pytest.raises(ValueError, match=match):
        call(tiny_cnn, x, target, torch.rand(5, 8, 8))


# ------------------------------------------------------------------ properties (hypothesis)

@st.composite
def _maps(draw):
    B, H, W = draw(st.integers(1, 3)), draw(st.integers(2, 5)), draw(st.integers(2, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "ties", "constant", "huge", "tiny"]))
    a = {"normal": lambda: torch.randn(B, H, W, generator=g),
         "ties": lambda: torch.randint(-1, 2, (B, H, W), generator=g).float(),
         "constant": lambda: torch.full((B, H, W), draw(st.sampled_from([-1.0, 0.0, 2.5]))),
         "huge": lambda: torch.randn(B, H, W, generator=g) * 1e30,
         "tiny": lambda: torch.randn(B, H, W, generator=g) * 1e-30}[kind]()
    return torch.randn(B, 3, H, W, generator=g), a, kind


def _in(v, lo, hi):
    v = v[~v.isnan()]
    return bool(((v >= lo - 1e-5) & (v <= hi + 1e-5)).all())


@settings(derandomize=True, deadline=None, max_examples=40)
@given(_maps())
def test_properties_range_and_nan_policy(data):
    x, a, kind = data
    B, H, W = a.shape
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    target = torch.arange(B) % 3
    constant = kind == "constant"
    fe = faithfulness_estimate(model, x, target, a).scores["pearson"]
    assert _in(fe, -1, 1) and (not constant or fe.isnan().all())
    mono = monotonicity(model, x, target, a).scores["monotonic"]
    assert set(mono.tolist()) <= {0.0, 1.0}                                         # never NaN
    mc = monotonicity_correlation(model, x, target, a, steps=None, samples=2).scores["spearman"]
    assert _in(mc, -1, 1) and (not constant or mc.isnan().all())
    sn = sensitivity_n(model, x, target, a, sizes=2, subsets=4).scores["pearson"]
    assert _in(sn, -1, 1) and (not constant or sn.isnan().all())
    ir = irof(model, x, target, a, segments=_segments(B, H, W)).scores["irof"]
    assert not ir.isnan().any() and _in(ir, -math.inf, 1)                           # softmax: r >= 0, area >= 0
    su = sufficiency(model, x, target, a).scores["sufficiency"]
    assert _in(su, 0, 1) and (B > 1 or su.isnan().all())
    if constant:                                                                   # all maps equal: all neighbours
        assert B == 1 or not su.isnan().any()
