import math

import pytest
import torch

from metrics import pointing_game, relevance_mass_accuracy


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)[None]


def test_pointing_game_hand_computed():
    mask = _mask([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    inside = torch.zeros(1, 4, 4); inside[0, 1, 1] = 5.0
    outside = torch.zeros(1, 4, 4); outside[0, 3, 3] = 5.0
    assert pointing_game(inside, mask).scores["hit"].item() == 1.0
    assert pointing_game(outside, mask).scores["hit"].item() == 0.0
    assert pointing_game(inside, mask).higher_is_better == {"hit": True}


def test_pointing_game_ties_count_as_fractions():
    mask = _mask([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    tied = torch.zeros(1, 4, 4); tied[0, 0, 0] = tied[0, 3, 3] = tied[0, 2, 2] = 1.0   # 1 of 3 maxima inside
    assert pointing_game(tied, mask).scores["hit"].item() == pytest.approx(1 / 3)
    # a constant map scores the mask's share of the image (4 / 16), as chance would
    assert pointing_game(torch.ones(1, 4, 4), mask).scores["hit"].item() == pytest.approx(0.25)


def test_pointing_game_negative_map_and_empty_mask():
    mask = _mask([[1, 0], [0, 0]])
    a = torch.tensor([[[-1.0, -3.0], [-2.0, -4.0]]])          # max is -1 at (0, 0)
    assert pointing_game(a, mask).scores["hit"].item() == 1.0
    assert math.isnan(pointing_game(a, torch.zeros(1, 2, 2, dtype=torch.bool)).scores["hit"].item())


def test_relevance_mass_accuracy_hand_computed():
    mask = _mask([[1, 1], [0, 0]])
    a = torch.tensor([[[3.0, -2.0], [1.0, 0.0]]])
    # positive relevance: inside 3, total 3 + 1 = 4 (negative ignored, as in Arras et al. 2022)
    assert relevance_mass_accuracy(a, mask).scores["rma"].item() == pytest.approx(0.75)
    # no positive relevance or an empty mask: undefined
    assert math.isnan(relevance_mass_accuracy(-a.abs(), mask).scores["rma"].item())
    assert math.isnan(relevance_mass_accuracy(a, torch.zeros_like(mask)).scores["rma"].item())


def test_batched_equals_per_sample():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 5, 5, generator=g)
    mask = torch.rand(6, 5, 5, generator=g) > 0.6
    for fn in (pointing_game, relevance_mass_accuracy):
        batched = next(iter(fn(a, mask).scores.values()))
        single = torch.cat([next(iter(fn(a[i:i + 1], mask[i:i + 1]).scores.values())) for i in range(6)])
        torch.testing.assert_close(batched, single, equal_nan=True)


def test_bad_input():
    with pytest.raises(ValueError, match="must both have shape"):
        pointing_game(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        relevance_mass_accuracy(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))
