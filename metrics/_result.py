"""The one result type every metric returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Curve:
    """One curve per sample over a shared x-axis; `labels` names the x positions (e.g. layers)."""

    x: Tensor                                   # (K,)
    y: Tensor                                   # (B, K)
    labels: tuple[str, ...] = ()                # () or K names


@dataclass(frozen=True)
class MetricResult:
    """Per-sample scores, optional curves, and the direction of every score.

    The direction is returned, not fixed on a class, because it can depend on a
    parameter (pixel flipping's AUC is lower-is-better under MoRF only).
    """

    scores: dict[str, Tensor]                   # score name -> (B,)
    curves: dict[str, Curve] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)

    @staticmethod
    def concat(results: list[MetricResult]) -> MetricResult:
        """Join the results of consecutive batches along the sample axis."""
        first = results[0]
        return MetricResult(
            scores={k: torch.cat([r.scores[k] for r in results]) for k in first.scores},
            curves={k: Curve(c.x, torch.cat([r.curves[k].y for r in results]), c.labels) for k, c in first.curves.items()},
            higher_is_better=dict(first.higher_is_better),
        )
