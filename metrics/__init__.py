"""Evaluation metrics: pure, batched tensor functions returning per-sample scores.

One module per family (metrics/<family>.py); each lists its public functions in its own `__all__`,
and a metric's family is the module that defines it (`family`).
"""
from __future__ import annotations

import functools
from typing import Any

from metrics._map import CONSUMES, REDUCTIONS, consumed, consumes, metric_input, to_map
from metrics._result import Curve, MetricResult
from metrics.axiomatic import *  # noqa: F403
from metrics.faithfulness import *  # noqa: F403
from metrics.localization import *  # noqa: F403
from metrics.randomization import *  # noqa: F403
from metrics import axiomatic, faithfulness, localization, randomization

# the families in the order the report shows them; a module metrics/<family>.py per family
FAMILIES = ("faithfulness", "robustness", "randomization", "localization", "complexity", "axiomatic")


def family(metric: Any) -> str:
    """The family of a metric function (or a functools.partial of one, as Hydra builds them): the name
    of the module of metrics/ that defines it, e.g. "faithfulness" for metrics.pixel_flipping."""
    while isinstance(metric, functools.partial):
        metric = metric.func
    module = getattr(metric, "__module__", "") or ""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "metrics" or parts[1] not in FAMILIES:
        raise ValueError(f"{getattr(metric, '__qualname__', metric)!r} (module {module!r}) is not a metric of "
                         f"one of the families {FAMILIES}: a metric lives in metrics/<family>.py")
    return parts[1]


__all__ = ["CONSUMES", "Curve", "FAMILIES", "MetricResult", "REDUCTIONS", "consumed", "consumes", "family",
           "metric_input", "to_map", *axiomatic.__all__, *faithfulness.__all__, *localization.__all__,
           *randomization.__all__]
