"""Faithfulness: does removing what the map calls relevant change the model's output?"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from metrics._chunk import chunked
from metrics._result import Curve, MetricResult

__all__ = ["pixel_flipping"]


def _check_inputs(model_input: Tensor, target: Tensor, attribution: Tensor) -> None:
    """Shape checks shared by the perturbation metrics."""
    if model_input.ndim != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(model_input.shape)}")
    B, _, H, W = model_input.shape
    if attribution.shape != (B, H, W):
        raise ValueError(
            f"attribution must be a channel-reduced map of shape {(B, H, W)}, got {tuple(attribution.shape)}; "
            "reduce an attribution (B, C, H, W) with metrics.to_map first"
        )
    if target.shape != (B,):
        raise ValueError(f"target must have shape {(B,)}, got {tuple(target.shape)}")
    if not torch.isfinite(attribution).all():
        raise ValueError("attribution contains NaN or Inf; a map must be finite to define an order of pixels")


def _removal_rank(attribution: Tensor, *, descending: bool, seed: int) -> Tensor:
    """Position (0 = first removed) of every pixel; ties broken by one seeded permutation shared by all maps."""
    B, n = attribution.shape[0], attribution[0].numel()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(attribution.device)   # (n,)
    order = attribution.reshape(B, n)[:, perm].argsort(dim=1, descending=descending, stable=True)     # (B, n)
    pixel = perm[order]                                                                               # (B, n)
    rank = torch.empty_like(pixel)
    rank.scatter_(1, pixel, torch.arange(n, device=pixel.device).expand(B, n))
    return rank                                                                                       # (B, n)


def pixel_flipping(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W), already normalised
    target: Tensor,               # (B,)
    attribution: Tensor,          # (B, H, W), channel-reduced map
    *,
    steps: int = 16,
    order: Literal["morf", "lerf"] = "morf",
    baseline: float = 0.0,
    output: Literal["logit", "softmax"] = "logit",
    seed: int = 0,
    chunk_size: int = 256,
) -> MetricResult:
    """Pixel flipping (Bach et al. 2015), scored as AUC and AOPC (Samek et al. 2017).

    Pixels (all channels at once) are removed in `steps` equal groups in the map's
    order, most relevant first (MoRF) or least relevant first (LeRF), and set to
    `baseline` in the normalised input space. f_k is the target output after k
    groups, f_0 the unperturbed input; x_k = ceil(k n / steps) / n is the exact
    fraction removed. AUC = trapezoid of f_k over x_k (x in [0, 1]);
    AOPC = mean over k = 0..steps of (f_0 - f_k). Ties in the map are broken by a
    seeded random permutation of pixel positions, the same for every map, so a
    constant map removes pixels in a random order. Logits are the default output:
    on a near-perfect model the softmax stays saturated at 1 until the object is
    almost gone, which hides the differences between methods.
    """
    _check_inputs(x, target, attribution)
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
    if output not in ("logit", "softmax"):
        raise ValueError(f"output must be 'logit' or 'softmax', got {output!r}")
    B, C, H, W = x.shape
    n, K = H * W, steps + 1
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be between 1 and the number of pixels ({n}), got {steps}")
    rank = _removal_rank(attribution, descending=order == "morf", seed=seed)      # (B, n)
    removed_at = (rank * steps).div(n, rounding_mode="floor") + 1                 # (B, n): step 1..steps

    def forward(i: Tensor) -> Tensor:                                             # i: (N,) flat index into (B, K)
        b, k = i.div(K, rounding_mode="floor"), i % K
        keep = (removed_at[b] > k[:, None]).view(-1, 1, H, W)                     # (N, 1, H, W)
        out = model(torch.where(keep, x[b], torch.as_tensor(baseline, dtype=x.dtype, device=x.device)))
        out = out.softmax(dim=1) if output == "softmax" else out                  # (N, classes)
        return out.gather(1, target[b, None]).squeeze(1)                          # (N,)

    with torch.inference_mode():
        y = chunked(forward, B * K, chunk_size, device=x.device).view(B, K)       # (B, K)
    k = torch.arange(K, device=x.device, dtype=torch.float64)
    frac = (torch.ceil(k * n / steps) / n).to(y.dtype)                            # (K,)
    return MetricResult(
        scores={"auc": torch.trapezoid(y, frac, dim=1), "aopc": (y[:, :1] - y).mean(dim=1)},
        curves={"curve": Curve(frac, y)},
        higher_is_better={"auc": order == "lerf", "aopc": order == "morf"},
    )
