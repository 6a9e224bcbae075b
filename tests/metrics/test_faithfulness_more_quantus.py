"""Agreement with Quantus 0.6: FaithfulnessEstimate, Monotonicity, MonotonicityCorrelation, IROF,
Selectivity and Sufficiency, per sample, on the same model, maps and perturbations.

Differences of convention, and how the tests bridge them:
- Features: Quantus flattens C x H x W; given our map repeated over the channels and no ties between
  pixels, `features_in_step = C p` takes p whole pixels per step, as ours does with steps = HW / p.
- Monotonicity: Quantus 0.6 writes the baseline over the baseline image instead of restoring the
  input's features, so every sample scores True; the test pins that and checks ours against AIX360's
  definition looped per sample instead.
- Ties: Quantus orders with numpy's unstable argsort; ours breaks ties by a seeded permutation. The
  maps here are continuous draws: no ties.
- Normalisation: Quantus divides maps by their maximum (normalise=True) and takes |map| (abs) by
  default in Monotonicity, MonotonicityCorrelation and Sufficiency; the tests pass normalise=False,
  abs=False and maps that need neither (MonotonicityCorrelation takes |map| itself, as its paper).
- Baselines: Quantus' "black" is our "image_min". Quantus' "uniform" is U(0, 1) from numpy's global
  RNG, ours one seeded field per draw scaled to each image's [min, max]: the tests use a deterministic
  baseline (and one draw) where Quantus would draw. Quantus IROF's "mean" is the mean of the whole
  (partly perturbed) batch, recomputed at every step; ours each image's per-channel mean: the IROF
  test uses the constant 0.0.
- MonotonicityCorrelation: Quantus divides the variance by f(x)^2, a per-sample constant that the
  Spearman correlation ignores.
- IROF: Quantus' AOC is K - trapezoid(r_1..r_K, dx=1) = K IROF + (1 + r_1) / 2 (ours: 1 - trapezoid of
  r_0..r_K over l / K). Quantus pads the curves of a batch to its largest K with zeros, which
  subtracts r_K / 2 from an image with fewer segments: the test gives every image the same segments.
  Segmentation: Quantus calls skimage's slic itself; the test feeds both the same labels. Quantus'
  IROF runs on one-channel images only (its segment mask must have the input's shape).
- Selectivity: Quantus' curve starts after the first patch and its AUC is trapezoid(f_1..f_K, dx=1);
  ours (pixel_flipping) starts at f_0 over the fraction removed: Quantus' AUC = K auc - (f_0 + f_1) / 2.
- Sufficiency: a sample with no other map within the threshold scores 0 in Quantus, NaN in ours.
- SensitivityN: not compared. Quantus removes features cumulatively in MoRF order (not random
  subsets of size n, Ancona et al.'s definition) and correlates over the batch's samples, one
  value per n, not per sample; our sensitivity_n follows the paper (tests/metrics/test_faithfulness_more.py).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

quantus = pytest.importorskip("quantus")

from metrics import (faithfulness_estimate, irof, monotonicity, monotonicity_correlation,  # noqa: E402
                     pixel_flipping, sufficiency)
from tests.conftest import Linear  # noqa: E402

QUIET = {"disable_warnings": True, "display_progressbar": False}


@pytest.fixture(autouse=True)
def _numpy_trapz(monkeypatch):
    """Quantus 0.6 calls np.trapz, which NumPy 2.x removed: give it np.trapezoid, the same rule."""
    if not hasattr(np, "trapz"):
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


def _run(metric, model, x, target, a, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=a[:, None].expand_as(x).numpy(),
                      device="cpu", channel_first=True, **kwargs)


def _crop(batch, seed):
    """6 x 6 images (36 pixels: Quantus wants features_in_step = 3 p to divide 36 for p = 1, 4) and a
    continuous map."""
    x, target = batch
    return x[:, :, 1:7, 1:7].contiguous(), target, torch.randn(5, 6, 6, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pixels_per_step", [1, 4])
def test_faithfulness_estimate_matches_quantus(tiny_cnn, batch, pixels_per_step):
    x, target, a = _crop(batch, pixels_per_step)
    theirs = _run(quantus.FaithfulnessEstimate(features_in_step=3 * pixels_per_step, perturb_baseline="black",
                                               normalise=False, **QUIET), tiny_cnn, x, target, a, softmax=False)
    ours = faithfulness_estimate(tiny_cnn, x, target, a, steps=36 // pixels_per_step, baseline="image_min")
    np.testing.assert_allclose(ours.scores["pearson"].numpy(), theirs, atol=1e-4)


def _aix360_monotonicity(model, x, target, a, pixels_per_step, baseline):
    """AIX360's monotonicity_metric, per sample: restore pixels onto the baseline in ascending order of
    the map, p at a time, and check that the target output never falls (the baseline not compared)."""
    out = []
    for xb, tb, ab in zip(x, target, a):
        order = np.argsort(ab.flatten().numpy(), kind="stable")
        current, preds = torch.full_like(xb, baseline), []
        for start in range(0, order.size, pixels_per_step):
            keep = torch.zeros(order.size, dtype=torch.bool)
            keep[torch.as_tensor(order[start:start + pixels_per_step])] = True
            current = torch.where(keep.view(1, *xb.shape[1:]), xb, current)
            with torch.no_grad():
                preds.append(model(current[None])[0, tb].item())
        out.append(float(np.all(np.diff(preds) >= 0)))
    return out


@pytest.mark.parametrize("pixels_per_step", [1, 4])
def test_monotonicity_matches_aix360_and_pins_quantus(pixels_per_step):
    """A linear model: where every pixel's contribution w x is >= 0 (samples 0, 2, 4) any order is
    monotonic; where contributions have both signs (1, 3) restoring the second negative one falls.
    Quantus 0.6's Monotonicity replaces the restored features by the baseline again (its perturb_func
    on the baseline image), so its curve is constant and every sample scores True: not comparable;
    the oracle is AIX360's definition, looped per sample."""
    model = Linear((3, 6, 6), classes=3).eval()
    g = torch.Generator().manual_seed(pixels_per_step)
    x, target = torch.randn(5, 3, 6, 6, generator=g), torch.tensor([0, 1, 2, 0, 1])
    x[::2] = model.weight[target[::2]].detach().sign() * x[::2].abs()
    a = torch.randn(5, 6, 6, generator=g)
    ours = monotonicity(model, x, target, a, steps=36 // pixels_per_step, baseline=0.0, output="logit")
    assert ours.scores["monotonic"].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert ours.scores["monotonic"].tolist() == _aix360_monotonicity(model, x, target, a, pixels_per_step, 0.0)
    theirs = _run(quantus.Monotonicity(features_in_step=3 * pixels_per_step, perturb_baseline=0.0, abs=False,
                                       normalise=False, **QUIET), model, x, target, a, softmax=False)
    assert [bool(v) for v in theirs] == [True] * 5


@pytest.mark.parametrize("pixels_per_step", [1, 4])
@pytest.mark.parametrize("softmax", [True, False])
def test_monotonicity_correlation_matches_quantus(tiny_cnn, batch, pixels_per_step, softmax):
    x, target, a = _crop(batch, pixels_per_step)
    theirs = _run(quantus.MonotonicityCorrelation(features_in_step=3 * pixels_per_step, nr_samples=1,
                                                  perturb_baseline="black", abs=True, normalise=False, **QUIET),
                  tiny_cnn, x, target, a, softmax=softmax)
    ours = monotonicity_correlation(tiny_cnn, x, target, a, steps=36 // pixels_per_step, samples=1,
                                    baseline="image_min", output="softmax" if softmax else "logit")
    np.testing.assert_allclose(ours.scores["spearman"].numpy(), theirs, atol=1e-6)


@pytest.mark.parametrize("block", [2, 4])
def test_irof_matches_quantus(batch, block, monkeypatch):
    """One-channel images: Quantus 0.6's IROF asserts its (B, 1, H, W) segment mask has the input's shape."""
    torch.manual_seed(0)
    tiny_cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x, target = batch
    x = x[:, :1].contiguous()
    a = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(block))
    rows = torch.arange(8)[:, None] // block * (8 // block) + torch.arange(8)[None] // block
    segments = rows.expand(5, 8, 8).clone()
    K = (8 // block) ** 2
    monkeypatch.setattr(quantus.helpers.utils, "get_superpixel_segments",
                        lambda img, segmentation_method: rows.numpy())
    theirs = np.asarray(_run(quantus.IROF(perturb_baseline=0.0, return_aggregate=False, **QUIET),
                             tiny_cnn, x, target, a, softmax=True))
    ours = irof(tiny_cnn, x, target, a, segments=segments, baseline=0.0, output="softmax").scores["irof"]
    # r_1: the output with the most relevant segment (highest mean) removed, over the unperturbed one
    means = torch.zeros(5, K).scatter_add_(1, segments.reshape(5, -1), a.reshape(5, -1))
    first = segments.reshape(5, -1) == means.argmax(dim=1, keepdim=True)
    with torch.no_grad():
        p = lambda v: tiny_cnn(v).softmax(dim=1).gather(1, target[:, None]).squeeze(1)
        r1 = p(torch.where(first.view(5, 1, 8, 8), 0.0, x)) / p(x)
    np.testing.assert_allclose((K * ours + (1 + r1) / 2).numpy(), theirs, rtol=1e-5, atol=1e-5)


def test_selectivity_matches_quantus(tiny_cnn, batch):
    x, target = batch
    a = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(7))
    metric = quantus.Selectivity(patch_size=4, perturb_baseline="black", normalise=False, **QUIET)
    theirs = np.asarray(_run(metric, tiny_cnn, x, target, a, softmax=False))                 # (5, 4) curves
    ours = pixel_flipping(tiny_cnn, x, target, a, steps=None, patch=4, baseline="image_min")
    y = ours.curves["curve"].y
    np.testing.assert_allclose(y[:, 1:].numpy(), theirs, atol=1e-5, rtol=1e-5)
    auc = 4 * ours.scores["auc"] - (y[:, 0] + y[:, 1]) / 2
    np.testing.assert_allclose(auc.numpy(), np.trapezoid(theirs, axis=1), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(auc.mean().item(), metric.get_auc_score, rtol=1e-5)


@pytest.mark.parametrize("threshold", [0.3, 0.6])
def test_sufficiency_matches_quantus(tiny_cnn, batch, threshold):
    x, target = batch
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 8, 8, generator=g)
    a = base[torch.tensor([0, 1, 0, 1, 0])] + 0.3 * torch.randn(5, 8, 8, generator=g)   # two clusters
    theirs = np.asarray(_run(quantus.Sufficiency(threshold=threshold, abs=False, normalise=False, **QUIET),
                             tiny_cnn, x, target, a, softmax=False))
    ours = sufficiency(tiny_cnn, x, target, a, threshold=threshold).scores["sufficiency"].numpy()
    alone = np.isnan(ours)
    np.testing.assert_allclose(ours[~alone], theirs[~alone], atol=1e-6)
    np.testing.assert_array_equal(theirs[alone], 0.0)                               # Quantus: 0, ours NaN
