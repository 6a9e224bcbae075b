"""Per-sample agreement of the robustness metrics with Quantus 0.6 (an independent implementation)
on the same model, raw attributions and perturbations.

Quantus draws its noise from numpy's global RNG inside `perturb_func`, once per draw for the whole
batch; the tests hand it a perturb_func that replays our draws (metrics._reexplain.noise_field: one
(C, H, W) field per draw, shared by the samples), so both explain exactly the same inputs.
Differences of convention, and how the tests bridge them:
- Normalisation and abs: Quantus' LocalLipschitzEstimate, Continuity and Consistency divide maps by
  their maximum and take |.| by default (normalise=True, abs=True); ours never do: the tests pass
  normalise=False, abs=False. Max/Avg-sensitivity's division by ||Phi(x)|| is ours too (normalize).
- Prediction changes: Quantus' RIS/ROS/RRS default (return_nan_when_prediction_changes=True) gives
  NaN to a sample as soon as one draw changes its prediction; ours (changed="drop") maximises over
  the draws that keep it, as Agarwal et al. define. With changed="keep" and Quantus' flag off the two
  agree on every sample; with the defaults they agree where no draw changed the prediction.
- RRS layers: Quantus' default concatenates every module's output; ours, the hidden parameter owners.
  The tests name the same layers to both. Quantus adds eps to a zero denominator, we floor it at eps
  (max(., eps), the paper's), identical unless it lies in (0, 1e-6).
- Continuity: Quantus 0.6 translates by d = -W + k (2W + 1) // n, k = 1..n (n = nr_steps), 0 included
  (a ratio of 0 there, which never changes the maximum); ours takes the shifts as a list without 0.
  Quantus compares the prediction with the label, not with the original prediction; unused here.
- Consistency: Quantus scores 0 where no other sample shares the discretised map (sum / (0 + 1e-9));
  ours is NaN there. Quantus' default discretisation `top_n_sign` is the signs of the first n values,
  our discretise="first_n_sign".
- Small denominators: Quantus adds 1e-10 (Lipschitz) or 1e-9 (continuity) to ||x - x'||; we do not.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import methods
from bench.zoo import SmallCNN
from metrics import (avg_sensitivity, consistency, continuity, local_lipschitz_estimate, max_sensitivity,
                     relative_input_stability, relative_output_stability, relative_representation_stability)
from metrics._reexplain import noise_field

quantus = pytest.importorskip("quantus")

S = 6


@pytest.fixture(scope="module")
def setup():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SmallCNN(num_classes=6, width=8).eval()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, x, torch.tensor([0, 1, 2, 3, 4, 5])


def _explain(method):
    def explain(model, inputs, targets, **_):
        return method(model, torch.as_tensor(inputs), torch.as_tensor(targets)).numpy()
    return explain


def _replay(x, radius, noise, seed=0):
    """A Quantus perturb_func whose k-th call adds our k-th noise field to every sample."""
    fields = noise_field(x, S, radius, noise, seed).reshape(S, -1).numpy()
    calls = iter(range(S))

    def perturb(arr, indices, **_):
        return arr + fields[next(calls)][None]
    return perturb


def _quantus(metric, model, x, target, method, **call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = method(model, x, target).numpy()
        return np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=a,
                                 explain_func=_explain(method), device="cpu", channel_first=True, **call), dtype=float)


def _close(ours, theirs, rtol=2e-4):
    np.testing.assert_allclose(ours.double().numpy(), theirs, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("method_name", ["saliency", "gradient_x_input"])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_sensitivity_matches_quantus(setup, method_name, kind):
    model, x, target = setup
    method = getattr(methods, method_name)
    cls = quantus.MaxSensitivity if kind == "max" else quantus.AvgSensitivity
    theirs = _quantus(cls(nr_samples=S, lower_bound=0.2, perturb_func=_replay(x, 0.2, "uniform"), normalise=False,
                          abs=False, disable_warnings=True), model, x, target, method)
    ours = (max_sensitivity if kind == "max" else avg_sensitivity)(model, x, target, method, samples=S, radius=0.2)
    _close(ours.scores[f"{kind}_sensitivity"], theirs)


@pytest.mark.parametrize("method_name", ["saliency", "gradient_x_input"])
def test_local_lipschitz_estimate_matches_quantus(setup, method_name):
    model, x, target = setup
    method = getattr(methods, method_name)
    theirs = _quantus(quantus.LocalLipschitzEstimate(nr_samples=S, perturb_std=0.1, perturb_func=_replay(x, 0.1, "gaussian"),
                                                     normalise=False, abs=False, disable_warnings=True),
                      model, x, target, method)
    ours = local_lipschitz_estimate(model, x, target, method, samples=S, radius=0.1)
    _close(ours.scores["lipschitz"], theirs)


@pytest.mark.parametrize("steps", [4, 8])
def test_continuity_matches_quantus(setup, steps):
    model, x, target = setup
    W = x.shape[-1]
    shifts = [-W + k * ((2 * W + 1) // steps) for k in range(1, steps + 1)]
    theirs = _quantus(quantus.Continuity(nr_steps=steps, normalise=False, abs=False, disable_warnings=True),
                      model, x, target, methods.gradient_x_input)
    ours = continuity(model, x, target, methods.gradient_x_input, shifts=[d for d in shifts if d])
    _close(ours.scores["continuity"], theirs)


def test_consistency_matches_quantus(setup):
    model, x, target = setup
    g = torch.Generator().manual_seed(3)
    a = torch.rand(6, 32, 32, generator=g) + 0.1                                  # no zeros: -0.0 hashes apart
    a[:, 0, :5] *= torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [-1, 1, 1, 1, 1],
                                 [-1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, -1, 1, 1, 1]]).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = np.asarray(quantus.Consistency(normalise=False, abs=False, disable_warnings=True)(
            model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=a[:, None].numpy(), device="cpu",
            channel_first=True), dtype=float)
    ours = consistency(model, x, a, discretise="first_n_sign", k=5).scores["consistency"]
    assert ours.isnan().tolist() == [False] * 5 + [True]                           # sample 5's signs are its own
    np.testing.assert_allclose(ours[:5].double().numpy(), theirs[:5], atol=1e-6)
    assert theirs[5] == 0


def _stability(name):
    return {"ris": (quantus.RelativeInputStability, relative_input_stability),
            "ros": (quantus.RelativeOutputStability, relative_output_stability),
            "rrs": (quantus.RelativeRepresentationStability, relative_representation_stability)}[name]


@pytest.mark.parametrize("name", ["ris", "ros", "rrs"])
def test_relative_stability_matches_quantus(setup, name):
    model, x, target = setup
    cls, ours_fn = _stability(name)
    layers = ["features.block2.conv", "classifier.fc1"]
    extra, ours_extra = ({"layer_names": layers}, {"layers": layers}) if name == "rrs" else ({}, {})
    theirs = _quantus(cls(nr_samples=S, perturb_func=_replay(x, 0.2, "uniform"), normalise=False, abs=False,
                          disable_warnings=True, **extra), model, x, target, methods.gradient_x_input)
    ours = ours_fn(model, x, target, methods.gradient_x_input, samples=S, radius=0.2, **ours_extra)
    assert (ours.scores["changed_fraction"] == 0).all()                            # so the conventions coincide
    _close(ours.scores[name], theirs, rtol=1e-3)


@pytest.mark.parametrize("name", ["ris", "ros", "rrs"])
def test_relative_stability_prediction_changes_against_quantus(name):
    """An MLP whose predictions flip under U[-0.5, 0.5]: with changed="keep" and Quantus' flag off the two agree on
    every sample; with the defaults Quantus gives NaN where any draw changed the prediction, ours the maximum over
    the draws that kept it, NaN only where every draw changed it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 3)).eval()
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 1, 1, 0, 1, 0, 1, 1])
    cls, ours_fn = _stability(name)
    extra, ours_extra = ({"layer_names": ["1"]}, {"layers": ["1"]}) if name == "rrs" else ({}, {})
    for flag, rule in [(False, "keep"), (True, "drop")]:
        theirs = _quantus(cls(nr_samples=S, perturb_func=_replay(x, 0.5, "uniform"), normalise=False, abs=False,
                              return_nan_when_prediction_changes=flag, disable_warnings=True, **extra),
                          model, x, target, methods.gradient_x_input)
        ours = ours_fn(model, x, target, methods.gradient_x_input, samples=S, radius=0.5, changed=rule, **ours_extra)
        frac = ours.scores["changed_fraction"]
        if not flag:
            _close(ours.scores[name], theirs, rtol=1e-3)
            kept = ours.scores[name]
            continue
        unchanged = frac == 0
        assert unchanged.any() and (~unchanged).any()                              # both cases exercised
        assert np.isnan(theirs).tolist() == (~unchanged).tolist()
        _close(ours.scores[name][unchanged], theirs[unchanged.numpy()], rtol=1e-3)
        assert torch.equal(ours.scores[name].isnan(), frac == 1)
        assert (ours.scores[name][frac < 1] <= kept[frac < 1] + 1e-6).all()          # a max over fewer draws
