"""Focus (Arias-Duart et al. 2022): hand values, the formula, properties, errors, and per-sample agreement
with Quantus 0.6's Focus on the same maps and quadrant layouts.

Differences of convention with Quantus (pinned below): a map without positive relevance gives NaN here
and 0 there (Quantus adds 1e-9 to the denominator); Quantus takes the layout as one (top-left,
top-right, bottom-left, bottom-right) 0/1 tuple per sample, we take it as the mask of those quadrants
and refuse a mask that is not one; Quantus normalises maps by default (normalise=True, here off: Focus
is a ratio, so a positive rescaling changes nothing anyway).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from metrics import focus

SETTINGS = settings(derandomize=True, deadline=None, max_examples=60)


def _layout_mask(layout: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, 4) 0/1 in Quantus' order (tl, tr, bl, br) -> (B, H, W) bool quadrant mask."""
    q = layout.bool().view(-1, 2, 2)                                     # (B, row, column)
    return q.repeat_interleave(H // 2, dim=1).repeat_interleave(W // 2, dim=2)


def _data(seed: int, B: int = 12, H: int = 16, W: int = 10, *, signed: bool = True):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, H, W, generator=g) if signed else torch.rand(B, H, W, generator=g)
    layout = torch.stack([torch.randperm(4, generator=g) < 2 for _ in range(B)]).long()   # 2 of 4, as the paper
    return a, layout, _layout_mask(layout, H, W)


def test_hand_value():
    # 4x4 mosaic, quadrants of 2x2 pixels; target quadrants: top-left and bottom-right
    a = torch.tensor([[[1., 2., 0., 0.],
                       [0., 1., 3., -5.],
                       [-2., 0., 0., 1.],
                       [0., 1., 0., 1.]]])
    mask = _layout_mask(torch.tensor([[1, 0, 0, 1]]), 4, 4)
    # positive relevance: tl 1+2+1 = 4, tr 3, bl 1, br 1+1 = 2; total 10; target 4 + 2 = 6
    assert focus(a, mask).scores["focus"].item() == pytest.approx(0.6)
    # absolute: tl 4, tr 8, bl 3, br 2; total 17; target 6
    assert focus(a, mask, sign="absolute").scores["focus"].item() == pytest.approx(6 / 17)
    assert focus(a, mask, sign="positive").scores["focus"].item() == pytest.approx(0.6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_formula_batch_order_and_scale(seed):
    a, _, mask = _data(seed)
    pos = a.clamp(min=0).double()
    expected = (pos * mask).flatten(1).sum(1) / pos.flatten(1).sum(1)
    out = focus(a, mask).scores["focus"]
    torch.testing.assert_close(out.double(), expected)
    perm = torch.randperm(len(a), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(focus(a[perm], mask[perm]).scores["focus"], out[perm])   # per sample, order-free
    torch.testing.assert_close(focus(7.5 * a, mask).scores["focus"], out)               # a ratio: scale-free
    assert focus(a, ~mask).scores["focus"].add(out).sub(1).abs().max() < 1e-6           # complement: 1 - focus


def test_nan_policy_and_chance():
    mask = _layout_mask(torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]), 4, 6)
    const = torch.full((3, 4, 6), 2.0)
    with pytest.warns(UserWarning, match="1 of 3 mosaics have no target quadrant"):
        out = focus(const, mask).scores["focus"]
    # a constant positive map scores chance: the target quadrants' share of the mosaic; no target: NaN
    assert out[:2].tolist() == [0.5, 0.25] and out[2].isnan()
    none = focus(-const[:2], mask[:2]).scores["focus"]                    # no positive relevance: NaN
    assert none.isnan().all()
    assert focus(torch.zeros(2, 4, 6), mask[:2]).scores["focus"].isnan().all()


def test_bad_input_is_refused():
    a, _, mask = _data(0, B=2, H=8, W=8)
    blob = torch.zeros(2, 8, 8, dtype=torch.bool)
    blob[:, 2:6, 2:6] = True                                              # an object mask, not quadrants
    with pytest.raises(ValueError, match="sample 0 has a quadrant partly inside the mask.*dataset=shapes_mosaic"):
        focus(a, blob)
    with pytest.raises(ValueError, match="H and W must be even"):
        focus(a[:, :7], mask[:, :7])
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        focus(a, mask.float())
    with pytest.raises(ValueError, match=r"must both have shape \(B, H, W\)"):
        focus(a[:, None], mask)
    with pytest.raises(ValueError, match="sign must be"):
        focus(a, mask, sign="abs")
    with pytest.raises(ValueError, match="attribution contains NaN or Inf"):
        focus(a.index_put((torch.tensor([0]), torch.tensor([0]), torch.tensor([0])), torch.tensor(torch.nan)), mask)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**31 - 1),
       st.sampled_from(["normal", "ties", "constant", "nonpositive", "huge", "tiny"]))
def test_properties(B, h, w, seed, kind):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, 2 * h, 2 * w, generator=g)
    a = {"ties": torch.randint(-1, 2, a.shape, generator=g).float(), "constant": torch.full_like(a, 1.5),
         "nonpositive": -a.abs(), "huge": a * 1e30, "tiny": a * 1e-30}.get(kind, a)
    layout = torch.randint(0, 2, (B, 4), generator=g)
    mask = _layout_mask(layout, 2 * h, 2 * w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = focus(a, mask).scores["focus"]
    undefined = ~(a.flatten(1) > 0).any(1) | (layout.sum(1) == 0)
    assert out.shape == (B,) and torch.equal(out.isnan(), undefined)
    v = out[~undefined]
    assert ((v >= 0) & (v <= 1 + 1e-6)).all()
    assert (v[layout[~undefined].sum(1) == 4] == 1).all()                  # every quadrant a target: 1


quantus = pytest.importorskip("quantus")


def _quantus(a: torch.Tensor, layout: torch.Tensor, **options) -> np.ndarray:
    """Quantus' Focus on precomputed maps; it asserts a model, which it never calls on a_batch."""
    B, H, W = a.shape
    metric = quantus.Focus(normalise=False, disable_warnings=True, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = metric(model=nn.Sequential(nn.Flatten(), nn.Linear(3 * H * W, 2)),
                     x_batch=np.zeros((B, 3, H, W), dtype=np.float32), y_batch=np.zeros(B, dtype=int),
                     a_batch=a[:, None].numpy(), custom_batch=[tuple(r) for r in layout.tolist()], channel_first=True)
    return np.asarray(out, dtype=np.float64)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("signed", [False, True])
def test_agrees_with_quantus_per_sample(seed, signed):
    a, layout, mask = _data(seed, signed=signed)
    np.testing.assert_allclose(focus(a, mask).scores["focus"].double().numpy(), _quantus(a, layout),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(focus(a, mask, sign="absolute").scores["focus"].double().numpy(),
                               _quantus(a, layout, abs=True), rtol=1e-5, atol=1e-6)


def test_documented_difference_no_positive_relevance():
    a, layout, mask = _data(3, B=2)
    a[0] = -a[0].abs()                                                    # Quantus refuses an all-negative batch
    ours, theirs = focus(a, mask).scores["focus"], _quantus(a, layout)
    assert ours[0].isnan() and theirs[0] == 0.0                           # undefined ratio: NaN here, 0 / (0 + 1e-9) there
    assert ours[1].item() == pytest.approx(theirs[1], rel=1e-5)
