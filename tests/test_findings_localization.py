"""Localization findings on the trained zoo model (the session's `trained` small_cnn on `shapes`):
grad_cam and integrated_gradients beat the `random` and `centre` controls (conf/method/*.yaml)
on every localization metric, each with its configured defaults (conf/metric/*.yaml).
"""
from __future__ import annotations

import warnings

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bench.config import CONF, derive_seeds
from bench.provenance import without_meta
from metrics import to_map

METRICS = ["pointing_game", "energy_pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy",
           "localization_auc", "top_k_intersection", "attribution_localisation", "iou_at_threshold"]
INFORMED = ["grad_cam", "integrated_gradients"]
CONTROLS = ["random", "centre"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def means(trained):
    nodes = {name: OmegaConf.load(CONF / "method" / f"{name}.yaml")[name] for name in [*INFORMED, *CONTROLS]}
    methods = {name: instantiate(node) for name, node in derive_seeds(OmegaConf.create({"seed": 0, "method": nodes})).method.items()}
    maps = {name: to_map(method(trained.model, trained.x, trained.target), trained.cfg.reduce)
            for name, method in methods.items()}
    out = {}
    for metric in METRICS:
        fn = instantiate(without_meta(OmegaConf.load(CONF / "metric" / f"{metric}.yaml")[metric]))
        for method, a in maps.items():
            with warnings.catch_warnings():
                warnings.simplefilter("error")                      # shapes masks are never empty
                result = fn(a, trained.mask)
            for score, v in result.scores.items():
                out[(metric, score, method)] = v.nanmean().item()
    return out


@pytest.mark.parametrize("metric", METRICS)
def test_informed_methods_beat_random_and_centre(means, metric):
    scores = sorted({s for (m, s, _) in means if m == metric})
    for score in scores:
        table = {method: round(means[(metric, score, method)], 4) for method in [*INFORMED, *CONTROLS]}
        for method in INFORMED:
            assert all(table[method] > table[control] for control in CONTROLS), (metric, score, table)
