"""Complexity: how many features does the map spread its relevance over? Fewer is easier to read.

Every metric here reads the magnitudes |a_i| of the run's reduced map (B, H, W): the features are
the pixels of the map the user sees, and the run's `reduce` (in its manifest) makes that map
(consumes "reduced"; with the default abs_sum the magnitudes are the map itself). Quantus passes
the same per-pixel map and also takes |a| (abs=True) for all three. A sample's score depends on
its own map alone: no normalisation across the batch (Quantus' normalise=True divides by one
maximum over the whole batch). Scores are computed in float64 and returned in the map's dtype.
NaN policy: an all-zero map has no distribution of relevance, so its Gini index and entropy are
NaN; its effective complexity is 0. A map with a NaN or Inf is refused (ValueError).
"""
from __future__ import annotations

import torch
from torch import Tensor

from metrics.checks import check_bool, check_finite, check_float
from metrics._map import consumes
from metrics._result import MetricResult

__all__ = ["sparseness", "complexity", "effective_complexity"]


def _magnitudes(attribution: Tensor) -> Tensor:
    """|a| of each map, flattened to (B, n) in float64, after the shape and finiteness checks."""
    if not isinstance(attribution, Tensor) or attribution.ndim != 3 or not attribution.is_floating_point():
        raise ValueError(f"attribution must be a float map of shape (B, H, W), got "
                         f"{tuple(getattr(attribution, 'shape', ()))}; reduce an attribution (B, C, H, W) with "
                         "metrics.to_map first")
    if attribution.shape[0] == 0 or attribution[0].numel() == 0:
        raise ValueError(f"attribution holds no samples or no pixels (shape {tuple(attribution.shape)})")
    check_finite("attribution", attribution, "a map must be finite to measure its complexity; fix the method or "
                 "drop these samples")
    return attribution.reshape(attribution.shape[0], -1).double().abs()


def _normalised(a: Tensor) -> tuple[Tensor, Tensor]:
    """(a / max_i a_i, whether the map has any relevance); an all-zero map stays 0 (scale-free scores)."""
    top = a.amax(dim=1, keepdim=True)                                              # (B, 1)
    return a / top.clamp_min(torch.finfo(a.dtype).tiny), top[:, 0] > 0


@consumes("reduced")
def sparseness(attribution: Tensor) -> MetricResult:
    """Sparseness (Chalasani et al. 2020): the Gini index of the map's magnitudes.

    With |a| sorted ascending, |a|_(1) <= ... <= |a|_(n), over the n pixels:
    G = sum_i (2i - n - 1) |a|_(i) / (n sum_i |a|_(i)), in [0, 1 - 1/n]: 0 for a constant map (all
    pixels equally relevant), 1 - 1/n for a one-hot map. Higher is sparser (better). Scale-free;
    NaN for an all-zero map. Quantus adds 1e-7 to every |a|_i before sorting (so its zero map gives
    0 and its one-hot map slightly less than 1 - 1/n); we do not.

    >>> sparseness(torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])).scores["gini"]
    tensor([0.7500])
    """
    a, alive = _normalised(_magnitudes(attribution))
    n = a.shape[1]
    a = a.sort(dim=1).values                                                       # (B, n) ascending
    weight = 2 * torch.arange(1, n + 1, device=a.device, dtype=a.dtype) - n - 1    # (n,)
    gini = (a * weight).sum(dim=1) / (n * a.sum(dim=1)).clamp_min(torch.finfo(a.dtype).tiny)
    gini = torch.where(alive, gini, torch.nan).to(attribution.dtype)
    return MetricResult(scores={"gini": gini}, higher_is_better={"gini": True})


@consumes("reduced")
def complexity(attribution: Tensor) -> MetricResult:
    """Complexity (Bhatt et al. 2020): the entropy of the map's fractional contributions.

    P_i = |a_i| / sum_j |a_j| over the n pixels; entropy = -sum_i P_i ln P_i (natural log, 0 ln 0 = 0),
    in [0, ln n]: 0 for a one-hot map, ln n for a constant one. Lower is simpler (better).
    Scale-free; NaN for an all-zero map. Quantus computes -sum P_i ln(P_i + 1e-12), which differs
    by at most about 1e-12 n.

    >>> complexity(torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])).scores["entropy"]   # ln 2
    tensor([0.6931])
    """
    a, alive = _normalised(_magnitudes(attribution))
    p = a / a.sum(dim=1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)       # (B, n)
    entropy = -torch.xlogy(p, p).sum(dim=1)
    entropy = torch.where(alive, entropy, torch.nan).to(attribution.dtype)
    return MetricResult(scores={"entropy": entropy}, higher_is_better={"entropy": False})


@consumes("reduced")
def effective_complexity(attribution: Tensor, *, eps: float = 1e-5, relative: bool = True) -> MetricResult:
    """Effective complexity (Nguyen & Martínez 2020), in the count form Quantus 0.6 computes.

    count = #{i : |a_i| > eps · max_j |a_j|} with `relative` (default: the threshold is a share of
    each map's own maximum, so the count does not depend on the method's units), or
    #{i : |a_i| > eps} without. Lower is simpler (better); 0 for an all-zero map, n for a constant
    non-zero one (eps < 1). Quantus' default normalise=True divides by the maximum over the whole
    batch instead, so per sample the two agree on a map whose maximum is the batch's (tests).

    >>> effective_complexity(torch.tensor([[[1.0, 0.5], [1e-6, 0.0]]])).scores["count"]
    tensor([2.])
    """
    eps = check_float("eps", eps, 0, meaning=" (the share of the map's maximum, or with relative=false the "
                      "magnitude, that a pixel's |a| must exceed to count)")
    check_bool("relative", relative)
    a = _magnitudes(attribution)
    if relative:
        a = _normalised(a)[0]
    count = (a > eps).sum(dim=1).to(attribution.dtype)
    return MetricResult(scores={"count": count}, higher_is_better={"count": False})
