"""Agreement with Quantus 0.6 (Sparseness, Complexity, EffectiveComplexity), per sample, on the same maps.

Differences of convention, and how the tests bridge them:
- Features: both read one value per pixel; Quantus is given our map as (B, 1, H, W) and, like us,
  takes |a| (abs=True, its default for all three).
- Normalisation: Quantus' normalise=True (default) divides the whole batch by one maximum |a|, so
  a sample's score can depend on its batch; ours never normalises across the batch. Gini and
  entropy are scale-free, so the defaults agree; for the effective complexity's threshold our
  relative=True is each map's own maximum: equal to Quantus' default on maps whose maxima are all
  1, and relative=False equals Quantus with normalise=False on any maps.
- Sparseness: Quantus adds 1e-7 to every |a| after dividing by the batch maximum, before the Gini
  index (its all-zero map scores 0 where ours is NaN): the index moves by < 1e-6 for a map whose
  maximum is near the batch's, by 1e-3 for one 100x smaller; ours on Quantus' shifted map is exact.
- Complexity: Quantus takes ln(P + 1e-12) (its all-zero map gives NaN, as ours does).
- Thresholds: Quantus counts |a| > eps, we count |a| > eps (times the max): the same rule.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

quantus = pytest.importorskip("quantus")

from metrics import complexity, effective_complexity, sparseness  # noqa: E402


def _quantus(metric, model, x, target, a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=a[:, None].numpy(),
                                 device="cpu", channel_first=True), dtype=np.float64)


def _maps(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(5, 8, 8, generator=g) * torch.tensor([1.0, 3.0, 0.01, 100.0, 1.0]).view(5, 1, 1)
    a[1] *= torch.rand(8, 8, generator=g) < 0.3                                    # mostly zeros
    a[4] = torch.randint(-2, 3, (8, 8), generator=g).float()                        # ties
    return a


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparseness_and_complexity_match_quantus(tiny_cnn, batch, seed):
    x, target = batch
    a = _maps(seed)
    quiet = {"disable_warnings": True, "display_progressbar": False}
    theirs = _quantus(quantus.Sparseness(**quiet), tiny_cnn, x, target, a)
    # the same formula on the map Quantus scores: |a| / (batch max) + 1e-7
    shifted = (a.double().abs() / a.abs().max() + 1e-7)
    np.testing.assert_allclose(sparseness(shifted).scores["gini"].numpy(), theirs, atol=1e-7, rtol=1e-6)   # Quantus: float32
    # and on the raw maps the shift is all that differs: small where a map's max is near the batch's
    near = a.flatten(1).abs().amax(dim=1) > 0.5 * a.abs().max()
    np.testing.assert_allclose(sparseness(a).scores["gini"][near].numpy(), theirs[near.numpy()], atol=1e-6)
    theirs = _quantus(quantus.Complexity(**quiet), tiny_cnn, x, target, a)
    np.testing.assert_allclose(complexity(a).scores["entropy"].numpy(), theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("eps", [1e-5, 0.1, 0.5])
def test_effective_complexity_matches_quantus(tiny_cnn, batch, eps):
    x, target = batch
    a = _maps(int(eps * 1e5))
    quiet = {"disable_warnings": True, "display_progressbar": False}
    # absolute threshold: Quantus without its normalisation, on raw maps
    theirs = _quantus(quantus.EffectiveComplexity(eps=eps, normalise=False, **quiet), tiny_cnn, x, target, a)
    np.testing.assert_array_equal(effective_complexity(a, eps=eps, relative=False).scores["count"].numpy(), theirs)
    # relative threshold: Quantus' default (batch maximum) on maps whose maxima are all 1
    unit = a / a.flatten(1).abs().amax(dim=1).view(-1, 1, 1)
    theirs = _quantus(quantus.EffectiveComplexity(eps=eps, **quiet), tiny_cnn, x, target, unit)
    np.testing.assert_array_equal(effective_complexity(unit, eps=eps).scores["count"].numpy(), theirs)
    # ... and our relative count on the raw maps is the same, per sample
    np.testing.assert_array_equal(effective_complexity(a, eps=eps).scores["count"].numpy(), theirs)


def test_quantus_batch_normalisation_is_the_documented_difference(tiny_cnn, batch):
    """Quantus' default divides by the batch's maximum: a sample's count changes with its batch; ours does not."""
    x, target = batch
    a = _maps(0)
    quiet = {"disable_warnings": True, "display_progressbar": False}
    alone = _quantus(quantus.EffectiveComplexity(eps=0.1, **quiet), tiny_cnn, x[:1], target[:1], a[:1])
    together = _quantus(quantus.EffectiveComplexity(eps=0.1, **quiet), tiny_cnn, x, target, a)
    assert alone[0] != together[0]                               # sample 0's max (~3) is not the batch's (~300)
    ours = effective_complexity(a, eps=0.1).scores["count"]
    assert ours[0].item() == effective_complexity(a[:1], eps=0.1).scores["count"].item() == alone[0]
