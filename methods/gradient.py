"""Gradient family, thin wrappers over captum."""
from __future__ import annotations

from typing import Literal

import captum.attr
from torch import Tensor, nn


def saliency(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Saliency (Simonyan et al. 2014): |d f_target / d x|."""
    return captum.attr.Saliency(model).attribute(x.detach().requires_grad_(), target=target, abs=True).detach()


def gradient_x_input(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Gradient x Input (Shrikumar et al. 2016): x * d f_target / d x."""
    return captum.attr.InputXGradient(model).attribute(x.detach().requires_grad_(), target=target).detach()


def integrated_gradients(
    model: nn.Module, x: Tensor, target: Tensor, *,
    steps: int = 32,
    baseline: float = 0.0,
    rule: Literal["gausslegendre", "riemann_trapezoid", "riemann_middle"] = "gausslegendre",
    internal_batch_size: int | None = 256,
) -> Tensor:
    """Integrated Gradients (Sundararajan et al. 2017) on the straight path from a constant baseline.

    IG_i = (x_i - x'_i) * integral_0^1 d f_target(x' + a (x - x')) / d x_i da, the
    integral approximated with `steps` nodes of `rule`; completeness: sum_i IG_i
    = f(x) - f(x') up to that approximation. `baseline` is in the normalised input
    space (0.0 = the dataset's mean colour for `shapes`).
    """
    ig = captum.attr.IntegratedGradients(model)
    return ig.attribute(
        x.detach().requires_grad_(), baselines=baseline, target=target,
        n_steps=steps, method=rule, internal_batch_size=internal_batch_size,
    ).detach()                                                     # (B, C, H, W)


def guided_backprop(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Guided Backpropagation (Springenberg et al. 2015): only positive gradients pass each ReLU.

    Needs the model's ReLUs as nn.ReLU modules (captum hooks them); functional relu is not seen.
    """
    return captum.attr.GuidedBackprop(model).attribute(x.detach().requires_grad_(), target=target).detach()
