"""Evaluation metrics: pure, batched tensor functions returning per-sample scores.

One module per family (metrics/<family>.py), each listing its public functions in its own `__all__`;
a metric's family is the module that defines it, or that module's FAMILY where a family spans several
modules (`family`). metrics.batching (chunking, retry, blur) is public API shared with methods/.
"""
from __future__ import annotations

import functools
import sys
from typing import Any

from metrics._map import CONSUMES, REDUCTIONS, consumed, consumes, metric_input, to_map
from metrics._result import CONTEXT_SCORES, Curve, MetricResult, ranked
from metrics.axiomatic import *  # noqa: F403
from metrics.complexity import *  # noqa: F403
from metrics.faithfulness import *  # noqa: F403
from metrics.faithfulness_estimates import *  # noqa: F403
from metrics.faithfulness_superpixels import *  # noqa: F403
from metrics.localization import *  # noqa: F403
from metrics.mosaic import *  # noqa: F403
from metrics.randomization import *  # noqa: F403
from metrics.robustness import *  # noqa: F403
from metrics import axiomatic, faithfulness, faithfulness_estimates, faithfulness_superpixels, localization, mosaic, randomization, robustness
from metrics.complexity import __all__ as _complexity_all  # the module: its `complexity` function shadows it

# the families in the order the report shows them; a module metrics/<family>.py per family
FAMILIES = ("faithfulness", "robustness", "randomization", "localization", "complexity", "axiomatic")


def family(metric: Any) -> str:
    """The family of a metric function (or a functools.partial of one, as Hydra builds them): the
    FAMILY of the module of metrics/ that defines it, else that module's name, e.g. "faithfulness" for
    metrics.pixel_flipping."""
    while isinstance(metric, functools.partial):
        metric = metric.func
    module = getattr(metric, "__module__", "") or ""
    parts = module.split(".")
    name = getattr(sys.modules.get(module), "FAMILY", parts[-1])
    if len(parts) != 2 or parts[0] != "metrics" or name not in FAMILIES:
        raise ValueError(f"{getattr(metric, '__qualname__', metric)!r} (module {module!r}) is not a metric of "
                         f"one of the families {FAMILIES}: a metric lives in metrics/<family>.py")
    return name


__all__ = ["CONSUMES", "CONTEXT_SCORES", "Curve", "FAMILIES", "MetricResult", "REDUCTIONS", "consumed", "consumes", "family",
           "metric_input", "ranked", "to_map", *axiomatic.__all__, *faithfulness.__all__, *faithfulness_estimates.__all__, *faithfulness_superpixels.__all__, *localization.__all__, *mosaic.__all__,
           *randomization.__all__, *robustness.__all__, *_complexity_all]
