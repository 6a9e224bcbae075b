"""Property-based tests (hypothesis) over the metrics: random maps (with ties, constant, all
negative, huge and tiny magnitudes), random masks (empty, full, single pixel) and small random
models never raise, never leave the documented range, and give NaN exactly where documented.
Examples are derandomized, so the suite stays deterministic."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import metrics
from methods import saliency

SETTINGS = settings(derandomize=True, deadline=None, max_examples=50)
MAP_KINDS = ["normal", "ties", "constant", "nonpositive", "huge", "tiny", "one_hot"]
MASK_KINDS = ["random", "empty", "full", "single"]


@st.composite
def maps_and_masks(draw):
    B, H, W = draw(st.integers(1, 3)), draw(st.integers(2, 7)), draw(st.integers(2, 7))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(MAP_KINDS))
    a = torch.randn(B, H, W, generator=g)
    if kind == "ties":
        a = torch.randint(-1, 2, (B, H, W), generator=g).float()
    elif kind == "constant":
        a = torch.full((B, H, W), draw(st.sampled_from([-1.0, 0.0, 2.5])))
    elif kind == "nonpositive":
        a = -a.abs()
    elif kind == "huge":
        a = a * 1e30
    elif kind == "tiny":
        a = a * 1e-30
    elif kind == "one_hot":
        a = torch.zeros(B, H * W).scatter(1, torch.randint(0, H * W, (B, 1), generator=g), 1.0).view(B, H, W)
    mask_kind = draw(st.sampled_from(MASK_KINDS))
    mask = torch.rand(B, H, W, generator=g) < draw(st.floats(0.05, 0.95))
    if mask_kind == "empty":
        mask[:] = False
    elif mask_kind == "full":
        mask[:] = True
    elif mask_kind == "single":
        mask = torch.zeros(B, H * W, dtype=torch.bool).scatter(
            1, torch.randint(0, H * W, (B, 1), generator=g), True).view(B, H, W)
    return a, mask


def _in(v: torch.Tensor, lo: float, hi: float) -> bool:
    v = v[~v.isnan()]
    return bool(((v >= lo - 1e-6) & (v <= hi + 1e-6)).all())


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # e.g. the documented empty-mask warning
        return fn(*args, **kwargs)


@SETTINGS
@given(maps_and_masks())
def test_localization_metrics_stay_in_range_with_nan_only_where_documented(data):
    a, mask = data
    B = a.shape[0]
    m, flat = mask.flatten(1), a.flatten(1)                     # (B, HW)
    empty = ~m.any(dim=1)
    no_positive = ~(flat > 0).any(dim=1)
    cases = {                                                   # metric -> {score: (lo, hi, where NaN)}
        "pointing_game": {"hit": (0, 1, empty)},
        "energy_pointing_game": {"energy": (0, 1, empty | no_positive)},
        "relevance_mass_accuracy": {"rma": (0, 1, empty | no_positive)},
        "relevance_rank_accuracy": {"rra": (0, 1, empty)},
        "attribution_localisation": {"mu": (0, 1, empty | no_positive),
                                     "mu_weighted": (0, float("inf"), empty | no_positive)},
        "iou_at_threshold": {"iou": (0, 1, empty)},
        "localization_auc": {"auc": (0, 1, empty | m.all(dim=1))},
        "top_k_intersection": {"tki": (0, 1, empty)},
    }
    for name, scores in cases.items():
        result = _quiet(getattr(metrics, name), a, mask)
        assert set(result.scores) == set(scores), name
        for score, (lo, hi, nan_where) in scores.items():
            v = result.scores[score]
            assert v.shape == (B,) and _in(v, lo, hi), (name, score, v)
            assert torch.equal(v.isnan(), nan_where), (name, score, v, nan_where)
            assert not v.isinf().any(), (name, score)

    # and the values of three of them from their formulas, computed the slow, obvious way
    rma = _quiet(metrics.relevance_mass_accuracy, a, mask).scores["rma"]
    pos = flat.clamp(min=0).double()
    expected = torch.where(empty | no_positive, torch.nan, (pos * m).sum(1) / pos.sum(1))
    torch.testing.assert_close(rma.double(), expected, equal_nan=True)
    hit = _quiet(metrics.pointing_game, a, mask).scores["hit"]
    is_max = flat == flat.amax(dim=1, keepdim=True)
    torch.testing.assert_close(hit.double(), torch.where(empty, torch.nan, (is_max & m).sum(1) / is_max.sum(1)).double(),
                               equal_nan=True)
    auc = _quiet(metrics.localization_auc, a, mask).scores["auc"]
    for b in range(B):                                          # the oracle loops; the metric does not
        inside, outside = flat[b][m[b]], flat[b][~m[b]]
        if len(inside) and len(outside):
            d = inside[:, None] - outside[None, :]
            oracle = ((d > 0).double().sum() + 0.5 * (d == 0).double().sum()) / d.numel()
            assert abs(float(auc[b]) - float(oracle)) < 1e-6


class _Net(nn.Module):
    """conv -> ReLU -> mean -> linear, with seeded random weights scaled by `gain` (saturating at large gain)."""

    def __init__(self, seed: int, gain: float, classes: int = 3):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.conv, self.relu, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Linear(4, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(gain)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


@st.composite
def model_inputs(draw):
    B, S = draw(st.integers(1, 3)), draw(st.integers(4, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    model = _Net(draw(st.integers(0, 1000)), draw(st.sampled_from([0.0, 1.0, 50.0]))).eval()
    x = torch.randn(B, 3, S, S, generator=g) * draw(st.sampled_from([1.0, 100.0]))
    target = torch.randint(0, 3, (B,), generator=g)
    kind = draw(st.sampled_from(["normal", "ties", "constant"]))
    a = {"normal": torch.randn(B, S, S, generator=g), "ties": torch.randint(0, 2, (B, S, S), generator=g).float(),
         "constant": torch.zeros(B, S, S)}[kind]
    steps = draw(st.integers(1, S * S))
    return model, x, target, a, steps


@settings(derandomize=True, deadline=None, max_examples=15)
@given(model_inputs())
def test_probability_curves_stay_in_range_and_are_never_nan(data):
    """Deletion, insertion and softmax pixel flipping: AUC of probabilities on [0, 1] is in [0, 1],
    AOPC in [-1, 1]; none of them documents a NaN, so none may appear (even for a saturated model)."""
    model, x, target, a, steps = data
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, score, lo, hi, options in [
        ("deletion", "auc", 0, 1, {}), ("insertion", "auc", 0, 1, {}),
        ("pixel_flipping", "auc", 0, 1, {"output": "softmax"}), ("pixel_flipping", "aopc", -1, 1, {"output": "softmax"}),
    ]:
        result = getattr(metrics, name)(model, x, target, a, steps=steps, **options)
        v = result.scores[score]
        assert v.shape == (len(x),) and not v.isnan().any() and _in(v, lo, hi), (name, score, v)
        for curve in result.curves.values():
            # x: the exact fraction of pixels perturbed, from 0 to 1 (README: AUC on [0, 1])
            assert _in(curve.y, 0, 1) and curve.x[0] == 0 and curve.x[-1] == 1 and (curve.x.diff() >= 0).all()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@settings(derandomize=True, deadline=None, max_examples=10)
@given(model_inputs(), st.floats(0.01, 1.0))
def test_road_accuracy_and_removal_budget_properties(data, max_fraction):
    """ROAD's accuracy curves are 0/1 with step 0 the model's own verdict on x, their AUC on [0, 1]; pixel
    flipping under a removal budget stops at ceil(max_fraction n) of n pixels, one budget share per step."""
    model, x, target, a, steps = data
    n = x.shape[-1] * x.shape[-2]
    correct = (model(x).argmax(dim=1) == target).float()
    road = metrics.road(model, x, target, a, steps=min(steps, 5), iterations=20)
    for o in ("morf", "lerf"):
        acc = road.curves[f"acc_{o}"].y
        assert set(acc.unique().tolist()) <= {0.0, 1.0} and torch.equal(acc[:, 0], correct)
        assert _in(road.scores[f"acc_auc_{o}"], 0, 1) and not road.scores[f"acc_auc_{o}"].isnan().any()
    budget = max(1, math.ceil(max_fraction * n - 1e-9))                   # ceil(max_fraction n) pixels
    steps = min(steps, budget)
    pf = metrics.pixel_flipping(model, x, target, a, steps=steps, max_fraction=max_fraction, output="softmax")
    frac = pf.curves["curve"].x
    assert frac[0] == 0 and frac[-1].item() == pytest.approx(budget / n) and (frac.diff() > 0).all()
    assert _in(pf.scores["aopc"], -1, 1) and _in(pf.scores["auc"], 0, budget / n)


@settings(derandomize=True, deadline=None, max_examples=6)
@given(model_inputs())
def test_mprt_spearman_is_a_correlation(data):
    """MPRT's Spearman scores are rank correlations: in [-1, 1], one per layer plus the last."""
    model, x, target, _, _ = data
    result = metrics.mprt(model, x, target, saliency, measures=["spearman"], seed=0)
    layers = [k for k in result.scores if k.startswith("spearman@")]
    assert len(layers) == 2 and set(result.scores) == {"spearman", *layers, "degenerate",
                                                       *(k.replace("spearman", "degenerate") for k in layers)}
    for v in result.scores.values():                # degenerate: 0 or 1
        assert v.shape == (len(x),) and _in(v, -1, 1) and not v.isinf().any()


@pytest.mark.parametrize("k", [1, 3])
def test_range_helper_rejects_out_of_range(k):
    """The range check itself can fail: a value just outside is caught, NaN is left to the NaN check."""
    assert not _in(torch.tensor([0.5, 1.0 + 1e-3 * k]), 0, 1) and _in(torch.tensor([torch.nan, 0.0]), 0, 1)
