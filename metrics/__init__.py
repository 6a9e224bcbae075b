"""Evaluation metrics: pure, batched tensor functions returning per-sample scores.

One module per family; each lists its public functions in its own `__all__`.
"""
from metrics._map import CONSUMES, REDUCTIONS, consumed, consumes, metric_input, to_map
from metrics._result import Curve, MetricResult
from metrics.faithfulness import *  # noqa: F403
from metrics.localization import *  # noqa: F403
from metrics.randomization import *  # noqa: F403
from metrics import faithfulness, localization, randomization

__all__ = ["CONSUMES", "Curve", "MetricResult", "REDUCTIONS", "consumed", "consumes", "metric_input", "to_map",
           *faithfulness.__all__, *localization.__all__, *randomization.__all__]
