"""Reference-based attributions: Integrated Gradients, Expected Gradients, DeepLIFT and DeepLIFT-SHAP.

Each explains f(x) - f(x') against a reference x' (a baseline, or a distribution of them).
"""
from __future__ import annotations

from typing import Literal

import captum.attr
import torch
from torch import Tensor, nn

from methods._common import (Baseline, attribution_method, baseline_for, generator, input_gradient,
                             value_range)
from metrics._chunk import chunked


@attribution_method
def integrated_gradients(
    model: nn.Module, x: Tensor, target: Tensor, *,
    steps: int = 32,
    baseline: Baseline = 0.0,
    rule: Literal["gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right"] = "gausslegendre",
    blur_sigma: float = 5.0,
    seed: int = 0,
    internal_batch_size: int | None = 256,
) -> Tensor:
    """Integrated Gradients (Sundararajan et al. 2017) on the straight path from a baseline x'.

    IG_i = (x_i - x'_i) * integral_0^1 d f_target(x' + a (x - x')) / d x_i da, the
    integral approximated with `steps` nodes of `rule`; completeness: sum_i IG_i
    = f(x) - f(x') up to that approximation. `baseline`: a number (0.0 = the
    dataset's mean colour for `shapes`), zeros, mean, blur or uniform (see
    methods._common.baseline_for; uniform is drawn from `seed`).
    """
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    ref = baseline_for(x, baseline, seed=seed, blur_sigma=blur_sigma)
    return captum.attr.IntegratedGradients(model).attribute(
        x.requires_grad_(), baselines=ref, target=target, n_steps=steps, method=rule,
        internal_batch_size=internal_batch_size,
    )                                                                              # (B, C, H, W)


def _references(x: Tensor, k: Tensor, baseline: Literal["uniform", "zeros", "mean", "blur"], pattern: Tensor,
                blur_sigma: float) -> Tensor:
    """References for draws k: (K', B, C, H, W); uniform ones rescale the shared pattern to each sample's range."""
    if baseline == "uniform":
        return x.amin(dim=(1, 2, 3), keepdim=True)[None] + value_range(x)[None] * pattern[k][:, None]
    return baseline_for(x, baseline, blur_sigma=blur_sigma)[None].expand(len(k), *x.shape)


def _check_draws(samples: int, baseline: str) -> None:
    if samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples}")
    if baseline not in ("uniform", "zeros", "mean", "blur"):
        raise ValueError(f"baseline must be one of 'uniform', 'zeros', 'mean', 'blur', got {baseline!r}")


@attribution_method
def expected_gradients(
    model: nn.Module, x: Tensor, target: Tensor, *,
    samples: int = 32,
    baseline: Literal["uniform", "zeros", "mean", "blur"] = "uniform",
    noise: float = 0.0,
    blur_sigma: float = 5.0,
    seed: int = 0,
    chunk_size: int = 256,
) -> Tensor:
    """Expected Gradients (Erion et al. 2021) / GradientSHAP (Lundberg & Lee 2017).

    EG_i = mean_k (x_i - x'_k,i) * d f_target(x'_k + a_k (x - x'_k) + sigma e_k) / d x_i,
    a_k ~ U(0, 1), e_k ~ N(0, I), sigma = noise * (max - min) of the sample (noise = 0:
    expected gradients; > 0: captum's GradientShap). The references x'_k are uniform
    noise over the sample's range (no training set reaches a method), or one fixed
    zeros/mean/blur reference. Draws come from `seed` and are shared by all samples.
    """
    _check_draws(samples, baseline)
    g = generator(seed)
    pattern = torch.rand(samples, *x.shape[1:], generator=g).to(x)                # (K, C, H, W)
    alpha = torch.rand(samples, generator=g).to(x)                                # (K,)
    eps = torch.randn(samples, *x.shape[1:], generator=g).to(x) * noise           # (K, C, H, W)
    B, sigma = x.shape[0], value_range(x)

    def contributions(k: Tensor) -> Tensor:                                       # k: (K',) draw indices
        ref = _references(x, k, baseline, pattern, blur_sigma)                     # (K', B, C, H, W)
        a = alpha[k].view(-1, 1, 1, 1, 1)
        point = ref + a * (x[None] - ref) + sigma[None] * eps[k][:, None]
        grad = input_gradient(model, point.flatten(0, 1), target.repeat(len(k))).view_as(ref)
        return ((x[None] - ref) * grad).sum(0, keepdim=True)                      # (1, B, C, H, W)

    return chunked(contributions, samples, max(1, chunk_size // B), device=x.device).sum(0) / samples


@attribution_method
def deeplift(
    model: nn.Module, x: Tensor, target: Tensor, *, baseline: Baseline = 0.0, blur_sigma: float = 5.0, seed: int = 0,
) -> Tensor:
    """DeepLIFT (Shrikumar et al. 2017) with the Rescale rule (captum), against one baseline.

    Completeness (summation-to-delta): sum_i DL_i = f(x) - f(x'). Nonlinearities must
    be modules (nn.ReLU, nn.MaxPool2d, ...); functional calls are treated as linear.
    Baselines as in integrated_gradients.
    """
    ref = baseline_for(x, baseline, seed=seed, blur_sigma=blur_sigma)
    return captum.attr.DeepLift(model).attribute(x.requires_grad_(), baselines=ref, target=target)


@attribution_method
def deeplift_shap(
    model: nn.Module, x: Tensor, target: Tensor, *,
    samples: int = 16,
    baseline: Literal["uniform", "zeros", "mean", "blur"] = "uniform",
    blur_sigma: float = 5.0,
    seed: int = 0,
    chunk_size: int = 256,
) -> Tensor:
    """DeepLIFT-SHAP (Lundberg & Lee 2017): DeepLIFT (Rescale) averaged over `samples` references.

    The references are drawn as in expected_gradients, from `seed`, shared by all
    samples; sum_i attribution_i = f(x) - mean_k f(x'_k).
    """
    _check_draws(samples, baseline)
    pattern = torch.rand(samples, *x.shape[1:], generator=generator(seed)).to(x)  # (K, C, H, W)
    B = x.shape[0]
    dl = captum.attr.DeepLift(model)

    def attributions(k: Tensor) -> Tensor:                                        # k: (K',) draw indices
        ref = _references(x, k, baseline, pattern, blur_sigma).flatten(0, 1)     # (K' B, C, H, W)
        xs = x[None].expand(len(k), *x.shape).flatten(0, 1).clone().requires_grad_()
        a = dl.attribute(xs, baselines=ref, target=target.repeat(len(k)))
        return a.view(len(k), *x.shape).sum(0, keepdim=True).detach()            # (1, B, C, H, W)

    return chunked(attributions, samples, max(1, chunk_size // B), device=x.device).sum(0) / samples
