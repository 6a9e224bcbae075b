"""Baselines and the target output, shared by the methods and the metrics (public API).

One vocabulary for `baseline=` everywhere (integrated_gradients, deeplift, expected gradients, ...
and pixel_flipping, deletion, insertion, faithfulness_correlation), in the model's normalised
input space:

- a number: that constant; 0.0 is the normalisation's mean colour (mid-grey on `shapes`), not black;
- "channel_min": each channel at its own minimum over the image's pixels, (B, C, 1, 1): the data's
  black for an image that has black pixels (-mean_c / std_c), Sundararajan et al.'s black image; it
  moves with a constant input shift, so IG from it is input invariant (Kindermans et al. 2019);
- "image_min": the image's minimum over channels and pixels, (B, 1, 1, 1): Quantus' "black";
- "mean": each channel at the image's mean colour, (B, C, 1, 1);
- "blur": the image blurred by a Gaussian of `blur_sigma` px (Sturmfels et al. 2020; RISE's insertion);
- "uniform": one noise field U(0, 1) drawn from `seed` and shared by all samples, scaled to each
  image's [min, max] over channels and pixels, (B, C, H, W);
- a tensor broadcastable to x: used as given.
Each sample's baseline depends on that sample alone. Names of earlier versions ("zeros", "min",
"black") are refused with the name that replaced them.
"""
from __future__ import annotations

from numbers import Real
from typing import Literal, Union

import torch
from torch import Tensor, nn

from metrics.checks import check_classes, check_finite, check_float
from metrics.batching import gaussian_blur

__all__ = ["BASELINES", "BLUR_SIGMA", "Baseline", "baseline_fill", "renamed", "target_output"]

Baseline = Union[float, Literal["channel_min", "image_min", "mean", "blur", "uniform"], Tensor]
BASELINES: tuple[str, ...] = ("channel_min", "image_min", "mean", "blur", "uniform")
BLUR_SIGMA = 5.0                  # px; the `blur` baseline's Gaussian, truncated at 3 sigma
_RENAMED = {"zeros": "0.0 (the same constant)", "min": "'channel_min' (the same baseline)",
            "black": "'image_min' (the same baseline, Quantus' 'black')"}


def renamed(baseline: object) -> str | None:
    """The error message for a baseline name of an earlier version, naming its replacement; else None."""
    if isinstance(baseline, str) and baseline in _RENAMED:
        return (f"baseline {baseline!r} is now called {_RENAMED[baseline]}: methods and metrics share one "
                "vocabulary (metrics.baselines)")
    return None


def baseline_fill(x: Tensor, baseline: Baseline, *, seed: int = 0, blur_sigma: float = BLUR_SIGMA) -> Tensor:
    """The baseline of every sample of x (B, C, H, W), broadcastable to x, on x's device and dtype.

    >>> baseline_fill(torch.tensor([[[[1.0, 4.0]], [[2.0, 3.0]]]]), "channel_min").flatten().tolist()
    [1.0, 2.0]
    """
    if isinstance(baseline, Tensor):
        try:
            torch.broadcast_shapes(baseline.shape, x.shape)
        except RuntimeError:
            raise ValueError(f"a baseline tensor must broadcast to x's shape {tuple(x.shape)}, "
                             f"got {tuple(baseline.shape)}") from None
        check_finite("baseline", baseline, "pass finite replacement values")
        return baseline.to(device=x.device, dtype=x.dtype)
    if isinstance(baseline, Real) and not isinstance(baseline, bool):
        value = check_float("baseline", baseline, meaning=" (a constant in the model's input space)")
        return torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if renamed(baseline):
        raise ValueError(renamed(baseline))
    if not isinstance(baseline, str) or baseline not in BASELINES:
        raise ValueError(f"baseline must be a finite number, a tensor or one of {', '.join(map(repr, BASELINES))}, "
                         f"got {baseline!r}")
    if baseline == "channel_min":
        return x.amin(dim=(2, 3), keepdim=True)                                    # (B, C, 1, 1)
    if baseline == "image_min":
        return x.amin(dim=(1, 2, 3), keepdim=True)                                 # (B, 1, 1, 1)
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True)                                    # (B, C, 1, 1)
    if baseline == "blur":
        check_float("blur_sigma", blur_sigma, 0, low_open=True, meaning=" (pixels)")
        return gaussian_blur(x, blur_sigma)                                       # (B, C, H, W)
    u = torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(seed), dtype=x.dtype).to(x.device)
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    return lo + u * (hi - lo)                                                      # (B, C, H, W)


def target_output(model: nn.Module, x: Tensor, target: Tensor, output: Literal["logit", "softmax"] = "logit", *,
                  check: Tensor | None = None, top1: bool = False) -> Tensor:
    """The model's target logit or softmax probability, (N,); with `top1` also whether the target is the
    model's prediction (argmax, first index on ties), (N, 2). `check`: the batch's targets, checked
    against the number of outputs (a clear error instead of an index error in gather)."""
    out = model(x)
    if check is not None:
        check_classes(check, out.shape[1])
    value = (out.softmax(dim=1) if output == "softmax" else out).gather(1, target[:, None]).squeeze(1)
    if not top1:
        return value
    return torch.stack([value, (out.argmax(dim=1) == target).to(value.dtype)], dim=1)
