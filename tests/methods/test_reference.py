"""GradientSHAP against captum's GradientShap with the same draws; IG's baselines; option checks."""
from __future__ import annotations

import captum.attr
import numpy as np
import pytest
import torch

import methods
from methods._common import generator, value_range


def _draws(x: torch.Tensor, samples: int, seed: int):
    """expected_gradients' documented draws: patterns, a, e from generator(seed), in that order."""
    g = generator(seed)
    pattern = torch.rand(samples, *x.shape[1:], generator=g)
    alpha = torch.rand(samples, generator=g)
    eps = torch.randn(samples, *x.shape[1:], generator=g)
    return pattern, alpha, eps


@pytest.mark.parametrize("baseline", ["uniform", "mean"])
def test_gradient_shap_is_captums_with_the_same_draws(tiny_cnn, batch, baseline, monkeypatch):
    """captum's GradientShap (NoiseTunnel: x + N(0, stdev^2); a reference drawn from `baselines`;
    t ~ U(0, 1); gradient at ref + t (x_noisy - ref) times x_noisy - ref; mean over draws), fed our
    draws through its three random sources, one sample at a time (its stdev is one number; ours is
    noise * the sample's range)."""
    x, target = batch
    K, noise, seed = 6, 0.2, 3
    ours = methods.expected_gradients(tiny_cnn, x, target, samples=K, baseline=baseline, noise=noise, seed=seed)
    pattern, alpha, eps = _draws(x, K, seed)
    for b in range(len(x)):
        xb = x[b:b + 1]
        lo, span = xb.amin(), value_range(xb).flatten()
        refs = lo + span * pattern if baseline == "uniform" else xb.mean(dim=(2, 3), keepdim=True).expand(K, -1, *xb.shape[2:])
        sigma = (noise * span).item()
        monkeypatch.setattr(torch, "normal", lambda mean, std: sigma * eps)             # (K, C, H, W) draws of sample b
        monkeypatch.setattr(np.random, "choice", lambda n, size: np.arange(size) % n)   # reference k for draw k
        monkeypatch.setattr(np.random, "uniform", lambda low, high, size: alpha.numpy().astype(np.float64))
        theirs = captum.attr.GradientShap(tiny_cnn).attribute(xb.clone().requires_grad_(), baselines=refs.contiguous(),
                                                             target=target[b:b + 1], n_samples=K, stdevs=sigma)
        monkeypatch.undo()
        torch.testing.assert_close(ours[b:b + 1], theirs.detach(), rtol=1e-4, atol=1e-6)


def test_gradient_shap_on_a_quadratic_model_by_hand():
    """f(x) = 1/2 sum v x^2, gradient v p: GS = mean_k (x~_k - r) v (r + a_k (x~_k - r)), x~_k = x + sigma e_k.
    The old form (noise after interpolation, times x - r) gives mean_k (x - r) v (r + a_k (x - r) + sigma e_k)."""
    class Quadratic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.v = torch.nn.Parameter(torch.tensor([1.0, -2.0]).view(2, 1, 1, 1, 1), requires_grad=False)

        def forward(self, z):
            return 0.5 * (self.v * z[None].square()).sum(dim=(2, 3, 4)).T               # (B, 2)

    x = torch.tensor([[[[1.0, 3.0], [-1.0, 0.5]]]])                                      # (1, 1, 2, 2), range 4
    K, noise, seed = 5, 0.25, 11
    gs = methods.expected_gradients(Quadratic(), x, torch.tensor([1]), samples=K, baseline=0.0, noise=noise,
                                    seed=seed)
    _, alpha, eps = _draws(x, K, seed)
    noisy = x + 1.0 * eps                                                                # sigma = 0.25 * 4
    expected = (noisy * -2.0 * alpha.view(-1, 1, 1, 1) * noisy).mean(dim=0, keepdim=True)
    torch.testing.assert_close(gs, expected)
    old = (x * -2.0 * (alpha.view(-1, 1, 1, 1) * x + eps)).mean(dim=0, keepdim=True)
    assert (gs - old).abs().max() > 0.1


def test_integrated_gradients_baselines(linear_batch):
    """channel_min is each channel's minimum over the image (the data's black), image_min the minimum over
    channels and pixels: on a linear model IG = w (x - x') exactly, for any steps. The names of earlier
    versions name their replacements."""
    model, x, target = linear_batch
    w = model.weight.detach()[target]
    torch.testing.assert_close(methods.integrated_gradients(model, x, target, steps=3, baseline=0.0), w * x)
    black = x.amin(dim=(2, 3), keepdim=True)                                             # (B, C, 1, 1)
    torch.testing.assert_close(methods.integrated_gradients(model, x, target, steps=3, baseline="channel_min"),
                               w * (x - black))
    torch.testing.assert_close(methods.deeplift(model, x, target, baseline="channel_min"), w * (x - black))
    lowest = x.amin(dim=(1, 2, 3), keepdim=True)                                         # (B, 1, 1, 1)
    torch.testing.assert_close(methods.deeplift(model, x, target, baseline="image_min"), w * (x - lowest))
    for old, new in [("zeros", "0.0"), ("min", "'channel_min'"), ("black", "'image_min'")]:
        for method in (methods.integrated_gradients, methods.deeplift, methods.expected_gradients):
            with pytest.raises(ValueError, match=f"baseline '{old}' is now called {new}"):
                method(model, x, target, baseline=old)


BAD = [  # (method, option, value, message)
    ("integrated_gradients", "steps", 4.5, "steps must be an integer, got 4.5"),
    ("integrated_gradients", "steps", "8", "steps must be an integer, got '8'"),
    ("integrated_gradients", "steps", True, "steps must be an integer, got True"),
    ("integrated_gradients", "steps", 0, "steps must be a positive integer, got 0"),
    ("integrated_gradients", "baseline", float("nan"), "baseline must be a finite number or one of 'channel_min', "
     "'image_min', 'mean', 'blur', 'uniform' or a tensor, got nan"),
    ("integrated_gradients", "baseline", "black", "baseline 'black' is now called 'image_min'"),
    ("deeplift_shap", "baseline", "zeros", "baseline 'zeros' is now called 0.0"),
    ("integrated_gradients", "rule", "simpson", "rule must be one of 'gausslegendre'"),
    ("integrated_gradients", "internal_batch_size", 2.0, "internal_batch_size must be an integer or null"),
    ("smoothgrad", "noise", float("nan"), "noise must be a finite number, got nan"),
    ("smoothgrad", "samples", 2.0, "samples must be an integer, got 2.0"),
    ("vargrad", "seed", True, "seed must be an integer, got True"),
    ("expected_gradients", "noise", float("inf"), "noise must be a finite number, got inf"),
    ("expected_gradients", "noise", -0.1, "noise must be >= 0"),
    ("rise", "p", float("nan"), "p must be a finite number, got nan"),
    ("lrp_epsilon", "zero_bias", 1, "zero_bias must be true or false, got 1"),
    ("lrp_epsilon", "epsilon", "1e-6", "epsilon must be a finite number, got '1e-6'"),
    ("centre", "sigma", float("nan"), "sigma must be a finite number"),
    ("constant", "value", float("inf"), "value must be a finite number"),
    ("random_map", "seed", 1.0, "seed must be an integer, got 1.0"),
]


@pytest.mark.parametrize("name, option, value, message", BAD, ids=lambda v: str(v))
def test_bad_options_raise_one_clear_value_error(name, option, value, message, tiny_cnn, batch):
    x, target = batch
    # type checks (methods._common.attribution_method) name the method; range checks name the option
    range_check = message.startswith(("steps must be a positive", "noise must be >= 0"))
    with pytest.raises(ValueError, match=message if range_check else rf"^{name}: {message}"):
        getattr(methods, name)(tiny_cnn, x, target, **{option: value})
