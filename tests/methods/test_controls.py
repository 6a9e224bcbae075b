"""The controls score what methods/controls.py's table says, with the metrics from `metrics`."""
from __future__ import annotations

import math

import pytest
import torch

import methods
from metrics import (data_randomization, input_invariance, localization_auc, mprt, pointing_game, random_logit,
                     relevance_mass_accuracy, to_map, top_k_overlap)

CONTROLS = {"random": methods.random_map, "edge": methods.edge, "centre": methods.centre,
            "constant": methods.constant}
MEASURES = ["spearman", "spearman_signed", "top_k"]


@pytest.fixture
def nets(tiny_cnn):
    """conftest's TinyCNN and one with other weights, 8 images of 32 x 32 (n = 1024 pixels per map)."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        other = type(tiny_cnn)(classes=3).eval()
    model = tiny_cnn
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return model, other, x, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def test_random_is_drawn_per_image_class_and_model(nets):
    model, other, x, target = nets
    a = methods.random_map(model, x, target, seed=1)
    torch.testing.assert_close(methods.random_map(model, x[2:4], target[2:4], seed=1), a[2:4])   # batch-free
    assert torch.equal(methods.random_map(model, x, target, seed=1), a)                         # reproducible
    assert ((a >= 0) & (a < 1)).all() and torch.equal(a[:, 0], a[:, 2])
    for changed in (methods.random_map(model, x, (target + 1) % 3, seed=1),                    # another class
                    methods.random_map(other, x, target, seed=1),                              # another model
                    methods.random_map(model, x, target, seed=2),                              # another seed
                    methods.random_map(model, x + 1e-3, target, seed=1)):                      # another image
        assert not (changed == a).flatten(1).all(dim=1).any()
    # a re-drawn parameter changes the draw, as MPRT's stages do
    import copy
    bumped = copy.deepcopy(model)
    with torch.no_grad():
        bumped.fc.bias[0] += 1.0
    assert not torch.equal(methods.random_map(bumped, x, target, seed=1), a)


@pytest.mark.parametrize("name", list(CONTROLS))
def test_randomization_scores_of_the_controls(name, nets, one_thread):
    """random: two independent uniform maps of n = 1024 pixels, Spearman ~ N(0, 1/sqrt(n - 1) = 0.031)
    (bound 5 sd) and top-k overlap ~ 0.1 (hypergeometric sd 0.03; bound 0.15); edge and centre ignore
    model and class: 1 exactly; constant: flat in both maps, undefined (NaN)."""
    model, other, x, target = nets
    method = CONTROLS[name]
    results = {"mprt": mprt(model, x, target, method, measures=MEASURES),
               "random_logit": random_logit(model, x, target, method, measures=MEASURES),
               "data_randomization": data_randomization(model, x, target, method, other, measures=MEASURES)}
    for metric, r in results.items():
        s = {m: r.scores[m] for m in MEASURES}
        if name == "random":
            assert s["spearman"].abs().max() < 5 / math.sqrt(1023), (metric, s["spearman"])
            assert s["spearman_signed"].abs().max() < 5 / math.sqrt(1023), (metric, s["spearman_signed"])
            assert (s["top_k"] - 0.1).abs().max() < 0.15, (metric, s["top_k"])
        elif name in ("edge", "centre"):
            # the same map twice: Spearman 1; top-k overlap 1 less the share of ties at the k-th value,
            # which top_k_overlap takes in expectation (centre's symmetric ties at 32 px: 0.9914)
            a = to_map(method(model, x, target), "abs_sum")
            for m in ("spearman", "spearman_signed"):
                torch.testing.assert_close(s[m], torch.ones(8), msg=f"{metric} {m}")
            torch.testing.assert_close(s["top_k"], top_k_overlap(a, a), msg=metric)
            assert (s["top_k"] > 0.99).all()
        else:
            assert all(s[m].isnan().all() for m in MEASURES), metric


@pytest.mark.parametrize("name", list(CONTROLS))
def test_input_invariance_of_the_controls(name, nets, one_thread):
    """random: a new draw for the shifted image and the compensated model: Spearman ~ 0 and
    rel_l1 ~ E|U - U'| / E|U| = (1/3) / (1/2) = 2/3 (per-sample sd ~ 0.015); edge: the Sobel
    magnitude of x + s is that of x up to float rounding; centre and constant: identical maps."""
    model, _, x, target = nets
    r = input_invariance(model, x, target, CONTROLS[name], measures=["spearman"])
    rel, s = r.scores["rel_l1"], r.scores["spearman"]
    if name == "random":
        assert s.abs().max() < 5 / math.sqrt(1023) and (rel - 2 / 3).abs().max() < 0.06, (s, rel)
    elif name == "edge":
        assert rel.max() < 1e-5
        torch.testing.assert_close(s, torch.ones(8))
    else:
        assert torch.equal(rel, torch.zeros(8))
        assert torch.equal(s, torch.ones(8)) if name == "centre" else s.isnan().all()


def test_localization_scores_of_random_and_constant(nets):
    """constant: every pixel tied, so pointing game and relevance mass accuracy are the mask's share
    m / n and the AUC 1/2, exactly; random: the same in expectation (per sample: RMA sd ~ 0.015 and
    AUC sd ~ 0.02 at m = 256 of n = 1024; the pointing game is a Bernoulli(m / n) hit)."""
    model, _, x, target = nets
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 3, 32, 32, generator=g)
    target = torch.randint(0, 3, (64,), generator=g)
    mask = torch.zeros(64, 32, 32, dtype=torch.bool)
    mask[:, 8:24, 8:24] = True                                                   # m / n = 1/4
    const = to_map(methods.constant(model, x, target), "sum")
    assert torch.equal(pointing_game(const, mask).scores["hit"], torch.full((64,), 0.25))
    torch.testing.assert_close(relevance_mass_accuracy(const, mask).scores["rma"], torch.full((64,), 0.25))
    assert torch.equal(localization_auc(const, mask).scores["auc"], torch.full((64,), 0.5))
    rnd = to_map(methods.random_map(model, x, target), "sum")
    hit = pointing_game(rnd, mask).scores["hit"]
    assert set(hit.tolist()) <= {0.0, 1.0} and abs(hit.mean().item() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 64)
    assert (relevance_mass_accuracy(rnd, mask).scores["rma"] - 0.25).abs().max() < 0.08
    assert (localization_auc(rnd, mask).scores["auc"] - 0.5).abs().max() < 0.1


def _torchray_hit(mask: torch.Tensor, point: tuple[float, float], tolerance: int) -> bool:
    """TorchRay's PointingGame.evaluate, from its formula: pixel (v, u) accepts the point (u, v) when
    (v - point_v)^2 + (u - point_u)^2 < tolerance^2; a hit when an accepted pixel is in the mask."""
    H, W = mask.shape
    v = (torch.arange(H, dtype=torch.float32) - point[1])[:, None] ** 2
    u = (torch.arange(W, dtype=torch.float32) - point[0])[None, :] ** 2
    return bool((mask & ((v + u) < tolerance ** 2)).any())


@pytest.mark.parametrize("size", [(64, 64), (224, 224), (48, 80)])
def test_centre_is_torchrays_centre_baseline(size):
    """TorchRay's benchmark scores its `center` method at the point (W/2, H/2); our centre map's single
    maximum is that pixel, so the pointing game scores exactly TorchRay's centre baseline."""
    H, W = size
    x = torch.zeros(1, 3, H, W)
    c = to_map(methods.centre(None, x, torch.tensor([0])), "sum")[0]
    assert (c == c.max()).nonzero().tolist() == [[H // 2, W // 2]]
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(40, H, W, dtype=torch.bool)
    for i in range(40):                                                           # random boxes, some near the centre
        y0, x0 = torch.randint(0, H - 4, (1,), generator=g).item(), torch.randint(0, W - 4, (1,), generator=g).item()
        h, w = torch.randint(1, H // 3, (1,), generator=g).item(), torch.randint(1, W // 3, (1,), generator=g).item()
        masks[i, y0:y0 + h, x0:x0 + w] = True
    maps = c.expand(40, H, W)
    for tolerance in (0, 15):
        ours = pointing_game(maps, masks, tolerance=float(tolerance)).scores["hit"]
        theirs = [_torchray_hit(m, (W / 2, H / 2), tolerance) if tolerance else bool(m[H // 2, W // 2])
                  for m in masks]
        assert ours.tolist() == [float(t) for t in theirs]
        assert 0 < sum(theirs) < 40                                               # both outcomes occur


def test_centre_at_odd_sizes_ties_the_two_pixels_around_the_point():
    c = to_map(methods.centre(None, torch.zeros(1, 1, 5, 6), torch.tensor([0])), "sum")[0]
    assert (c == c.max()).nonzero().tolist() == [[2, 3], [3, 3]]                 # H/2 = 2.5 lies between rows 2, 3
