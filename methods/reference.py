"""Reference-based attributions: Integrated Gradients, Expected Gradients, DeepLIFT and DeepLIFT-SHAP.

Each explains f(x) - f(x') against a reference x' (a baseline, or a distribution of them).
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import captum.attr
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods._common import attribution_method, cannot_run, generator, input_gradient, value_range
from metrics.baselines import BLUR_SIGMA, Baseline, baseline_fill
from metrics.batching import auto_chunk_size, chunked, draws_per_pass, retry_smaller

# elementwise nonlinearities: the Rescale rule m = (y - y') / (z - z'); linear layers keep their gradient
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
                nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold)
_MAXPOOL = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d,
            nn.AdaptiveMaxPool1d: F.adaptive_max_pool1d, nn.AdaptiveMaxPool2d: F.adaptive_max_pool2d,
            nn.AdaptiveMaxPool3d: F.adaptive_max_pool3d}
# nonlinear modules without a rule: neither linear nor elementwise, so their gradient would be wrong
_NO_RULE = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
            nn.MultiheadAttention, nn.GLU)


@attribution_method
def integrated_gradients(
    model: nn.Module, x: Tensor, target: Tensor, *,
    steps: int = 16,
    baseline: Baseline = 0.0,
    rule: Literal["gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right"] = "gausslegendre",
    blur_sigma: float = BLUR_SIGMA,
    seed: int = 0,
    internal_batch_size: int | None = None,
) -> Tensor:
    """Integrated Gradients (Sundararajan et al. 2017) on the straight path from a baseline x'.

    IG_i = (x_i - x'_i) * integral_0^1 d f_target(x' + a (x - x')) / d x_i da, the
    integral approximated with `steps` nodes of `rule`; completeness: sum_i IG_i
    = f(x) - f(x') up to that approximation. `baseline`: a number in the normalised space
    (0.0 = the normalisation's mean colour, mid-grey: not black), channel_min (each channel's
    minimum in the image: the data's black, as Sundararajan et al.'s black image; it moves with
    a constant input shift, so IG from it is input invariant, Kindermans et al. 2019), image_min,
    mean, blur, uniform (drawn from `seed`) or a tensor: metrics.baselines. `internal_batch_size`:
    images per forward/backward pass; None takes the tuned or memory-budget size of metrics.batching.
    A pass holds whole nodes of the batch, or, where the size is below the batch, one node of a group
    of that many samples (captum's passes hold all samples of a call; each sample's IG is its own).
    Out of memory, it is retried once at half the size.
    """
    if steps < 1:
        raise ValueError(f"integrated_gradients: steps must be a positive integer, got {steps}")
    ref = baseline_fill(x, baseline, seed=seed, blur_sigma=blur_sigma).expand_as(x)
    ig = captum.attr.IntegratedGradients(model)

    def attribute(images: int) -> Tensor:                                     # images per pass
        if images >= len(x):                                                  # whole nodes of the batch
            return ig.attribute(x.requires_grad_(), baselines=ref, target=target, n_steps=steps, method=rule,
                                internal_batch_size=len(x) * draws_per_pass(images, x))
        return torch.cat([ig.attribute(xs.detach().requires_grad_(), baselines=rs, target=ts, n_steps=steps,
                                       method=rule, internal_batch_size=len(xs))                # groups of samples
                          for xs, rs, ts in zip(x.split(images), ref.split(images), target.split(images))])

    images = auto_chunk_size(x, backward=True) if internal_batch_size is None else internal_batch_size
    return retry_smaller(attribute, max(1, images), name="internal_batch_size")                # (B, C, H, W)


def _references(x: Tensor, baseline: Baseline, pattern: Tensor, blur_sigma: float) -> Callable[[Tensor], Tensor]:
    """References for draws k, (K', B, C, H, W): uniform ones rescale draw k's pattern to each sample's
    range; any other baseline (metrics.baselines) is one fixed reference for every draw."""
    if isinstance(baseline, str) and baseline == "uniform":
        lo, span = x.amin(dim=(1, 2, 3), keepdim=True)[None], value_range(x)[None]
        return lambda k: lo + span * pattern[k][:, None]
    fixed = baseline_fill(x, baseline, blur_sigma=blur_sigma).expand_as(x)
    return lambda k: fixed[None].expand(len(k), *x.shape)


def _check_samples(samples: int) -> None:
    if samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples}")


@attribution_method
def expected_gradients(
    model: nn.Module, x: Tensor, target: Tensor, *,
    samples: int = 32,
    baseline: Baseline = "uniform",
    noise: float = 0.0,
    blur_sigma: float = BLUR_SIGMA,
    seed: int = 0,
    chunk_size: int | None = None,
) -> Tensor:
    """Expected Gradients (Erion et al. 2021); with noise > 0, GradientSHAP (Lundberg & Lee 2017; captum).

    GS_i = mean_k (x~_k,i - x'_k,i) * d f_target(x'_k + a_k (x~_k - x'_k)) / d x_i, with
    x~_k = x + sigma e_k the noisy input (e_k ~ N(0, I), sigma = noise * (max - min) of the
    sample), a_k ~ U(0, 1), x'_k a reference: captum's GradientShap (NoiseTunnel adds the noise
    to the input, then InputBaselineXGradient interpolates and multiplies by x~ - x'), so
    E[sum_i GS_i] ~ E f(x~) - E f(x'). noise = 0 is expected gradients. The references are
    uniform noise over the sample's range (no training set reaches a method; captum draws them
    from a given set), or one fixed reference (a number, channel_min, image_min, mean, blur, a tensor). Draws (patterns, a, e, in that
    order) come from `seed` and are shared by all samples; sigma is per sample, captum's stdevs one.
    """
    _check_samples(samples)
    if noise < 0:
        raise ValueError(f"noise must be >= 0 (a fraction of the input range), got {noise}")
    g = generator(seed)
    pattern = torch.rand(samples, *x.shape[1:], generator=g).to(x)                # (K, C, H, W)
    alpha = torch.rand(samples, generator=g).to(x)                                # (K,)
    eps = torch.randn(samples, *x.shape[1:], generator=g).to(x)                   # (K, C, H, W)
    sigma = noise * value_range(x)                                                # (B, 1, 1, 1)
    references = _references(x, baseline, pattern, blur_sigma)

    def contributions(k: Tensor) -> Tensor:                                       # k: (K',) draw indices
        ref = references(k)                                                        # (K', B, C, H, W)
        noisy = x[None] + sigma[None] * eps[k][:, None]                            # (K', B, C, H, W)
        point = ref + alpha[k].view(-1, 1, 1, 1, 1) * (noisy - ref)
        grad = input_gradient(model, point.flatten(0, 1), target.repeat(len(k))).view_as(ref)
        return ((noisy - ref) * grad).sum(0, keepdim=True)                        # (1, B, C, H, W)

    return chunked(contributions, samples, draws_per_pass(chunk_size, x), device=x.device).sum(0) / samples


@attribution_method
def deeplift(
    model: nn.Module, x: Tensor, target: Tensor, *, baseline: Baseline = 0.0, blur_sigma: float = BLUR_SIGMA, seed: int = 0,
) -> Tensor:
    """DeepLIFT (Shrikumar et al. 2017) with the Rescale rule, against one baseline x'.

    DL_i = (x_i - x'_i) m_i, m the chain of multipliers: Delta y / Delta z at every elementwise
    activation module, the cross-max rule at max pools (see _maxpool_rule), the Jacobian of
    linear layers. Completeness (summation-to-delta): sum_i DL_i = f(x) - f(x'). Functional
    nonlinearities (F.relu, torch.max) are invisible and count as linear. Our own hooks, not
    captum's: captum 0.9 drops the max-pool rule behind a ReLU (summation then fails on
    SmallCNN). Baselines as in integrated_gradients.
    """
    ref = baseline_fill(x, baseline, seed=seed, blur_sigma=blur_sigma).expand_as(x)
    return _rescale(model, x, ref, target, method="deeplift")


@attribution_method
def deeplift_shap(
    model: nn.Module, x: Tensor, target: Tensor, *,
    samples: int = 16,
    baseline: Baseline = "uniform",
    blur_sigma: float = BLUR_SIGMA,
    seed: int = 0,
    chunk_size: int | None = None,
) -> Tensor:
    """DeepLIFT-SHAP (Lundberg & Lee 2017): DeepLIFT (Rescale) averaged over `samples` references.

    The references are drawn as in expected_gradients, from `seed`, shared by all
    samples; sum_i attribution_i = f(x) - mean_k f(x'_k).
    """
    _check_samples(samples)
    pattern = torch.rand(samples, *x.shape[1:], generator=generator(seed)).to(x)  # (K, C, H, W)
    references = _references(x, baseline, pattern, blur_sigma)

    def attributions(k: Tensor) -> Tensor:                                        # k: (K',) draw indices
        ref = references(k).flatten(0, 1)                                          # (K' B, C, H, W)
        xs = x[None].expand(len(k), *x.shape).flatten(0, 1)
        a = _rescale(model, xs, ref, target.repeat(len(k)), method="deeplift_shap")
        return a.view(len(k), *x.shape).sum(0, keepdim=True)                     # (1, B, C, H, W)

    return chunked(attributions, samples, draws_per_pass(chunk_size, x), device=x.device).sum(0) / samples


class _Rule(torch.autograd.Function):
    """Identity on the module's output forward; backward(g) = rule(g), the multiplier chain rule."""

    @staticmethod
    def forward(ctx, z: Tensor, y: Tensor, rule: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.rule = rule
        return y.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:
        return ctx.rule(g), None, None


def _maxpool_rule(module: nn.Module, z: Tensor, y: Tensor, z_ref: Tensor, y_ref: Tensor,
                  eps: float) -> Callable[[Tensor], Tensor]:
    """DeepLIFT through a max pool, summation-exact: with M = max(y, y'), the part M - y' of
    Delta y goes to x's argmax, y - M to the reference's argmax (overlapping windows add up);
    an input with |Delta z| <= eps gets the plain gradient (its contribution is ~0 either way)."""
    pool = _MAXPOOL[type(module)]
    if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        def argmax(t: Tensor) -> Tensor:
            return pool(t, module.output_size, return_indices=True)[1]
    else:
        def argmax(t: Tensor) -> Tensor:
            return pool(t, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode,
                        return_indices=True)[1]
    with torch.no_grad():
        idx, idx_ref = argmax(z).flatten(2), argmax(z_ref).flatten(2)             # (B, C, out): flat input positions
        top = torch.maximum(y, y_ref)
        dz = z - z_ref

    def rule(g: Tensor) -> Tensor:
        B, C = z.shape[:2]
        src = torch.cat([(g * (top - y_ref)).flatten(2), (g * (y - top)).flatten(2)], dim=2)
        routed = z.new_zeros(B, C, math.prod(z.shape[2:])).scatter_add_(2, torch.cat([idx, idx_ref], dim=2), src)
        plain = z.new_zeros(B, C, math.prod(z.shape[2:])).scatter_add_(2, idx, g.flatten(2))
        safe = dz.abs() > eps
        return torch.where(safe, routed.view_as(z) / torch.where(safe, dz, 1.0), plain.view_as(z))

    return rule


def _rescale(model: nn.Module, x: Tensor, ref: Tensor, target: Tensor, *, method: str,
             eps: float = 1e-10) -> Tensor:
    """(x - x') * multipliers of f_target, per sample: the reference runs first and its activations
    are recorded; the input's run then replaces every rule module's backward by its rule."""
    rules = {m: name for name, m in model.named_modules() if isinstance(m, (*_ELEMENTWISE, *_MAXPOOL))}
    for name, m in model.named_modules():
        if isinstance(m, _NO_RULE):
            raise cannot_run(method, model, f"layer {name!r} ({type(m).__name__}) has no DeepLIFT rule here")
        if m in rules and getattr(m, "inplace", False):
            raise cannot_run(method, model, f"layer {name!r} ({type(m).__name__}) is in-place, so its input is "
                                            "lost; build the model with inplace=False")
    recorded: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {m: [] for m in rules}

    def record(m: nn.Module, inputs: tuple, y: Tensor) -> None:
        recorded[m].append((inputs[0].detach(), y.detach()))

    def replace(m: nn.Module, inputs: tuple, y: Tensor) -> Tensor:
        z = inputs[0]
        if len(recorded[m]) != 1:
            raise cannot_run(method, model, f"module {rules[m]!r} runs {len(recorded[m]) or 'more'} times per "
                                             "forward; give every activation and pool its own module instance")
        z_ref, y_ref = recorded[m].pop()
        if isinstance(m, tuple(_MAXPOOL)):
            return _Rule.apply(z, y, _maxpool_rule(m, z.detach(), y.detach(), z_ref, y_ref, eps))
        dz, dy = z.detach() - z_ref, y.detach() - y_ref
        safe = dz.abs() > eps
        local = (torch.autograd.grad(y, z, torch.ones_like(y), retain_graph=True)[0] if not safe.all()
                 else torch.zeros_like(dz))                                           # elementwise: the diagonal
        multiplier = torch.where(safe, dy / torch.where(safe, dz, 1.0), local)
        return _Rule.apply(z, y, lambda g: g * multiplier)

    handles = [m.register_forward_hook(record) for m in rules]
    try:
        with torch.no_grad():
            model(ref)
    finally:
        for h in handles:
            h.remove()
    handles = [m.register_forward_hook(replace) for m in rules]
    try:
        xg = x.detach().requires_grad_()
        out = model(xg).gather(1, target[:, None]).sum()
        grad = torch.autograd.grad(out, xg)[0]
    finally:
        for h in handles:
            h.remove()
    return (x - ref) * grad                                                           # (B, C, H, W)
