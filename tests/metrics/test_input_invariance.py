"""input_invariance (Kindermans et al. 2019): the compensated copy, under every method's own preparation.

The copy absorbs the shift in its first layer's bias (b2 = b1 - W shift), so copy(z) = model(z - shift)
for every input z: checked on every forward pass every catalogued method makes, LRP's canonizers and
composites included, on the zoo's conv -> batch norm nets (random weights, randomized BN statistics).
"""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

import methods
from bench.config import CONF, derive_seeds
from bench.zoo import ResNet, SmallCNN
from metrics import consumed, input_invariance

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
FAST = {                                       # fewer draws: the preparation does not depend on them
    "smoothgrad": "samples=2", "smoothgrad_squared": "samples=2", "vargrad": "samples=2",
    "expected_gradients": "samples=2", "gradient_shap": "samples=2", "deeplift_shap": "samples=2",
    "integrated_gradients": "steps=3", "rise": "masks=4", "lime": "samples=8", "kernel_shap": "samples=8",
    "occlusion": "stride=8", "feature_ablation": "cells=2",
}


def _zoo(cls) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = cls(num_classes=6, width=4)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):                   # far from the identity, so a wrong merge shows
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


def _method(name: str):
    overrides = [f"method=[{name}]"] + ([f"method.{name}.{FAST[name]}"] if name in FAST else [])
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return instantiate(derive_seeds(cfg).method[name])


@pytest.fixture(scope="module")
def data():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return x, torch.tensor([1, 4])


@pytest.mark.parametrize("cls", [SmallCNN, ResNet], ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", METHODS)
def test_compensated_copy_reproduces_the_model_under_each_methods_preparation(name, cls, data, one_thread):
    """Every forward pass of the method on the copy (inputs z, canonizers and hooks active) gives
    model(z - shift) to 1e-5. Before the batch norm fold, LRP was off by up to 0.035 in the logit."""
    model, (x, target), shift = _zoo(cls), data, 1.5
    method, runs = _method(name), []

    def spy(m: nn.Module, inputs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls = []
        hook = m.register_forward_hook(lambda _m, i, o: calls.append((i[0].detach().clone(), o.detach().clone())))
        try:
            return method(m, inputs, t)
        finally:
            hook.remove()
            runs.append(calls)

    input_invariance(model, x, target, spy, shift=shift, measures=["spearman"])
    copy_calls = runs[1]
    if name in ("random", "edge", "centre", "constant"):
        assert copy_calls == []                                 # controls never call the model
        return
    assert copy_calls, f"{name} made no forward pass on the copy"
    worst = 0.0
    with torch.no_grad():
        for z, out in copy_calls:
            worst = max(worst, (out - model(z - shift)).abs().max().item())
    assert worst < 1e-5, f"{name} on {cls.__name__}: copy(z) - model(z - shift) up to {worst:.3g}"


@pytest.mark.parametrize("cls", [SmallCNN, ResNet], ids=lambda c: c.__name__)
def test_which_methods_are_input_invariant(cls, data, one_thread):
    """Kindermans et al. 2019's finding on the zoo nets, with LRP now measured on the right network:
    the gradient ignores the shift; gradient x input, LRP-epsilon, z+ and IG from 0 do not. Exactly
    invariant as well: EpsilonPlusFlat (the flat first-layer rule does not read the input) and
    EpsilonGammaBox with the per-sample box (the z^B rule's root point moves with the input:
    (x + s) W - (l + s) W+ - (h + s) W- = x W - l W+ - h W-), and IG from the per-image minimum."""
    model, (x, target) = _zoo(cls), data
    invariant = {"gradient": methods.gradient, "lrp_epsilon_plus_flat": methods.lrp_epsilon_plus_flat,
                 "lrp_epsilon_gamma_box": methods.lrp_epsilon_gamma_box,
                 "ig_min": lambda m, z, t: methods.integrated_gradients(m, z, t, steps=8, baseline="channel_min")}
    changed = {"gradient_x_input": methods.gradient_x_input, "lrp_epsilon": methods.lrp_epsilon,
               "lrp_alpha1_beta0": methods.lrp_alpha1_beta0,
               "ig_zero": lambda m, z, t: methods.integrated_gradients(m, z, t, steps=8, baseline=0.0),
               "box_fixed": lambda m, z, t: methods.lrp_epsilon_gamma_box(m, z, t, low=-3.0, high=3.0)}
    for name, method in {**invariant, **changed}.items():
        r = input_invariance(model, x, target, method, shift=1.0, measures=["spearman"])
        rel = r.scores["rel_l1"]
        if name in invariant:
            assert rel.max().item() < 1e-4, (name, rel)
            torch.testing.assert_close(r.scores["spearman"], torch.ones(2, dtype=x.dtype), atol=1e-4, rtol=0)
        else:
            assert rel.min().item() > 0.05, (name, rel)


def test_consumes_the_raw_attribution_and_checks_it(data):
    model, (x, target) = _zoo(SmallCNN), data
    assert consumed(input_invariance) == "raw"
    raw = methods.gradient_x_input(model, x, target)
    given = input_invariance(model, x, target, methods.gradient_x_input, attribution=raw, measures=["spearman"])
    fresh = input_invariance(model, x, target, methods.gradient_x_input, measures=["spearman"])
    torch.testing.assert_close(given.scores["rel_l1"], fresh.scores["rel_l1"])
    # rel_l1 by hand: E = x * g, E' = (x + 1) * g (the gradient is unchanged), so sum |g| / sum |x g|
    g = methods.gradient(model, x, target)
    torch.testing.assert_close(given.scores["rel_l1"], g.abs().sum((1, 2, 3)) / (x * g).abs().sum((1, 2, 3)),
                               rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match=r"attribution must be the raw attribution of shape \(2, 3, 16, 16\)"):
        input_invariance(model, x, target, methods.gradient, attribution=raw.sum(dim=1))
    for bad in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="shift must be a finite number"):
            input_invariance(model, x, target, methods.gradient, shift=bad)


def test_a_model_that_is_not_compensable_raises_a_clear_error(data):
    """A model that transforms its input before the first layer (here a scaling) cannot be compensated
    at that layer: the check of the copy says so instead of returning a wrong score."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _zoo(SmallCNN)

        def forward(self, z):
            return self.net(2.0 * z)

    x, target = data
    with pytest.raises(ValueError, match="the compensated copy of Scaled does not reproduce model"):
        input_invariance(Scaled().eval(), x, target, methods.gradient)


def test_family_is_the_defining_module_and_a_stranger_is_refused():
    import functools

    from metrics import family, input_invariance, mprt, pixel_flipping
    assert family(input_invariance) == "axiomatic" and family(mprt) == "randomization"
    assert family(functools.partial(pixel_flipping, steps=4)) == "faithfulness"
    with pytest.raises(ValueError, match="metrics/<family>.py"):
        family(torch.sum)
