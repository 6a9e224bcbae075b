"""Localization: does the map point at the object that decides the class?"""
from __future__ import annotations

import torch
from torch import Tensor

from metrics._result import MetricResult

__all__ = ["pointing_game", "relevance_mass_accuracy"]


def _flatten(attribution: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Check shapes and flatten map and mask to (B, HW)."""
    if attribution.ndim != 3 or mask.shape != attribution.shape:
        raise ValueError(
            f"attribution and mask must both have shape (B, H, W); got {tuple(attribution.shape)} and {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}; pass mask > 0")
    B = attribution.shape[0]
    return attribution.reshape(B, -1), mask.reshape(B, -1)


def pointing_game(attribution: Tensor, mask: Tensor) -> MetricResult:
    """Pointing game (Zhang et al. 2016): is the map's maximum inside the mask?

    With tied maxima the score is the fraction of maximal pixels inside the mask,
    so the result never depends on which index argmax picks; a constant map
    therefore scores the mask's share of the image, as chance does. Empty mask: NaN.
    """
    a, m = _flatten(attribution, mask)                                  # (B, HW)
    is_max = a == a.amax(dim=1, keepdim=True)                           # every tied maximum
    hit = (is_max & m).sum(dim=1) / is_max.sum(dim=1)                   # (B,)
    hit = torch.where(m.any(dim=1), hit.to(attribution.dtype), torch.nan)
    return MetricResult(scores={"hit": hit}, higher_is_better={"hit": True})


def relevance_mass_accuracy(attribution: Tensor, mask: Tensor) -> MetricResult:
    """Relevance mass accuracy (Arras et al. 2022): positive relevance inside the mask / all positive relevance.

    RMA = sum_{p in mask} max(R_p, 0) / sum_p max(R_p, 0). Only positive relevance
    counts, as in the paper. NaN where the map has no positive relevance (the ratio
    is undefined) or the mask is empty.
    """
    a, m = _flatten(attribution, mask)
    positive = a.clamp(min=0)
    total = positive.sum(dim=1)
    rma = (positive * m).sum(dim=1) / total
    rma = torch.where((total > 0) & m.any(dim=1), rma, torch.nan)
    return MetricResult(scores={"rma": rma}, higher_is_better={"rma": True})
