"""Evaluation metrics: pure, batched tensor functions returning per-sample scores."""
from metrics._map import REDUCTIONS, to_map
from metrics._result import Curve, MetricResult
from metrics.faithfulness import pixel_flipping
from metrics.localization import pointing_game, relevance_mass_accuracy
from metrics.randomization import mprt, randomization_layers, spearman

__all__ = [
    "Curve", "MetricResult", "REDUCTIONS", "to_map",
    "pixel_flipping", "mprt", "randomization_layers", "spearman",
    "pointing_game", "relevance_mass_accuracy",
]
