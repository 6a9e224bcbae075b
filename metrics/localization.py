"""Localization: does the map point at the object that decides the class?

Every metric takes the map (B, H, W) and the ground-truth mask (B, H, W) bool, and the
same option `sign` for how the map is read:

- "signed" (default): the map as it is. The sign is part of an explanation's claim
  (negative = evidence against the class), so ranks keep counter-evidence last and a map
  is never rewarded for pointing at what speaks against the class. With a non-negative
  channel reduction (the default `abs_sum`) all three choices coincide.
- "positive": max(R, 0); negative evidence is flattened to ties at zero.
- "absolute": |R|; evidence for and against counts alike (Quantus' default for
  AttributionLocalisation, and what `abs_sum` does per channel).

Mass-based scores (energy_pointing_game, relevance_mass_accuracy,
attribution_localisation) count only positive mass, as their papers do, so "signed" and
"positive" give the same number there. Ranking scores are exact under ties: a tie is
shared fractionally, i.e. the score is the expectation over every order of the tied
pixels, never the pick of an unstable argsort. An empty mask gives NaN and a warning; a map
with a NaN or Inf is refused (ValueError), since a NaN has no rank and would shift every score.

Every metric here ranks or locates pixels and consumes the run's reduced map (metrics._map).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor

from metrics.checks import check_bool, check_choice, check_finite, check_float, check_int, check_target
from metrics._rank import _sorted_keys, _twice_u
from metrics._result import MetricResult
from metrics.batching import chunked

__all__ = [
    "pointing_game", "energy_pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy",
    "localization_auc", "top_k_intersection", "attribution_localisation", "iou_at_threshold", "class_mean",
]

Sign = Literal["signed", "positive", "absolute"]
SIGNS: tuple[str, ...] = ("signed", "positive", "absolute")


def _flatten(attribution: Tensor, mask: Tensor, sign: str = "signed") -> tuple[Tensor, Tensor]:
    """Check shapes, finiteness and `sign`, read the map as `sign` says, flatten both to (B, HW); warn on
    empty masks."""
    if attribution.ndim != 3 or mask.shape != attribution.shape:
        raise ValueError(
            f"attribution and mask must both have shape (B, H, W); got {tuple(attribution.shape)} and {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}; pass mask > 0")
    check_choice("sign", sign, SIGNS)
    check_finite("attribution", attribution, "a map must be finite to rank or locate its pixels (a NaN has no "
                 "rank); fix the method or drop these samples")
    B = attribution.shape[0]
    a = attribution.reshape(B, -1)
    a = a.clamp(min=0) if sign == "positive" else a.abs() if sign == "absolute" else a
    m = mask.reshape(B, -1)
    empty = int((~m.any(dim=1)).sum())
    if empty:
        warnings.warn(f"{empty} of {B} masks are empty: their localization scores are NaN", stacklevel=3)
    return a, m


def _by_sample(fn: Callable[[Tensor], Tensor], B: int, chunk_size: int, device: torch.device) -> Tensor:
    """Run fn on sample indices, `chunk_size` samples at a time (the sort-based metrics' memory bound)."""
    return chunked(fn, B, chunk_size, device=device) if B else torch.empty(0, device=device)


def _top_k_hits(a: Tensor, m: Tensor, k: Tensor) -> Tensor:
    """Expected number of mask pixels among the k largest of each row, ties at the k-th value shared
    fractionally; a (N, HW), m (N, HW) bool, k (N,) long in 1..HW -> (N,) float64.

    One topk of width max(k) + 1 answers every row whose k-th and (k+1)-th largest values differ
    (the top k are then one set, whatever the order of ties inside it); only rows with a tie
    across the k-th place are counted over the whole row."""
    N, n = a.shape
    width = min(int(k.max()) + 1, n)
    vals, idx = a.topk(width, dim=1)                                        # (N, width) descending
    head = torch.arange(width, device=a.device) < k[:, None]                # (N, width) the first k places
    hits = (m.gather(1, idx) & head).sum(dim=1).double()
    t = vals.gather(1, (k - 1)[:, None])                                    # (N, 1) the k-th largest
    across = ((k < n) & (vals.gather(1, k.clamp(max=width - 1)[:, None]) == t).squeeze(1)).nonzero().squeeze(1)
    if across.numel():
        a, m, k, t = a[across], m[across], k[across], t[across]
        above, tied = a > t, a == t                                         # (T, HW) each
        g, g_in = above.sum(dim=1), (above & m).sum(dim=1)
        e, e_in = tied.sum(dim=1), (tied & m).sum(dim=1)
        hits[across] = g_in.double() + (k - g).double() * e_in.double() / e.double()
    return hits


def _count(b: Tensor) -> Tensor:
    """True entries per row of a bool (B, n) tensor, (B,) int64. On CPU numpy's vectorised byte sum:
    0.009 s for 1000 x 224^2 on the reference machine, where torch's bool sum takes 0.17 s."""
    if b.device.type == "cpu":
        return torch.from_numpy(b.numpy().view(np.uint8).sum(axis=1, dtype=np.int32)).long()
    return b.sum(dim=1)


def _positive_share(a: Tensor, region: Tensor) -> tuple[Tensor, Tensor]:
    """Share of positive mass inside `region`, and whether it is defined (some positive mass)."""
    positive = a.clamp(min=0)                                               # (B, HW)
    total = positive.sum(dim=1)
    return torch.where(region, positive, 0).sum(dim=1) / total, total > 0   # where: faster than * bool


def pointing_game(
    attribution: Tensor, mask: Tensor, *, tolerance: float = 0.0, sign: Sign = "signed", chunk_size: int = 65536
) -> MetricResult:
    """Pointing game (Zhang et al. 2016/2018): is the map's maximum on the object?

    A point hits when it lies in the mask or closer than `tolerance` pixels (Euclidean,
    strict: |p - q|^2 < tolerance^2, as TorchRay) to a mask pixel; Zhang et al. and TorchRay
    use 15 px at 224 px. With tied maxima the score is the fraction of maximal pixels that hit
    (TorchRay takes one maximiser), so ties neither help nor hurt and a constant map scores what
    chance does (the mask's share, at tolerance 0). Empty mask: NaN (TorchRay skips the pair).
    Zhang et al. and TorchRay report the mean over classes of each class's hit rate, not the
    mean over samples: `class_mean(hit, target)` gives it (CLASS_MEAN_SCORES tells a report which
    scores have one). `chunk_size` bounds the tied maxima checked at once.
    """
    check_float("tolerance", tolerance, 0, meaning=" (pixels)")
    check_int("chunk_size", chunk_size, 1)
    a, m = _flatten(attribution, mask, sign)                             # (B, HW)
    is_max = a == a.amax(dim=1, keepdim=True)                            # every tied maximum
    if tolerance == 0:
        hits = _count(is_max & m).to(attribution.dtype)
    else:
        B, H, W = mask.shape
        R = math.ceil(tolerance) - 1                                     # |dx| < tolerance
        rows = torch.arange(H, device=mask.device, dtype=attribution.dtype)[:, None]   # (H, 1)
        inf = torch.tensor(math.inf, device=mask.device, dtype=attribution.dtype)
        above = torch.where(mask, rows, -inf).cummax(dim=1).values        # (B, H, W): last mask row <= y
        below = torch.where(mask, rows, inf).flip(1).cummin(dim=1).values.flip(1)   # first mask row >= y
        column = torch.minimum(rows - above, below - rows)                # (B, H, W) vertical distance in column
        column = torch.nn.functional.pad(column, (R, R), value=math.inf)  # (B, H, W + 2R)
        b, flat = is_max.nonzero(as_tuple=True)                           # (T,) each: all tied maxima
        dx = torch.arange(-R, R + 1, device=mask.device)                   # (2R + 1,)

        def near(i: Tensor) -> Tensor:                                    # i: (N,) index into the T maxima
            y, x = flat[i] // W, flat[i] % W
            d = column[b[i, None], y[:, None], x[:, None] + dx + R]        # (N, 2R + 1)
            return ((d * d + (dx * dx).to(d.dtype)).amin(dim=1) < tolerance**2).to(attribution.dtype)

        hit_each = chunked(near, b.numel(), chunk_size, device=mask.device)   # (T,)
        hits = torch.zeros(B, dtype=attribution.dtype, device=mask.device).index_add_(0, b, hit_each)
    hit = hits / _count(is_max)                                          # (B,)
    hit = torch.where(m.any(dim=1), hit.to(attribution.dtype), torch.nan)
    return MetricResult(scores={"hit": hit}, higher_is_better={"hit": True})


# Scores whose paper reports the mean over classes (class_mean), by the metric's `_target_`.
CLASS_MEAN_SCORES: dict[str, tuple[str, ...]] = {"metrics.pointing_game": ("hit",),
                                                 "metrics.localization.pointing_game": ("hit",)}


def class_mean(scores: Tensor, target: Tensor) -> Tensor:
    """Mean over classes of each class's mean score: TorchRay's PointingGame.accuracy, the mean of
    hits_c / (hits_c + misses_c) over classes c (Zhang et al. 2018).

    scores (N,) over a whole evaluation set (NaN = undefined, skipped as TorchRay skips a pair),
    target (N,) their classes -> a 0-dim tensor. Classes with no defined score are left out;
    TorchRay averages over all of a dataset's classes and counts such a class as 0 (the same when
    every class occurs). NaN when no score is defined. Equals the sample mean when classes are
    balanced. An aggregation for reports, not a per-sample metric.
    """
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape (N,), got {tuple(scores.shape)}")
    target = check_target(target, scores.shape[0])
    if bool((target < 0).any()):
        raise ValueError(f"target must hold class indices >= 0, got {sorted(set(target[target < 0].tolist()))[:5]}")
    defined = ~scores.isnan()
    t, v = target[defined], scores[defined].double()
    if not t.numel():
        return torch.tensor(torch.nan, dtype=scores.dtype, device=scores.device)
    n = torch.bincount(t)                                                # (classes,) defined scores per class
    total = torch.zeros(n.shape, dtype=torch.float64, device=scores.device).index_add_(0, t, v)
    present = n > 0
    return (total[present] / n[present]).mean().to(scores.dtype)


def energy_pointing_game(attribution: Tensor, mask: Tensor, *, box: bool = True, sign: Sign = "signed") -> MetricResult:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM): share of the map's energy on the object.

    energy = sum_{p in region} max(R_p, 0) / sum_p max(R_p, 0). Wang et al. score bounding
    boxes, so by default the region is the mask's tight bounding box (the same thing when
    the dataset's masks are boxes); box=False uses the mask itself, which equals
    relevance_mass_accuracy. NaN where the mask is empty or the map has no positive energy.
    """
    check_bool("box", box)
    a, m = _flatten(attribution, mask, sign)
    if box:
        rows, cols = mask.any(dim=2), mask.any(dim=1)                    # (B, H), (B, W)
        # a row lies in the box when some mask row is at or above it and some at or below it
        rows = rows.cummax(dim=1).values & rows.flip(1).cummax(dim=1).values.flip(1)
        cols = cols.cummax(dim=1).values & cols.flip(1).cummax(dim=1).values.flip(1)
        m = (rows[:, :, None] & cols[:, None, :]).reshape(m.shape)        # (B, HW)
    energy, defined = _positive_share(a, m)
    energy = torch.where(defined & m.any(dim=1), energy, torch.nan)
    return MetricResult(scores={"energy": energy}, higher_is_better={"energy": True})


def relevance_mass_accuracy(attribution: Tensor, mask: Tensor, *, sign: Sign = "signed") -> MetricResult:
    """Relevance mass accuracy (Arras et al. 2022): positive relevance inside the mask / all positive relevance.

    RMA = sum_{p in mask} max(R_p, 0) / sum_p max(R_p, 0). Only positive relevance
    counts, as in the paper. NaN where the map has no positive relevance (the ratio
    is undefined) or the mask is empty.
    """
    a, m = _flatten(attribution, mask, sign)
    rma, defined = _positive_share(a, m)
    rma = torch.where(defined & m.any(dim=1), rma, torch.nan)
    return MetricResult(scores={"rma": rma}, higher_is_better={"rma": True})


def relevance_rank_accuracy(
    attribution: Tensor, mask: Tensor, *, sign: Sign = "signed", chunk_size: int = 256
) -> MetricResult:
    """Relevance rank accuracy (Arras et al. 2022): share of the K top-ranked pixels inside the mask, K = |mask|.

    RRA = |top_K(R) ∩ mask| / K. Pixels tied with the K-th largest value are shared
    fractionally (the expectation over their orders), so a constant map scores K / HW,
    chance. Empty mask: NaN. Memory is bounded by `chunk_size` samples per sort.
    """
    check_int("chunk_size", chunk_size, 1)
    a, m = _flatten(attribution, mask, sign)
    size = _count(m)                                                      # (B,) K per sample

    def rra(i: Tensor) -> Tensor:
        k = size[i].clamp(min=1)
        return _top_k_hits(a[i], m[i], k) / k

    out = _by_sample(rra, a.shape[0], chunk_size, a.device).to(attribution.dtype)
    out = torch.where(size > 0, out, torch.nan)
    return MetricResult(scores={"rra": out}, higher_is_better={"rra": True})


def localization_auc(attribution: Tensor, mask: Tensor, *, sign: Sign = "signed", chunk_size: int = 256) -> MetricResult:
    """ROC-AUC of the map as a pixel classifier of the mask (used by Quantus' AUC, Fawcett 2006).

    AUC = P(R_in > R_out) + P(R_in = R_out) / 2 over pixel pairs (Mann-Whitney U / (P Q)):
    ties count one half, as sklearn's roc_auc_score, so a constant map scores 0.5. Exact: each
    row is sorted once by the integer key 2 * value + in-mask, and U is read off the sorted
    keys. NaN where the mask is empty or covers every pixel.
    """
    check_int("chunk_size", chunk_size, 1)
    a, m = _flatten(attribution, mask, sign)

    def auc(i: Tensor) -> Tensor:
        keys = _sorted_keys(a[i], m[i])
        twice_u, p = (torch.cat(t) for t in zip(*map(_twice_u, keys.split(64))))   # 64 rows stay in cache
        p, q = p.double(), keys.shape[1] - p.double()                   # pixels inside, outside (N,)
        return torch.where((p > 0) & (q > 0), twice_u.double() / (2 * p * q), torch.nan)

    out = _by_sample(auc, a.shape[0], chunk_size, a.device).to(attribution.dtype)
    return MetricResult(scores={"auc": out}, higher_is_better={"auc": True})


def _pixels(k: int | float, n: int, name: str) -> int:
    """Turn `k` (a pixel count, or a float fraction of n pixels) into a count in 1..n."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"{name} must be an int (pixels) or a float in (0, 1] (fraction), got {k!r}")
    if isinstance(k, float):
        if not 0 < k <= 1:
            raise ValueError(f"{name} as a float is a fraction of the pixels and must lie in (0, 1], got {k!r}")
        return max(1, math.ceil(k * n - 1e-9))
    if not 1 <= k <= n:
        raise ValueError(f"{name} as an int counts pixels and must lie in 1..{n} (H*W), got {k!r}")
    return k


def top_k_intersection(
    attribution: Tensor, mask: Tensor, *, k: int | float = 0.05, concept_influence: bool = False,
    sign: Sign = "signed", chunk_size: int = 256,
) -> MetricResult:
    """Top-k intersection (Theiner et al. 2021): share of the k top-ranked pixels inside the mask.

    TKI = |top_k(R) ∩ mask| / k; with `concept_influence`, TKI * HW / |mask| (1 = chance).
    `k` is a pixel count (int; Theiner et al. and Quantus use 1000 at 224 x 224, 2 %) or a
    fraction of H*W (float, rounded up). Ties at the k-th value are shared fractionally.
    Empty mask: NaN.
    """
    check_bool("concept_influence", concept_influence)
    check_int("chunk_size", chunk_size, 1)
    a, m = _flatten(attribution, mask, sign)
    B, n = a.shape
    kk = _pixels(k, n, "k")
    size = _count(m)

    def tki(i: Tensor) -> Tensor:
        return _top_k_hits(a[i], m[i], torch.full_like(i, kk)) / kk

    out = _by_sample(tki, B, chunk_size, a.device)
    if concept_influence:
        out = out * n / size.double()
    out = torch.where(size > 0, out.to(attribution.dtype), torch.nan)
    return MetricResult(scores={"tki": out}, higher_is_better={"tki": True})


def attribution_localisation(attribution: Tensor, mask: Tensor, *, sign: Sign = "signed") -> MetricResult:
    """Attribution localisation (Kohlbrenner et al. 2020): inside-total ratio of positive relevance.

    mu = sum_{p in mask} max(R_p, 0) / sum_p max(R_p, 0), and the size-weighted
    mu_weighted = mu * HW / |mask|, so a uniform map scores 1 and small objects are not
    penalised for being small. (Quantus 0.6 multiplies by |mask| / size instead.) NaN
    where the mask is empty or the map has no positive relevance.
    """
    a, m = _flatten(attribution, mask, sign)
    mu, defined = _positive_share(a, m)
    size = _count(m)
    mu = torch.where(defined & (size > 0), mu, torch.nan)
    weighted = mu * (m.shape[1] / size.to(mu.dtype))
    return MetricResult(scores={"mu": mu, "mu_weighted": weighted},
                        higher_is_better={"mu": True, "mu_weighted": True})


def iou_at_threshold(
    attribution: Tensor, mask: Tensor, *, fraction: float = 0.1, sign: Sign = "signed", chunk_size: int = 256
) -> MetricResult:
    """IoU of the map binarised at its top `fraction` of pixels with the mask (weakly-supervised localization).

    S = the k = ceil(fraction * HW) top-ranked pixels; IoU = |S ∩ mask| / |S ∪ mask|.
    Pixels tied at the threshold enter S fractionally (each with the share of the k
    places left for them), so the score is order-free and exact without ties. Empty mask: NaN.
    """
    check_int("chunk_size", chunk_size, 1)
    a, m = _flatten(attribution, mask, sign)
    B, n = a.shape
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"fraction must be a float in (0, 1], the share of pixels kept, got {fraction!r}")
    kk = _pixels(float(fraction), n, "fraction")
    size = _count(m).double()

    def iou(i: Tensor) -> Tensor:
        inter = _top_k_hits(a[i], m[i], torch.full_like(i, kk))
        return inter / (kk + size[i] - inter)

    out = _by_sample(iou, B, chunk_size, a.device)
    out = torch.where(size > 0, out.to(attribution.dtype), torch.nan)
    return MetricResult(scores={"iou": out}, higher_is_better={"iou": True})
