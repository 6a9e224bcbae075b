"""Localization findings on the trained zoo model (the session's `trained` small_cnn on `shapes`):
grad_cam and integrated_gradients beat the `random` control and a centre prior on every
localization metric, each with its configured defaults (conf/metric/*.yaml).

The centre prior is built here, a Gaussian centred on the image (sigma = a quarter of the side),
because the `centre` control method is being added to methods/controls.py in parallel; once it
exists, this comparison should use it through its config instead.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metrics import to_map

CONF = Path(__file__).resolve().parents[1] / "conf"
METRICS = ["pointing_game", "energy_pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy",
           "localization_auc", "top_k_intersection", "attribution_localisation", "iou_at_threshold"]
INFORMED = ["grad_cam", "integrated_gradients"]

pytestmark = pytest.mark.slow


def _centre_prior(x: torch.Tensor) -> torch.Tensor:
    """A Gaussian bump centred on the image, the same for every sample: (B, H, W)."""
    B, _, H, W = x.shape
    y = torch.arange(H, dtype=x.dtype) - (H - 1) / 2
    z = torch.arange(W, dtype=x.dtype) - (W - 1) / 2
    bump = torch.exp(-(y[:, None] ** 2 / (2 * (H / 4) ** 2) + z[None, :] ** 2 / (2 * (W / 4) ** 2)))
    return bump.expand(B, H, W).contiguous()


@pytest.fixture(scope="module")
def means(trained):
    maps = {name: to_map(instantiate(trained.cfg.method[name])(trained.model, trained.x, trained.target), trained.cfg.reduce)
            for name in [*INFORMED, "random"]}
    maps["centre"] = _centre_prior(trained.x)
    out = {}
    for metric in METRICS:
        fn = instantiate(OmegaConf.load(CONF / "metric" / f"{metric}.yaml")[metric])
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
        table = {method: round(means[(metric, score, method)], 4) for method in [*INFORMED, "random", "centre"]}
        for method in INFORMED:
            assert table[method] > table["random"] and table[method] > table["centre"], (metric, score, table)
