"""IROF, iterative removal of features (Rieger & Hansen 2020): pixel flipping over superpixels.

Superpixels are SLIC segments (Achanta et al. 2012) as in the paper and Quantus, computed by
scikit-image on the CPU, one image at a time (segmentation has no batched implementation there;
the model's forward passes, which dominate, are batched over samples and steps), or passed in
precomputed as `segments` (B, H, W) integer labels.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from metrics.checks import check_float, check_int
from metrics._perturb import _check_inputs, _perturbation_curves, _removal_rank, _static_fill
from metrics.baselines import Baseline, baseline_fill
from metrics._result import MetricResult
from metrics.faithfulness import _check_options

__all__ = ["irof", "slic_segments"]
FAMILY = "faithfulness"


def slic_segments(x: Tensor, *, n_segments: int = 100, compactness: float = 10.0) -> Tensor:
    """SLIC superpixels of every image of x (B, C, H, W): (B, H, W) int64 labels 0..K_b - 1, on x's device.

    scikit-image's slic with its defaults otherwise (10 iterations, no smoothing, CIELAB for three
    channels, connected segments): the call Quantus makes (quantus.helpers.utils.get_superpixel_segments).
    """
    from skimage.segmentation import slic

    n_segments = check_int("n_segments", n_segments, 2, meaning=" (the number of superpixels SLIC aims for)")
    compactness = check_float("compactness", compactness, 0, low_open=True, meaning=" (SLIC's colour-space "
                              "against spatial weight)")
    images = np.moveaxis(x.detach().cpu().double().numpy(), 1, -1)                        # (B, H, W, C)
    labels = [slic(img, n_segments=n_segments, compactness=compactness, start_label=0) for img in images]
    return torch.as_tensor(np.stack(labels), dtype=torch.long, device=x.device)


def _relabel(segments: Tensor) -> tuple[Tensor, Tensor]:
    """Labels made 0..K_b - 1 per image (order kept): (B, HW) labels and (B,) counts K_b."""
    B = segments.shape[0]
    s = segments.reshape(B, -1).long()
    s = s - s.amin(dim=1, keepdim=True)
    key = s + torch.arange(B, device=s.device)[:, None] * (s.amax() + 1)                   # (B, HW) unique per image
    uniq, inverse = torch.unique(key, return_inverse=True)                                 # sorted: image by image
    counts = torch.bincount(uniq.div(s.amax() + 1, rounding_mode="floor"), minlength=B)    # (B,) segments per image
    first = counts.cumsum(0) - counts                                                      # (B,) id of image b's first
    return inverse - first[:, None], counts


def irof(
    model: nn.Module, x: Tensor, target: Tensor, attribution: Tensor, *,
    segments: Tensor | None = None, n_segments: int = 100, compactness: float = 10.0,
    baseline: Baseline = "mean", output: Literal["logit", "softmax"] = "softmax",
    seed: int = 0, chunk_size: int | None = None,
) -> MetricResult:
    """IROF (Rieger & Hansen 2020): area over the curve of f(x_l) / f(x) as superpixels go, most relevant first.

    The image's K superpixels (SLIC, or `segments`) are ranked by the map's mean over each (ties:
    seeded permutation) and removed cumulatively, replaced by `baseline` (default: each image's
    per-channel mean, the paper's mean value); x_l has the l most relevant removed. With
    r_l = f(x_l) / f(x_0) (the paper's class probability by default),
    IROF = 1 - trapezoid of r_l over l / K, l = 0..K, so a sharp early drop scores near 1.
    Quantus' AOC, K - trapezoid(r_1..r_K, dx=1), is K IROF + (1 + r_1) / 2: the same curve on a
    scale of K. Higher is better; NaN where f(x_0) = 0.
    """
    target = _check_inputs(x, target, attribution)
    _check_options(output, seed)
    B, C, H, W = x.shape
    if segments is None:
        segments = slic_segments(x, n_segments=n_segments, compactness=compactness)
    elif not isinstance(segments, Tensor) or segments.shape != (B, H, W) or segments.is_floating_point():
        got = f"{segments.dtype} {tuple(segments.shape)}" if isinstance(segments, Tensor) else type(segments).__name__
        raise ValueError(f"segments must be an integer tensor of superpixel labels, shape {(B, H, W)}, got {got}")
    seg, K = _relabel(segments.to(x.device))                                              # (B, HW), (B,)
    L = int(K.max())
    a = attribution.reshape(B, H * W).double()
    total = torch.zeros(B, L, dtype=a.dtype, device=a.device).scatter_add_(1, seg, a)
    size = torch.zeros(B, L, dtype=a.dtype, device=a.device).scatter_add_(1, seg, torch.ones_like(a))
    mean = torch.where(size > 0, total / size.clamp_min(1), -torch.inf)                   # (B, L): absent last
    rank = _removal_rank(mean, descending=True, seed=seed)                                # (B, L)
    removed_at = (rank.gather(1, seg) + 1).to(torch.int32)                                # (B, HW) in 1..K_b
    fill = _static_fill(baseline_fill(x, baseline, seed=seed))
    y = _perturbation_curves(model, x, target, removed_at[None], fill, steps=L, insert=False, output=output,
                             chunk_size=chunk_size)                                       # (B, 1 + L)
    r = torch.where(y[:, :1] != 0, y / y[:, :1], torch.nan)                               # (B, 1 + L)
    valid = torch.arange(1, L + 1, device=x.device)[None] <= K[:, None]                   # (B, L)
    area = torch.where(valid, (r[:, 1:] + r[:, :-1]) / 2, 0.0).sum(dim=1) / K.to(r.dtype)
    return MetricResult(scores={"irof": (1 - area).to(x.dtype)}, higher_is_better={"irof": True})
