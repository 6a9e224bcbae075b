"""Complexity family: hand-computed values, closed forms, a slow oracle from an independent formula,
invariances and Hypothesis properties (range, direction, NaN policy on constant and all-zero maps)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metrics import complexity, effective_complexity, family, sparseness

SETTINGS = settings(derandomize=True, deadline=None, max_examples=60)


def _gini_pairs(a: np.ndarray) -> float:
    """Gini from its pairwise definition: sum_ij |a_i - a_j| / (2 n sum_i a_i), slow and independent."""
    a = np.abs(a.ravel()).astype(np.float64)
    return float(np.abs(a[:, None] - a[None, :]).sum() / (2 * a.size * a.sum()))


def _entropy(a: np.ndarray) -> float:
    p = np.abs(a.ravel()).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def test_hand_computed_values():
    # |a| = [0, 1, 2, 3], n = 4: G = ((-3)0 + (-1)1 + (1)2 + (3)3) / (4 * 6) = 10 / 24
    a = torch.tensor([[[3.0, -1.0], [0.0, 2.0]]])
    assert sparseness(a).scores["gini"].item() == pytest.approx(10 / 24)
    # P = [1/2, 1/3, 1/6, 0]: entropy = (1/2) ln 2 + (1/3) ln 3 + (1/6) ln 6
    a = torch.tensor([[[3.0, -2.0], [1.0, 0.0]]])
    expected = 0.5 * math.log(2) + math.log(3) / 3 + math.log(6) / 6
    assert complexity(a).scores["entropy"].item() == pytest.approx(expected)
    # |a| / max = [1, 2/3, 1/3, 0]: above 0.5 -> 2, above 0.2 -> 3; absolute: above 1.5 -> 2
    assert effective_complexity(a, eps=0.5).scores["count"].item() == 2
    assert effective_complexity(a, eps=0.2).scores["count"].item() == 3
    assert effective_complexity(a, eps=1.5, relative=False).scores["count"].item() == 2


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_closed_forms(n):
    one_hot = torch.zeros(1, 1, n)
    one_hot[0, 0, n // 2] = -5.0
    constant = torch.full((1, 1, n), 0.3)
    assert sparseness(one_hot).scores["gini"].item() == pytest.approx(1 - 1 / n, rel=1e-6)
    assert sparseness(constant).scores["gini"].item() == pytest.approx(0.0, abs=1e-6)
    assert complexity(one_hot).scores["entropy"].item() == pytest.approx(0.0, abs=1e-12)
    assert complexity(constant).scores["entropy"].item() == pytest.approx(math.log(n), rel=1e-6)
    assert effective_complexity(one_hot).scores["count"].item() == 1
    assert effective_complexity(constant).scores["count"].item() == n
    # k equal non-zero pixels of n: entropy ln k, Gini 1 - k / n
    if n >= 4:
        k_hot = torch.zeros(1, 1, n)
        k_hot[0, 0, :3] = 2.0
        assert complexity(k_hot).scores["entropy"].item() == pytest.approx(math.log(3), rel=1e-6)
        assert sparseness(k_hot).scores["gini"].item() == pytest.approx(1 - 3 / n, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 0xDEADBEEF])
def test_matches_slow_oracle(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(6, 5, 7, generator=g)
    a[1] = a[1].clamp_min(0)                                   # half zeros
    a[2] = torch.randint(-2, 3, (5, 7), generator=g).float()   # ties
    gini, entropy = sparseness(a).scores["gini"], complexity(a).scores["entropy"]
    for b in range(6):
        assert gini[b].item() == pytest.approx(_gini_pairs(a[b].numpy()), rel=1e-5)
        assert entropy[b].item() == pytest.approx(_entropy(a[b].numpy()), rel=1e-5)
    count = effective_complexity(a, eps=0.25).scores["count"]
    top = a.abs().flatten(1).amax(dim=1)
    for b in range(6):
        assert count[b].item() == sum(abs(v) > 0.25 * top[b].item() for v in a[b].flatten().tolist())


def test_invariances():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(8, 6, 6, generator=g)
    a[2] = 0.0
    perm = torch.randperm(8, generator=g)
    for metric in (sparseness, complexity, effective_complexity):
        (name, v), = metric(a).scores.items()
        assert v.shape == (8,) and v.dtype == a.dtype
        torch.testing.assert_close(metric(a[perm]).scores[name], v[perm], equal_nan=True)     # batch order
        torch.testing.assert_close(metric(a[3:5]).scores[name], v[3:5], equal_nan=True)       # batch size
        torch.testing.assert_close(metric(-7.5 * a).scores[name], v, equal_nan=True)          # scale, sign
        torch.testing.assert_close(metric(a.double()).scores[name].float(), v, equal_nan=True)
        flipped = a.flip(1).transpose(1, 2)                                                    # pixel order
        torch.testing.assert_close(metric(flipped).scores[name], v, equal_nan=True)
        assert family(metric) == "complexity"


def test_direction_more_concentrated_is_better():
    spread = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    focused = spread.clone()
    focused[0, 2:6, 2:6] *= 20.0
    for metric, name in ((sparseness, "gini"), (complexity, "entropy")):
        r1, r2 = metric(spread), metric(focused)
        better = r2.scores[name] > r1.scores[name] if r1.higher_is_better[name] else r2.scores[name] < r1.scores[name]
        assert bool(better), metric.__name__
    r = effective_complexity(focused, eps=0.1)
    assert not r.higher_is_better["count"] and r.scores["count"].item() == 16


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 3, 4, 4), "shape \\(B, H, W\\)"),
    (torch.zeros(4, 4), "shape \\(B, H, W\\)"),
    (torch.zeros(0, 4, 4), "no samples"),
    (torch.tensor([[[1.0, float("nan")]]]), "NaN or Inf"),
    (torch.ones(1, 2, 2, dtype=torch.long), "float map"),
])
def test_bad_maps_are_refused(bad, match):
    for metric in (sparseness, complexity, effective_complexity):
        with pytest.raises(ValueError, match=match):
            metric(bad)


@pytest.mark.parametrize("options, match", [({"eps": -1.0}, "eps"), ({"eps": "0.1"}, "eps"),
                                            ({"eps": float("nan")}, "eps"), ({"relative": 1}, "relative")])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        effective_complexity(torch.ones(1, 2, 2), **options)


@st.composite
def maps(draw):
    B, H, W = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "ties", "constant", "zero", "huge", "tiny", "one_hot", "sparse"]))
    a = torch.randn(B, H, W, generator=g)
    if kind == "ties":
        a = torch.randint(-1, 2, (B, H, W), generator=g).float()
    elif kind == "constant":
        a = torch.full((B, H, W), draw(st.sampled_from([-1.0, 2.5])))
    elif kind == "zero":
        a = torch.zeros(B, H, W)
    elif kind in ("huge", "tiny"):
        a = a * (1e30 if kind == "huge" else 1e-30)
    elif kind == "one_hot":
        a = torch.zeros(B, H * W).scatter(1, torch.randint(0, H * W, (B, 1), generator=g), 1.0).view(B, H, W)
    elif kind == "sparse":
        a = a * (torch.rand(B, H, W, generator=g) < 0.2)
    return a


@SETTINGS
@given(maps())
def test_properties_range_and_nan_policy(a):
    B, n = a.shape[0], a[0].numel()
    zero = a.flatten(1).abs().amax(dim=1) == 0
    gini, entropy = sparseness(a).scores["gini"], complexity(a).scores["entropy"]
    count = effective_complexity(a).scores["count"]
    assert torch.equal(gini.isnan(), zero) and torch.equal(entropy.isnan(), zero)     # NaN exactly on zero maps
    assert not count.isnan().any() and torch.equal(count[zero], torch.zeros(int(zero.sum())))
    assert bool(((gini[~zero] >= -1e-6) & (gini[~zero] <= 1 - 1 / n + 1e-6)).all()), gini
    assert bool(((entropy[~zero] >= -1e-6) & (entropy[~zero] <= math.log(n) + 1e-5)).all()), entropy
    assert bool(((count >= 0) & (count <= n)).all()) and torch.equal(count, count.round())
    nonzero = (a.flatten(1) != 0).sum(dim=1)
    assert bool((count <= nonzero).all())                                             # only non-zero pixels count
    # entropy <= ln(number of non-zero pixels) and Gini >= 1 - (non-zero pixels) / n
    k = nonzero[~zero].double()
    assert bool((entropy[~zero].double() <= torch.log(k) + 1e-5).all())
    assert bool((gini[~zero].double() >= 1 - k / n - 1e-5).all())
