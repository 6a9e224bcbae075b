"""Agreement with an independent implementation: Quantus 0.6.0's localisation metrics.

Same maps and masks, per sample. Where Quantus breaks ties arbitrarily (argsort) or differs on
purpose (tied maxima in the pointing game, the sign of the mass), the maps are tie-free or the
documented difference is pinned.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

quantus = pytest.importorskip("quantus")

from metrics.localization import (attribution_localisation, localization_auc, pointing_game,  # noqa: E402
                                  relevance_mass_accuracy, relevance_rank_accuracy, top_k_intersection)

B, H, W = 16, 24, 20


def _data(seed: int, *, signed: bool, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    if ties:
        a = torch.randint(0, 4, (B, H, W), generator=g).float()
    else:
        a = torch.rand(B, H, W, generator=g)                     # continuous: no ties (checked below)
        a = 2 * a - 1 if signed else a
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    centre = torch.rand(B, 2, generator=g) * torch.tensor([H, W])
    radius = 3 + 5 * torch.rand(B, generator=g)
    mask = (yy - centre[:, :1, None]) ** 2 + (xx - centre[:, 1:, None]) ** 2 < radius[:, None, None] ** 2
    assert mask.flatten(1).any(1).all()
    if not ties:
        assert all(len(torch.unique(ai)) == H * W for ai in a)
    return a, mask


def _quantus(metric_cls, a: torch.Tensor, mask: torch.Tensor, **options) -> np.ndarray:
    """Run a Quantus localisation metric on precomputed maps (no model needed), without its normalisation."""
    x = np.zeros((len(a), 3, H, W), dtype=np.float32)
    metric = metric_cls(normalise=False, disable_warnings=True, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = metric(model=None, x_batch=x, y_batch=np.zeros(len(a), dtype=int), a_batch=a[:, None].numpy(),
                     s_batch=mask[:, None].numpy().astype(np.float32), channel_first=True)
    return np.asarray(out, dtype=np.float64)


def _close(ours: torch.Tensor, theirs: np.ndarray, **tol) -> None:
    np.testing.assert_allclose(ours.double().numpy(), theirs, **(tol or {"rtol": 1e-5, "atol": 1e-6}))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("signed", [False, True])
def test_rank_metrics_agree_without_ties(seed, signed):
    a, mask = _data(seed, signed=signed)
    _close(pointing_game(a, mask).scores["hit"], _quantus(quantus.PointingGame, a, mask, abs=False))
    _close(relevance_rank_accuracy(a, mask).scores["rra"], _quantus(quantus.RelevanceRankAccuracy, a, mask, abs=False))
    _close(localization_auc(a, mask).scores["auc"], _quantus(quantus.AUC, a, mask, abs=False))
    for k in (1, 37, 200):
        _close(top_k_intersection(a, mask, k=k).scores["tki"], _quantus(quantus.TopKIntersection, a, mask, k=k, abs=False))
    _close(top_k_intersection(a, mask, k=37, concept_influence=True).scores["tki"],
           _quantus(quantus.TopKIntersection, a, mask, k=37, concept_influence=True, abs=False))
    # absolute maps: Quantus' abs=True against our sign="absolute"
    _close(localization_auc(a, mask, sign="absolute").scores["auc"], _quantus(quantus.AUC, a, mask, abs=True))


@pytest.mark.parametrize("seed", [0, 3])
def test_mass_metrics_agree(seed):
    a, mask = _data(seed, signed=False)                          # non-negative: every mass convention coincides
    _close(relevance_mass_accuracy(a, mask).scores["rma"], _quantus(quantus.RelevanceMassAccuracy, a, mask, abs=False))
    _close(attribution_localisation(a, mask).scores["mu"], _quantus(quantus.AttributionLocalisation, a, mask, abs=True))
    s, mask = _data(seed, signed=True)                           # signed: agree on the absolute map
    _close(relevance_mass_accuracy(s, mask, sign="absolute").scores["rma"],
           _quantus(quantus.RelevanceMassAccuracy, s, mask, abs=True))
    _close(attribution_localisation(s, mask, sign="absolute").scores["mu"],
           _quantus(quantus.AttributionLocalisation, s, mask, abs=True))
    # and on the positive part, which is what our default reads as mass
    _close(relevance_mass_accuracy(s, mask).scores["rma"],
           _quantus(quantus.RelevanceMassAccuracy, s.clamp(min=0), mask, abs=False))


def test_auc_agrees_even_with_ties():
    a, mask = _data(5, signed=False, ties=True)                  # sklearn's roc_curve is tie-aware, as we are
    _close(localization_auc(a, mask).scores["auc"], _quantus(quantus.AUC, a, mask, abs=False))


def test_documented_difference_on_tied_maxima():
    """Quantus counts a hit when ANY tied maximum is inside; we score the fraction inside."""
    a, mask = _data(6, signed=False, ties=True)
    ours = pointing_game(a, mask).scores["hit"].double().numpy()
    theirs = _quantus(quantus.PointingGame, a, mask, abs=False)
    is_max = a.flatten(1) == a.flatten(1).amax(1, keepdim=True)
    inside = (is_max & mask.flatten(1)).sum(1).double().numpy()
    expected = inside / is_max.sum(1).double().numpy()
    np.testing.assert_allclose(ours, expected)
    np.testing.assert_array_equal(theirs, (inside > 0).astype(float))
    assert (ours < theirs).any()                                  # the tie rule matters on these maps


def test_documented_difference_on_signed_mass():
    """Quantus sums signed relevance (ratio can leave [0, 1]); we count positive mass, as Arras et al."""
    a = torch.tensor([[[3.0, -2.0], [1.0, 0.0]]]).expand(2, 2, 2).clone()
    mask = torch.tensor([[True, True], [False, False]]).expand(2, 2, 2).clone()
    x = np.zeros((2, 3, 2, 2), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = quantus.RelevanceMassAccuracy(abs=False, normalise=False, disable_warnings=True)(
            model=None, x_batch=x, y_batch=np.zeros(2, dtype=int), a_batch=a[:, None].numpy(),
            s_batch=mask[:, None].numpy().astype(np.float32), channel_first=True)
    np.testing.assert_allclose(theirs, [0.5, 0.5])               # (3 - 2) / (3 - 2 + 1)
    torch.testing.assert_close(relevance_mass_accuracy(a, mask).scores["rma"], torch.tensor([0.75, 0.75]))
