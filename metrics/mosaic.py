"""Localization on 2x2 mosaics: Focus (Arias-Duart et al. 2022).

A mosaic holds four images in a 2x2 grid; some quadrants show the target class, the others
other classes. The mask marks the target quadrants (bench.data.ShapesMosaic gives it), so
focus consumes the run's map and `mask` like every other localization metric.
"""
from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor

from metrics.checks import check_choice, check_finite
from metrics._result import MetricResult

__all__ = ["focus"]

FAMILY = "localization"
Sign = Literal["signed", "positive", "absolute"]


def _quadrants(mask: Tensor) -> Tensor:
    """The 2x2 layout of a quadrant mask (B, H, W) bool -> (B, 2, 2) bool, [row, column] of the mosaic.

    ValueError unless H and W are even and every quadrant is wholly inside or wholly outside the mask.
    """
    B, H, W = mask.shape
    if H % 2 or W % 2:
        raise ValueError(f"focus scores 2x2 mosaics: H and W must be even (four equal quadrants), got {H}x{W}")
    q = mask.reshape(B, 2, H // 2, 2, W // 2).transpose(2, 3).flatten(3)    # (B, 2, 2, HW/4)
    inside, whole = q.any(dim=3), q.all(dim=3)
    if not torch.equal(inside, whole):
        b = int((inside != whole).flatten(1).any(dim=1).nonzero()[0])
        raise ValueError(f"focus needs a mask that marks whole quadrants of a 2x2 mosaic (the target class's "
                         f"images), but sample {b} has a quadrant partly inside the mask; use a mosaic dataset "
                         f"(dataset=shapes_mosaic), not an object mask")
    return inside


def focus(attribution: Tensor, mask: Tensor, *, sign: Sign = "signed") -> MetricResult:
    """Focus (Arias-Duart et al. 2022): share of positive relevance on the target class's images of a mosaic.

    Focus = sum_{p in target quadrants} max(R_p, 0) / sum_p max(R_p, 0), the probability that a
    pixel drawn in proportion to its positive relevance lies on an image of the target class; chance
    is the target quadrants' share of the mosaic (2/4 on shapes_mosaic). `mask` (B, H, W) marks the
    target quadrants (checked: whole quadrants of an even-sized map). sign="absolute" reads |R|
    (Quantus' abs=True). NaN where the map has no positive relevance or no quadrant is a target
    (Quantus adds 1e-9 to the denominator and gives 0).

    >>> a = torch.tensor([[[4., 0.], [-1., 1.]]]); m = torch.tensor([[[True, False], [True, False]]])
    >>> focus(a, m).scores["focus"]
    tensor([0.8000])
    """
    if attribution.ndim != 3 or mask.shape != attribution.shape:
        raise ValueError(f"attribution and mask must both have shape (B, H, W); got {tuple(attribution.shape)} "
                         f"and {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}; pass mask > 0")
    check_choice("sign", sign, ("signed", "positive", "absolute"))
    check_finite("attribution", attribution, "focus sums relevance, which a NaN or Inf makes undefined; fix the "
                 "method or drop these samples")
    targets = _quadrants(mask).flatten(1)                                    # (B, 4)
    empty = int((~targets.any(dim=1)).sum())
    if empty:
        warnings.warn(f"{empty} of {len(mask)} mosaics have no target quadrant: their focus is NaN", stacklevel=2)
    a = attribution.abs() if sign == "absolute" else attribution.clamp(min=0)   # (B, H, W) positive relevance
    total = a.flatten(1).sum(dim=1)                                         # (B,)
    inside = torch.where(mask, a, 0).flatten(1).sum(dim=1)                  # (B,)
    score = torch.where((total > 0) & targets.any(dim=1), inside / total, torch.nan)
    return MetricResult(scores={"focus": score}, higher_is_better={"focus": True})
