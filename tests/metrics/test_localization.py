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
    with pytest.warns(UserWarning, match="masks are empty"):
        assert math.isnan(pointing_game(a, torch.zeros(1, 2, 2, dtype=torch.bool)).scores["hit"].item())


def test_relevance_mass_accuracy_hand_computed():
    mask = _mask([[1, 1], [0, 0]])
    a = torch.tensor([[[3.0, -2.0], [1.0, 0.0]]])
    # positive relevance: inside 3, total 3 + 1 = 4 (negative ignored, as in Arras et al. 2022)
    assert relevance_mass_accuracy(a, mask).scores["rma"].item() == pytest.approx(0.75)
    # no positive relevance or an empty mask: undefined
    assert math.isnan(relevance_mass_accuracy(-a.abs(), mask).scores["rma"].item())
    with pytest.warns(UserWarning, match="masks are empty"):
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


# ---- issue 6: every standard localization metric, hand-computed and against slow oracles ----------
import itertools
import warnings

import numpy as np
from scipy.ndimage import distance_transform_edt
from sklearn.metrics import roc_auc_score

from metrics.localization import (attribution_localisation, energy_pointing_game, iou_at_threshold,
                                  localization_auc, relevance_rank_accuracy, top_k_intersection)

EMPTY = torch.zeros(1, 2, 3, dtype=torch.bool)
MASK23 = _mask([[1, 1, 0], [0, 0, 0]])                 # 2 of 6 pixels


def _score(result):
    (value,) = result.scores.values() if len(result.scores) == 1 else (result.scores["mu"],)
    return value.item()


ALL = {
    "pointing_game": lambda a, m, **o: pointing_game(a, m, **o),
    "energy_pointing_game": lambda a, m, **o: energy_pointing_game(a, m, **o),
    "relevance_mass_accuracy": lambda a, m, **o: relevance_mass_accuracy(a, m, **o),
    "relevance_rank_accuracy": lambda a, m, **o: relevance_rank_accuracy(a, m, **o),
    "localization_auc": lambda a, m, **o: localization_auc(a, m, **o),
    "top_k_intersection": lambda a, m, **o: top_k_intersection(a, m, k=2, **o),
    "attribution_localisation": lambda a, m, **o: attribution_localisation(a, m, **o),
    "iou_at_threshold": lambda a, m, **o: iou_at_threshold(a, m, fraction=1 / 3, **o),
}


def test_hand_computed_signed_map():
    # map        mask        ranks (desc): 5 (in), 3 (out), 1 (in), 0, -1, -4 (out)
    # [5 1 -4]   [1 1 0]
    # [3 0 -1]   [0 0 0]
    a = torch.tensor([[[5.0, 1.0, -4.0], [3.0, 0.0, -1.0]]])
    got = {name: _score(fn(a, MASK23)) for name, fn in ALL.items()}
    expected = {
        "pointing_game": 1.0,
        "energy_pointing_game": 6 / 9,            # the mask is its own box here; positive mass 5+1 of 9
        "relevance_mass_accuracy": 6 / 9,
        "relevance_rank_accuracy": 1 / 2,         # top 2 = {5, 3}: one inside
        "localization_auc": 7 / 8,                # inside {5, 1} vs outside {3, 0, -1, -4}: 4 + 3 of 8 pairs
        "top_k_intersection": 1 / 2,
        "attribution_localisation": 6 / 9,
        "iou_at_threshold": 1 / 3,                # S = {5, 3}, S∩M = 1, S∪M = 3
    }
    assert got == pytest.approx(expected)
    w = attribution_localisation(a, MASK23).scores["mu_weighted"].item()
    assert w == pytest.approx(6 / 9 * 6 / 2)      # weighted by HW / |mask|


def test_sign_option():
    a = torch.tensor([[[1.0, 0.5, -4.0], [0.0, 0.0, -1.0]]])
    # signed: -4 ranks last; absolute: -4 is the maximum and lies outside the mask
    assert pointing_game(a, MASK23).scores["hit"].item() == 1.0
    assert pointing_game(a, MASK23, sign="absolute").scores["hit"].item() == 0.0
    # absolute mass: inside 1.5 of 6.5; signed and positive count positive mass only: 1.5 of 1.5
    assert relevance_mass_accuracy(a, MASK23, sign="absolute").scores["rma"].item() == pytest.approx(1.5 / 6.5)
    assert relevance_mass_accuracy(a, MASK23, sign="positive").scores["rma"].item() == 1.0
    # positive part: the 0, 0, -4, -1 become four zeros tied for 3rd place; AUC counts ties one half
    # inside {1, 0.5} beat every outside pixel either way
    assert localization_auc(a, MASK23, sign="positive").scores["auc"].item() == 1.0
    # a map with the mask's values negative: signed AUC 0, absolute AUC 1
    b = torch.tensor([[[-3.0, -2.0, 0.0], [0.0, 0.1, 0.0]]])
    assert localization_auc(b, MASK23).scores["auc"].item() == 0.0
    assert localization_auc(b, MASK23, sign="absolute").scores["auc"].item() == 1.0
    # positive part: inside {0, 0} vs outside {0, 0.1, 0, 0}: 6 ties of 8 pairs count half, 2 losses -> 3/8
    assert localization_auc(b, MASK23, sign="positive").scores["auc"].item() == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="sign must be 'signed', 'positive' or 'absolute', got 'abs'"):
        localization_auc(b, MASK23, sign="abs")


def test_all_zero_map_scores_chance_or_nan():
    z = torch.zeros(1, 2, 3)
    assert pointing_game(z, MASK23).scores["hit"].item() == pytest.approx(2 / 6)
    assert relevance_rank_accuracy(z, MASK23).scores["rra"].item() == pytest.approx(2 / 6)
    assert top_k_intersection(z, MASK23, k=2).scores["tki"].item() == pytest.approx(2 / 6)
    assert top_k_intersection(z, MASK23, k=2, concept_influence=True).scores["tki"].item() == pytest.approx(1.0)
    assert localization_auc(z, MASK23).scores["auc"].item() == 0.5
    # k = 2 tied pixels share 2 places among 6: I = 2 * 2/6, IoU = I / (2 + 2 - I)
    assert iou_at_threshold(z, MASK23, fraction=1 / 3).scores["iou"].item() == pytest.approx((2 / 3) / (4 - 2 / 3))
    for fn in (energy_pointing_game, relevance_mass_accuracy, attribution_localisation):
        assert all(math.isnan(v.item()) for v in fn(z, MASK23).scores.values())   # no positive mass


def test_ties_at_the_cut_are_shared():
    # map [2 1 1] / [1 0 0], mask [1 1 0] / [0 0 0]: K = 2 -> 2 is in; one place left for three tied 1s,
    # one of which is inside: RRA = (1 + 1/3) / 2
    a = torch.tensor([[[2.0, 1.0, 1.0], [1.0, 0.0, 0.0]]])
    assert relevance_rank_accuracy(a, MASK23).scores["rra"].item() == pytest.approx(2 / 3)
    assert top_k_intersection(a, MASK23, k=3).scores["tki"].item() == pytest.approx((1 + 2 / 3) / 3)
    # IoU at k = 2: I = 4/3, |S ∪ M| = 2 + 2 - 4/3
    assert iou_at_threshold(a, MASK23, fraction=1 / 3).scores["iou"].item() == pytest.approx((4 / 3) / (8 / 3))
    # pointing game: a unique maximum at 2 -> 1; two tied maxima, one inside -> 1/2
    b = torch.tensor([[[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]]])
    assert pointing_game(b, MASK23).scores["hit"].item() == 0.5


def test_empty_mask_is_nan_with_a_warning():
    a = torch.tensor([[[5.0, 1.0, -4.0], [3.0, 0.0, -1.0]]])
    for name, fn in ALL.items():
        with pytest.warns(UserWarning, match="1 of 1 masks are empty"):
            result = fn(a, EMPTY)
        assert all(math.isnan(v.item()) for v in result.scores.values()), name


def test_full_mask_auc_is_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(localization_auc(torch.rand(1, 2, 3), ~EMPTY).scores["auc"].item())


def test_energy_pointing_game_uses_the_bounding_box():
    # an L-shaped mask: its box is the top-left 2x2 block
    mask = _mask([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    a = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 2.0]]])
    assert energy_pointing_game(a, mask).scores["energy"].item() == pytest.approx(6 / 8)
    assert energy_pointing_game(a, mask, box=False).scores["energy"].item() == pytest.approx(3 / 8)


def test_pointing_game_tolerance_hand_computed():
    mask = torch.zeros(1, 9, 9, dtype=torch.bool); mask[0, 0, 0] = True
    a = torch.zeros(1, 9, 9); a[0, 3, 4] = 1.0                 # distance 5 from the mask pixel
    hit = lambda t: pointing_game(a, mask, tolerance=t).scores["hit"].item()
    assert (hit(0), hit(5), hit(5.01), hit(15)) == (0.0, 0.0, 1.0, 1.0)   # strict: d < tolerance
    with pytest.raises(ValueError, match="tolerance must be"):
        pointing_game(a, mask, tolerance=-1)


def _oracle_hit(a, m, tolerance):
    """Fraction of tied maxima at distance < tolerance from the mask (scipy's exact EDT), or inside it."""
    out = []
    for ai, mi in zip(a.numpy(), m.numpy()):
        dist = distance_transform_edt(~mi) if mi.any() else np.full(mi.shape, np.inf)
        near = (dist < tolerance) | mi
        top = ai == ai.max()
        out.append(near[top].mean() if mi.any() else np.nan)
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("seed", [0, 1, 0xDEADBEEF])
@pytest.mark.parametrize("tolerance", [0.0, 1.0, 2.5, 4.0])
def test_pointing_game_tolerance_matches_distance_transform(seed, tolerance):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 4, (16, 11, 13), generator=g).float()            # many tied maxima
    mask = torch.rand(16, 11, 13, generator=g) > 0.93
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = pointing_game(a, mask, tolerance=tolerance, chunk_size=7).scores["hit"]
    torch.testing.assert_close(got, _oracle_hit(a, mask, tolerance), equal_nan=True)


def _orders_oracle(a, m, metric):
    """Average over every tie-breaking order of a tiny map (all permutations): exact expectations."""
    a, m = a.flatten().tolist(), m.flatten().tolist()
    n, K = len(a), sum(m)
    total = 0.0
    perms = list(itertools.permutations(range(n)))
    for p in perms:
        order = sorted(range(n), key=lambda j: (-a[j], p[j]))           # descending, ties by p
        inside = [m[j] for j in order]
        total += metric(inside, n, K)
    return total / len(perms)


@pytest.mark.parametrize("seed", range(4))
def test_rank_metrics_equal_expectation_over_tie_orders(seed):
    """Each sample of a batch mixing ties across the k-th place with ties inside the top k (and none)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-1, 2, (6, 2, 3), generator=g).float()             # values in {-1, 0, 1}: ties
    a[-1] = torch.arange(6.0).view(2, 3)                                 # one map without ties
    m = torch.rand(6, 2, 3, generator=g) > 0.5
    m[:, 0, 0] = True
    k = 2
    got = {
        "rra": relevance_rank_accuracy(a, m).scores["rra"],
        "tki": top_k_intersection(a, m, k=k).scores["tki"],
        "hit": pointing_game(a, m).scores["hit"],
        "iou": iou_at_threshold(a, m, fraction=k / 6).scores["iou"],
    }
    for b in range(6):
        oracles = {
            "rra": _orders_oracle(a[b:b + 1], m[b:b + 1], lambda s, n, K: sum(s[:K]) / K),
            "tki": _orders_oracle(a[b:b + 1], m[b:b + 1], lambda s, n, K: sum(s[:k]) / k),
            "hit": _orders_oracle(a[b:b + 1], m[b:b + 1], lambda s, n, K: float(s[0])),
        }
        # IoU is a ratio: its tie rule is the IoU of the expected selection, I / (k + K - I)
        inter, K = _orders_oracle(a[b:b + 1], m[b:b + 1], lambda s, n, K: float(sum(s[:k]))), int(m[b].sum())
        oracles["iou"] = inter / (k + K - inter)
        assert {name: v[b].item() for name, v in got.items()} == pytest.approx(oracles), b


@pytest.mark.parametrize("seed", [0, 7])
def test_auc_matches_sklearn_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 5, (12, 9, 10), generator=g).float()           # heavy ties
    m = torch.rand(12, 9, 10, generator=g) > 0.7
    got = localization_auc(a, m, chunk_size=5).scores["auc"]
    ref = torch.tensor([roc_auc_score(mi.flatten().numpy(), ai.flatten().numpy()) for ai, mi in zip(a, m)])
    torch.testing.assert_close(got, ref.float())


def _sklearn_auc(a, m):
    a = a.double().nan_to_num(posinf=1e300, neginf=-1e300)              # the same order, finite for sklearn
    return torch.tensor([roc_auc_score(mi.flatten(), ai.flatten()) for ai, mi in zip(a, m)], dtype=torch.float64)


def test_auc_keys_in_every_encoding_match_sklearn():
    """Each way a map becomes sort keys gives sklearn's AUC: int32 keys (non-negative and signed maps,
    rows rescaled by their smallest power of two), int64 keys (a row spanning more than 2^126), dense
    ranks (float64), float16, and -0.0 tied with 0.0. (Maps with an Inf are refused, issue 21.)"""
    g = torch.Generator().manual_seed(3)
    m = torch.rand(6, 7, 8, generator=g) > 0.6
    signed = torch.randn(6, 7, 8, generator=g) * 1e3
    signed[0, :2] = -0.0
    signed[0, 2:4] = 0.0                                                # -0.0 and 0.0 are one tied value
    signed[1] = signed[1].round()                                       # many ties across signs
    signed[2, 0, 0] = 1e-40                                             # a subnormal: no rescaling for that row
    spanning = signed.clone()
    spanning[3, 0, :2] = torch.tensor([1e-30, 1e30])                    # 2^199 apart: int64 keys
    for a in (signed, signed.abs(), spanning, signed.double(), signed.half(), signed.bfloat16()):
        got = localization_auc(a, m).scores["auc"]                       # in the map's dtype
        torch.testing.assert_close(got, _sklearn_auc(a, m).to(a.dtype), atol=1e-6, rtol=0,
                                   msg=lambda e: f"{a.dtype}: {e}")


def test_auc_int32_and_int64_keys_agree():
    """The int64 keys (GPU path and CPU fallback) count exactly as the int32 keys."""
    from metrics._rank import _narrow_keys, _twice_u, _wide_keys
    g = torch.Generator().manual_seed(4)
    a = torch.randn(5, 300, generator=g).round(decimals=1)              # ties
    a[0] = a[0].abs()
    m = torch.rand(5, 300, generator=g) > 0.5
    narrow = np.empty(a.shape, dtype=np.int32)
    assert _narrow_keys(a.numpy(), m.numpy(), narrow)
    narrow = torch.from_numpy(np.sort(narrow, axis=1))
    wide = _wide_keys(a, m).sort(dim=1).values
    assert torch.equal(narrow & 1, (wide & 1).int())                    # the same order of in / out
    for got, expected in zip(_twice_u(narrow), _twice_u(wide)):
        assert torch.equal(got, expected)


def test_every_metric_batched_chunked_permuted_and_rescaled():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(7, 6, 5, generator=g)
    m = torch.rand(7, 6, 5, generator=g) > 0.6
    perm = torch.randperm(7, generator=g)
    for name, fn in ALL.items():
        full = fn(a, m).scores
        for key, v in full.items():
            single = torch.cat([fn(a[i:i + 1], m[i:i + 1]).scores[key] for i in range(7)])
            torch.testing.assert_close(v, single, equal_nan=True)
            torch.testing.assert_close(fn(a[perm], m[perm]).scores[key], v[perm], equal_nan=True)
            torch.testing.assert_close(fn(3.0 * a, m).scores[key], v, equal_nan=True)   # positive rescaling
    for fn in (relevance_rank_accuracy, localization_auc):
        torch.testing.assert_close(fn(a, m, chunk_size=2).scores, fn(a, m).scores)


def test_k_and_fraction_are_checked():
    a = torch.rand(1, 2, 3)
    assert top_k_intersection(a, MASK23, k=1.0).scores["tki"].item() == pytest.approx(2 / 6)   # all pixels
    for bad in (0, 7, 1.5, True, "3"):
        with pytest.raises(ValueError, match="k "):
            top_k_intersection(a, MASK23, k=bad)
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="fraction"):
            iou_at_threshold(a, MASK23, fraction=bad)


# ---- issue 17: the pointing game's class mean (TorchRay); issue 21: maps with NaN or Inf are refused -----

def torchray_accuracy(hits, classes, num_classes):
    """TorchRay's PointingGame bookkeeping, written from its definition: per class, hits and misses are
    counted (a skipped pair counts neither), class accuracy = hits / max(hits + misses, 1), and
    accuracy = the mean of the class accuracies over all num_classes classes."""
    h, miss = [0.0] * num_classes, [0.0] * num_classes
    for hit, c in zip(hits, classes):
        if math.isnan(hit):
            continue                                                  # TorchRay: 0 = skipped
        h[c] += hit
        miss[c] += 1 - hit
    return sum(h[c] / max(h[c] + miss[c], 1) for c in range(num_classes)) / num_classes


def test_class_mean_is_torchrays_pointing_game_accuracy():
    from metrics import class_mean
    from metrics.localization import CLASS_MEAN_SCORES

    # class 0: 2 of 3 hits, class 1: 1 of 1 (its NaN pair skipped), class 2: 0 of 1 -> (2/3 + 1 + 0) / 3 = 5/9,
    # while the sample mean over the 5 defined pairs is 3/5
    hits = torch.tensor([1.0, 1.0, 0.0, 1.0, math.nan, 0.0])
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    assert class_mean(hits, target).item() == pytest.approx(5 / 9)
    assert class_mean(hits, target).item() == pytest.approx(torchray_accuracy(hits.tolist(), target.tolist(), 3))
    assert hits.nanmean().item() == pytest.approx(3 / 5)
    # random pointing-game results over 7 classes, every class present: TorchRay's number, fractional ties too
    g = torch.Generator().manual_seed(0)
    target = torch.cat([torch.arange(7), torch.randint(0, 7, (93,), generator=g)])
    hits = (torch.rand(100, generator=g) > 0.4).float()
    hits[::9] = 0.5                                                   # tied maxima, half of them on the object
    hits[::13] = math.nan                                             # empty masks
    expected = torchray_accuracy(hits.tolist(), target.tolist(), 7)
    assert class_mean(hits, target).item() == pytest.approx(expected, abs=1e-6)
    assert class_mean(hits, target.int()).item() == pytest.approx(expected, abs=1e-6)
    # a class with no defined score is left out (TorchRay would count it as 0); nothing defined: NaN
    assert class_mean(torch.tensor([1.0, math.nan]), torch.tensor([0, 1])).item() == 1.0
    assert math.isnan(class_mean(torch.tensor([math.nan]), torch.tensor([3])).item())
    with pytest.raises(ValueError, match="target must be an integer tensor"):
        class_mean(hits, target.float())
    with pytest.raises(ValueError, match=r"target must hold class indices >= 0, got \[-1\]"):
        class_mean(torch.ones(2), torch.tensor([0, -1]))
    assert CLASS_MEAN_SCORES["metrics.pointing_game"] == ("hit",)


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_maps_with_nan_or_inf_are_refused(name, bad):
    """Issue 21: an all-NaN map scored rank accuracy, top-k and IoU 0 and AUC 0.5, and one NaN pixel moved
    scores silently; a map must be finite (as the faithfulness metrics require)."""
    m = _mask([[1, 1, 0], [0, 0, 0]])
    one = torch.tensor([[[3.0, 1.0, 0.0], [2.0, 0.5, 0.0]]])
    one[0, 1, 0] = bad
    for a in (one, torch.full((1, 2, 3), bad), torch.cat([torch.rand(1, 2, 3), one])):
        with pytest.raises(ValueError, match=r"attribution contains NaN or Inf; a map must be finite to rank or "
                                             r"locate its pixels"):
            ALL[name](a, m if len(a) == 1 else m.expand(2, 2, 3))
