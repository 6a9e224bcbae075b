"""Gradient family: plain, noise-averaged (SmoothGrad and kin) and modified-backward (guided, deconv) gradients."""
from __future__ import annotations

import captum.attr
import torch
from torch import Tensor, nn

from methods._common import attribution_method, generator, input_gradient, value_range
from metrics.batching import chunked, draws_per_pass


@attribution_method
def gradient(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Gradient (Simonyan et al. 2014), signed: d f_target / d x."""
    return input_gradient(model, x, target)


@attribution_method
def saliency(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Saliency (Simonyan et al. 2014): |d f_target / d x|."""
    return captum.attr.Saliency(model).attribute(x.requires_grad_(), target=target, abs=True)


@attribution_method
def gradient_x_input(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Gradient x Input (Shrikumar et al. 2016): x * d f_target / d x."""
    return captum.attr.InputXGradient(model).attribute(x.requires_grad_(), target=target)


def _noisy_gradient_moments(
    model: nn.Module, x: Tensor, target: Tensor, *, samples: int, noise: float, seed: int, chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    """Mean and variance of d f_target / d x at x + sigma eps_k, k = 1..samples, each (B, C, H, W).

    sigma = noise * (max - min of the sample); eps_k ~ N(0, I) is drawn once from
    `seed` and shared by every sample, so a sample's map does not depend on its batch.
    The moments are accumulated around the noise-free gradient g_0 (shifted data), so
    the variance does not cancel catastrophically and is exactly 0 at noise 0.
    """
    if samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0 (a fraction of the input range), got {noise}")
    eps = torch.randn(samples, *x.shape[1:], generator=generator(seed)).to(x)    # (K, C, H, W)
    sigma = noise * value_range(x)                                                # (B, 1, 1, 1)

    g0 = input_gradient(model, x, target)                                         # (B, C, H, W)

    def moments(k: Tensor) -> Tensor:                                            # k: (K',) draw indices
        xs = (x[None] + sigma[None] * eps[k][:, None]).flatten(0, 1)              # (K' B, C, H, W)
        d = input_gradient(model, xs, target.repeat(len(k))).view(len(k), *x.shape) - g0
        return torch.stack([d.sum(0), d.square().sum(0)])[None]                   # (1, 2, B, C, H, W)

    m = chunked(moments, samples, draws_per_pass(chunk_size, x), device=x.device).sum(0) / samples
    return g0 + m[0], (m[1] - m[0].square()).clamp_min(0)


@attribution_method
def smoothgrad(
    model: nn.Module, x: Tensor, target: Tensor, *,
    samples: int = 50, noise: float = 0.15, seed: int = 0, chunk_size: int | None = None,
) -> Tensor:
    """SmoothGrad (Smilkov et al. 2017): mean_k d f_target(x + eps_k) / d x, eps_k ~ N(0, sigma^2).

    sigma = noise * (max - min) of each sample (the paper's 10-20 % noise level);
    the noise is drawn from `seed` and shared by all samples. Signed.
    """
    return _noisy_gradient_moments(model, x, target, samples=samples, noise=noise, seed=seed, chunk_size=chunk_size)[0]


@attribution_method
def smoothgrad_squared(
    model: nn.Module, x: Tensor, target: Tensor, *,
    samples: int = 50, noise: float = 0.15, seed: int = 0, chunk_size: int | None = None,
) -> Tensor:
    """SmoothGrad-Squared (Hooker et al. 2019): mean_k (d f_target(x + eps_k) / d x)^2; noise as in smoothgrad."""
    mean, var = _noisy_gradient_moments(model, x, target, samples=samples, noise=noise, seed=seed,
                                        chunk_size=chunk_size)
    return var + mean.square()


@attribution_method
def vargrad(
    model: nn.Module, x: Tensor, target: Tensor, *,
    samples: int = 50, noise: float = 0.15, seed: int = 0, chunk_size: int | None = None,
) -> Tensor:
    """VarGrad (Adebayo et al. 2018): var_k d f_target(x + eps_k) / d x, the population variance.

    Noise as in smoothgrad; 0 at noise 0.
    """
    return _noisy_gradient_moments(model, x, target, samples=samples, noise=noise, seed=seed,
                                   chunk_size=chunk_size)[1]


@attribution_method
def guided_backprop(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Guided Backpropagation (Springenberg et al. 2015): only positive gradients pass each ReLU,
    and only where the ReLU's input was positive.

    Needs the model's ReLUs as nn.ReLU modules (captum hooks them); functional relu is not seen.
    """
    return captum.attr.GuidedBackprop(model).attribute(x.requires_grad_(), target=target)


@attribution_method
def deconvolution(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Deconvolution (Zeiler & Fergus 2014): the backward pass applies ReLU to the gradient at each
    ReLU, ignoring the forward pass's sign. Needs nn.ReLU modules, as guided_backprop."""
    return captum.attr.Deconvolution(model).attribute(x.requires_grad_(), target=target)
