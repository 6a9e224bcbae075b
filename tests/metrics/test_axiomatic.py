"""Axiomatic family (completeness, non-sensitivity): hand-computed values, closed forms on linear models,
a slow per-sample oracle, invariances and Hypothesis properties. input_invariance: test_input_invariance.py."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from methods import gradient_x_input, integrated_gradients, saliency
from metrics import completeness, family, non_sensitivity

SETTINGS = settings(derandomize=True, deadline=None, max_examples=30)


class MaskedSum(nn.Module):
    """f_c(x) = (c + 1) * sum of x over the pixels where `mask` is set (all channels): the others are dead."""

    def __init__(self, mask: torch.Tensor, classes: int = 2):
        super().__init__()
        self.register_buffer("mask", mask.float())
        self.scale = nn.Parameter(torch.arange(1.0, classes + 1.0), requires_grad=False)

    def forward(self, x):
        return (x * self.mask).flatten(1).sum(dim=1, keepdim=True) * self.scale


# ---- completeness ---------------------------------------------------------------------------------
def test_completeness_hand_computed(pixel_sum):
    x = torch.tensor([[[[1.0, 2.0]]]])                                      # f_1 = 2 (1 + 2) = 6, f_1(0) = 0
    a = torch.tensor([[[1.0, 1.5]]])                                        # S = 2.5
    r = completeness(pixel_sum, x, torch.tensor([1]), a)
    assert r.scores["gap"].item() == pytest.approx(3.5)
    assert r.scores["rel_gap"].item() == pytest.approx(3.5 / 6)
    assert r.scores["holds"].item() == 0.0
    # target 0: D = 3, gap 0.5; holds within rtol 1/6 but not 1/7
    assert completeness(pixel_sum, x, torch.tensor([0]), a, rtol=1 / 6 + 1e-6).scores["holds"].item() == 1.0
    assert completeness(pixel_sum, x, torch.tensor([0]), a, rtol=1 / 7).scores["holds"].item() == 0.0
    # baseline 1.0: D = 3 - 2 = 1, gap 1.5; "mean" (1.5 per channel): D = 0, so rel_gap is NaN
    assert completeness(pixel_sum, x, torch.tensor([0]), a, baseline=1.0).scores["gap"].item() == pytest.approx(1.5)
    r = completeness(pixel_sum, x, torch.tensor([0]), a, baseline="mean")
    assert r.scores["gap"].item() == pytest.approx(2.5) and r.scores["rel_gap"].isnan().all()
    assert r.higher_is_better == {"gap": False, "rel_gap": False, "holds": True}
    assert family(completeness) == family(non_sensitivity) == "axiomatic"


@pytest.mark.parametrize("baseline", [0.0, 0.7, "mean"])
def test_completeness_closed_form_on_a_linear_model(linear_batch, baseline):
    """IG from the metric's baseline is exact on f = W x + b: S = W (x - x') = f(x) - f(x')."""
    model, x, target = linear_batch
    a = integrated_gradients(model, x, target, baseline=baseline).sum(dim=1)
    r = completeness(model, x, target, a, baseline=baseline)
    assert r.scores["gap"].max().item() < 1e-5 and r.scores["holds"].all()
    if baseline == 0.0:                                                     # gradient x input: IG from 0
        r = completeness(model, x, target, gradient_x_input(model, x, target).sum(dim=1))
        assert r.scores["gap"].max().item() < 1e-5
        s = saliency(model, x, target).sum(dim=1)                          # |gradient| alone: gap |sum |W| - W x|
        w = model.weight[target]
        expected = (w.abs().flatten(1).sum(1) - (w * x).flatten(1).sum(1)).abs()
        torch.testing.assert_close(completeness(model, x, target, s).scores["gap"], expected.detach())


def test_completeness_invariances(tiny_cnn, batch):
    x, target = batch
    a = integrated_gradients(tiny_cnn, x, target).sum(dim=1)
    ref = completeness(tiny_cnn, x, target, a)
    perm = torch.tensor([3, 0, 4, 2, 1])
    state = copy.deepcopy(tiny_cnn.state_dict())
    x0 = x.clone()
    for chunk in (1, 3, 64):
        other = completeness(tiny_cnn, x[perm], target[perm], a[perm], chunk_size=chunk)
        for k, v in ref.scores.items():
            # rel_gap = gap / |D| magnifies float32 rounding by 1/|D| (|D| ~ 2e-4 for one sample here): rtol 1e-3
            torch.testing.assert_close(other.scores[k], v[perm], atol=1e-5, rtol=1e-3 if k == "rel_gap" else 1e-4,
                                       equal_nan=True)
    assert torch.equal(x, x0) and all(torch.equal(v, state[k]) for k, v in tiny_cnn.state_dict().items())
    assert ref.scores["gap"].dtype == x.dtype
    with torch.no_grad():                                                   # D = f(x) - f(0), computed here
        delta = (tiny_cnn(x) - tiny_cnn(torch.zeros_like(x))).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(ref.scores["gap"], (a.flatten(1).sum(1) - delta).abs(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ref.scores["holds"], (ref.scores["gap"] <= 1e-5 + 0.05 * delta.abs()).float())


@pytest.mark.parametrize("options, match", [({"rtol": -0.1}, "rtol"), ({"atol": float("nan")}, "atol"),
                                            ({"output": "prob"}, "output"), ({"baseline": "black"}, "image_min"),
                                            ({"baseline": "grey"}, "baseline"), ({"seed": -1}, "seed"),
                                            ({"chunk_size": 0}, "chunk_size")])
def test_completeness_bad_options(tiny_cnn, batch, options, match):
    x, target = batch
    with pytest.raises(ValueError, match=match):
        completeness(tiny_cnn, x, target, torch.zeros(5, 8, 8), **options)
    with pytest.raises(ValueError, match="shape"):
        completeness(tiny_cnn, x, target, torch.zeros(5, 3, 8, 8))


# ---- non-sensitivity ------------------------------------------------------------------------------
def test_non_sensitivity_hand_computed():
    model = MaskedSum(torch.tensor([[1, 0], [0, 1]])).eval()              # reads pixels 0 and 3 only
    x = torch.tensor([[[[2.0, 5.0], [-1.0, 3.0]]]])
    a = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # Z_a = {1, 2, 3}, Z_f = {1, 2}: xor {3}
    assert non_sensitivity(model, x, torch.tensor([0]), a).scores["violations"].item() == 1
    # pixel 0 at the baseline value (2.0): setting it changes nothing, so Z_f = {0, 1, 2}: xor {0, 3}
    assert non_sensitivity(model, x, torch.tensor([0]), a, baseline=2.0).scores["violations"].item() == 2
    # a map that marks exactly the pixels the model reads: no violation; its negation: all four
    good = torch.tensor([[[0.3, 0.0], [0.0, -2.0]]])
    assert non_sensitivity(model, x, torch.tensor([1]), good).scores["violations"].item() == 0
    assert non_sensitivity(model, x, torch.tensor([1]), (good == 0).float()).scores["violations"].item() == 4
    # eps relative to the map's max (2): 0.3 <= 0.2 * 2, so pixel 0 becomes unattributed; absolute eps 0.2: not
    assert non_sensitivity(model, x, torch.tensor([1]), good, eps=0.2).scores["violations"].item() == 1
    assert non_sensitivity(model, x, torch.tensor([1]), good, eps=0.2, relative=False).scores["violations"].item() == 0
    # one 2 x 2 patch: attributed and read, no violation
    assert non_sensitivity(model, x, torch.tensor([0]), a, patch=2).scores["violations"].item() == 0
    r = non_sensitivity(model, x, torch.tensor([0]), a)
    assert r.higher_is_better == {"violations": False}


def test_non_sensitivity_closed_form_on_a_linear_model(linear_batch):
    """On f = W x + b with baseline 0, setting pixel p to 0 moves f by exactly sum_c W_c x_c at p, the signed
    gradient x input map: thresholding both at the same absolute eps finds the same set, 0 violations."""
    model, x, target = linear_batch
    x = torch.where(torch.rand(x.shape[0], 1, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.3, 0.0, x)
    a = gradient_x_input(model, x, target).sum(dim=1)                      # exact zeros where x is 0
    for eps in (1e-4, 0.3, 1.0):
        r = non_sensitivity(model, x, target, a, eps=eps, tolerance=eps, relative=False)
        pos = (a.abs() - eps).abs().flatten(1).amin(dim=1) > 1e-4          # no pixel at the threshold itself
        assert r.scores["violations"][pos].eq(0).all(), (eps, r.scores)


def _oracle(model, x, target, a, *, eps, tolerance, patch, baseline):
    """Per sample, per unit: the definition as loops (baseline a constant)."""
    B, C, H, W = x.shape
    out = []
    for b in range(B):
        f0 = model(x[b:b + 1])[0, target[b]].item()
        top = a[b].abs().max().item()
        count = 0
        for i in range(0, H, patch):
            for j in range(0, W, patch):
                z = x[b:b + 1].clone()
                z[..., i:i + patch, j:j + patch] = baseline
                unattributed = a[b, i:i + patch, j:j + patch].abs().max().item() <= eps * top
                insensitive = abs(model(z)[0, target[b]].item() - f0) <= tolerance
                count += unattributed != insensitive
        out.append(count)
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("patch", [1, 3])
def test_non_sensitivity_matches_slow_oracle(patch):
    mask = torch.zeros(8, 8)
    mask[2:6, 1:7] = 1
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(MaskedSum(mask, classes=3), nn.Tanh(), nn.Linear(3, 3)).eval()
    g = torch.Generator().manual_seed(patch)
    x = torch.randn(4, 3, 8, 8, generator=g)
    a = torch.randn(4, 8, 8, generator=g) * (torch.rand(4, 8, 8, generator=g) < 0.5)
    target = torch.tensor([0, 2, 1, 0])
    ours = non_sensitivity(model, x, target, a, eps=0.05, tolerance=1e-4, patch=patch, baseline=0.5)
    with torch.no_grad():
        expected = _oracle(model, x, target, a, eps=0.05, tolerance=1e-4, patch=patch, baseline=0.5)
    torch.testing.assert_close(ours.scores["violations"], expected)


def test_non_sensitivity_invariances(tiny_cnn, batch):
    x, target = batch
    a = saliency(tiny_cnn, x, target).abs().sum(dim=1)
    a = a * (a > a.flatten(1).median(dim=1).values.view(-1, 1, 1))        # half the pixels unattributed
    state = copy.deepcopy(tiny_cnn.state_dict())
    x0 = x.clone()
    ref = non_sensitivity(tiny_cnn, x, target, a, baseline="uniform", seed=3, tolerance=1e-3)
    perm = torch.tensor([4, 2, 0, 1, 3])
    for chunk in (1, 7, None):
        other = non_sensitivity(tiny_cnn, x[perm], target[perm], a[perm], baseline="uniform", seed=3,
                                tolerance=1e-3, chunk_size=chunk)
        torch.testing.assert_close(other.scores["violations"], ref.scores["violations"][perm])
    alone = non_sensitivity(tiny_cnn, x[2:3], target[2:3], a[2:3], baseline="uniform", seed=3, tolerance=1e-3)
    torch.testing.assert_close(alone.scores["violations"], ref.scores["violations"][2:3])
    torch.testing.assert_close(non_sensitivity(tiny_cnn, x, target, 5 * a, baseline="uniform", seed=3,
                                               tolerance=1e-3).scores["violations"], ref.scores["violations"])
    assert torch.equal(x, x0) and all(torch.equal(v, state[k]) for k, v in tiny_cnn.state_dict().items())


@pytest.mark.parametrize("options, match", [({"eps": -1.0}, "eps"), ({"tolerance": "0"}, "tolerance"),
                                            ({"relative": "yes"}, "relative"), ({"patch": 9}, "patch"),
                                            ({"patch": 0}, "patch"), ({"output": "p"}, "output"),
                                            ({"baseline": "zeros"}, "0.0")])
def test_non_sensitivity_bad_options(tiny_cnn, batch, options, match):
    x, target = batch
    with pytest.raises(ValueError, match=match):
        non_sensitivity(tiny_cnn, x, target, torch.zeros(5, 8, 8), **options)


# ---- properties ---------------------------------------------------------------------------------
@st.composite
def cases(draw):
    B, H, W = draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.integers(2, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "zero", "constant", "sparse", "huge", "tiny"]))
    a = torch.randn(B, H, W, generator=g)
    if kind == "zero":
        a = torch.zeros(B, H, W)
    elif kind == "constant":
        a = torch.full((B, H, W), -1.5)
    elif kind == "sparse":
        a = a * (torch.rand(B, H, W, generator=g) < 0.3)
    elif kind in ("huge", "tiny"):
        a = a * (1e30 if kind == "huge" else 1e-30)
    mask = torch.rand(H, W, generator=g) < draw(st.floats(0.0, 1.0))
    x = torch.randn(B, 2, H, W, generator=g)
    return MaskedSum(mask).eval(), x, torch.randint(0, 2, (B,), generator=g), a, kind, draw(st.integers(1, 2))


@SETTINGS
@given(cases())
def test_properties(case):
    model, x, target, a, kind, patch = case
    B, _, H, W = x.shape
    units = -(-H // patch) * -(-W // patch)
    v = non_sensitivity(model, x, target, a, patch=patch).scores["violations"]
    assert v.shape == (B,) and not v.isnan().any() and torch.equal(v, v.round())
    assert bool(((v >= 0) & (v <= units)).all())
    # a unit is read iff any of its pixels is in the mask (x is continuous: no pixel sits at the baseline)
    read = torch.nn.functional.max_pool2d(model.mask[None, None], patch, ceil_mode=True).flatten().bool()
    if kind == "zero":                                          # everything unattributed: violations = units read
        assert v.eq(read.sum()).all()
    if kind == "constant":                                      # everything attributed: violations = units not read
        assert v.eq((~read).sum()).all()
    r = completeness(model, x, target, a)
    delta = ((target + 1) * (x * model.mask).flatten(1).sum(1)).double()
    gap = (a.double().flatten(1).sum(1) - delta).abs()
    torch.testing.assert_close(r.scores["gap"].double(), gap, rtol=1e-5, atol=1e-5 * (1 + gap.max().item()))
    assert torch.equal(r.scores["rel_gap"].isnan(), delta.float() == 0)
    assert set(r.scores["holds"].tolist()) <= {0.0, 1.0}
