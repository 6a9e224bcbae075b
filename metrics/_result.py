"""The one result type every metric returns, and which of its scores a leaderboard ranks."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


# scores that describe a run's conditions, not the quality of a map: stored and reported, never ranked
# robustness: share of perturbations that changed the prediction; randomization: the pair of maps was degenerate
CONTEXT_SCORES = ("changed_fraction", "degenerate")


def ranked(score: str) -> bool:
    """Whether a leaderboard ranks methods by `score`: not a per-stage score ("mprt/spearman@fc"), the spread
    of repeated draws ("..._std") or a context score (CONTEXT_SCORES)."""
    return "@" not in score and not score.endswith("_std") and score not in CONTEXT_SCORES


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
