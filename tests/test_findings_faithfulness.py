"""Pixel-flipping family on the trained zoo model (the session's `trained` small_cnn, first 64 test
images): informed maps beat the random control in both orders (Samek et al. 2017; Petsiuk et al. 2018)."""
from __future__ import annotations

import pytest
from hydra.utils import instantiate

from metrics import deletion, insertion, pixel_flipping, to_map

pytestmark = pytest.mark.slow
INFORMED = ["integrated_gradients", "grad_cam"]


@pytest.fixture(scope="module")
def maps(trained):
    x, target = trained.x[:64], trained.target[:64]
    out = {}
    for name in [*INFORMED, "random"]:
        method = instantiate(trained.cfg.method[name])
        out[name] = to_map(method(trained.model, x, target), trained.cfg.reduce)
    return x, target, out


@pytest.fixture(scope="module")
def flipping(trained, maps):
    x, target, m = maps
    return {name: pixel_flipping(trained.model, x, target, a, steps=8, order="both") for name, a in m.items()}


@pytest.mark.parametrize("method", INFORMED)
def test_informed_maps_beat_random_in_both_orders(flipping, method):
    mean = {name: {k: v.mean().item() for k, v in r.scores.items()} for name, r in flipping.items()}
    assert mean[method]["auc_morf"] < mean["random"]["auc_morf"], mean          # output falls faster
    assert mean[method]["auc_lerf"] > mean["random"]["auc_lerf"], mean          # and holds longer
    assert mean[method]["srg"] > mean["random"]["srg"] + 1.0, mean
    # per sample, most images agree, not just the mean
    assert (flipping[method].scores["srg"] > flipping["random"].scores["srg"]).float().mean() > 0.75


def test_random_map_has_no_relevance_gain(flipping):
    # a random order removes the same pixels in expectation whichever end it starts from: SRG ~ 0
    srg = flipping["random"].scores["srg"]
    assert abs(srg.mean().item()) < 3 * srg.std().item() / len(srg) ** 0.5 + 0.05


def test_deletion_and_insertion_rank_integrated_gradients_above_random(trained, maps):
    x, target, m = maps
    d = {k: deletion(trained.model, x, target, m[k], steps=8).scores["auc"].mean().item()
         for k in ("integrated_gradients", "random")}
    i = {k: insertion(trained.model, x, target, m[k], steps=8).scores["auc"].mean().item()
         for k in ("integrated_gradients", "random")}
    assert d["integrated_gradients"] < d["random"], d
    assert i["integrated_gradients"] > i["random"], i
