"""Agreement with Quantus 0.6 (Completeness, NonSensitivity), per sample, on the same model, maps and baselines.

Differences of convention, and how the tests bridge them:
- Completeness: Quantus returns S == D, exact float equality (almost never true in float32); ours
  reports gap = |S - D|, rel_gap and holds within atol + rtol |D|: rtol = atol = 0 is Quantus' test.
  Quantus' D is read through its output_func hook (called on D), so the gap is compared per sample.
  Quantus' default normalise=True rescales the map by the batch maximum, which breaks the sum's
  units: the tests pass normalise=False (ours never rescales).
- Completeness's baseline input: Quantus replaces the first n entries of the flattened x, n the
  size of a_batch, so a map (B, 1, H, W) would set only x's first channel to the baseline; the
  tests give Quantus our map spread evenly over the C channels (the same sum S), so that all of x
  becomes the baseline, as ours does.
- Baselines: Quantus' "black" is each image's minimum over channels and pixels: our "image_min".
- NonSensitivity features: Quantus perturbs each of the C H W input entries alone (and its
  features_in_step > 1 fails: it XORs a (B, features) array with a (B, steps) one); ours perturbs
  whole pixels (all channels) or patches. The tests use a one-channel model, where both perturb
  the same H W pixels one at a time.
- NonSensitivity thresholds: Quantus uses one eps for the map (|a| < eps) and the output
  (|f(x) - f(x')| < eps); ours has eps (map, at or below, times the map's max when relative) and
  tolerance (output, at or below). The tests use maps with max |a| = 1, no normalisation in
  Quantus, and eps = tolerance; the two rules differ only for a value exactly at the threshold.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

quantus = pytest.importorskip("quantus")

from metrics import completeness, non_sensitivity  # noqa: E402

QUIET = {"disable_warnings": True, "display_progressbar": False}


def _call(metric, model, x, target, a):
    """Quantus on our map a (B, H, W), spread evenly over x's C channels (the same total per pixel)."""
    spread = (a[:, None] / x.shape[1]).expand_as(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=spread.numpy(),
                                 device="cpu", softmax=False, channel_first=True))


@pytest.mark.parametrize("baseline, theirs_baseline", [(0.0, 0.0), (0.5, 0.5), ("image_min", "black")])
def test_completeness_matches_quantus(tiny_cnn, batch, baseline, theirs_baseline):
    x, target = batch
    a = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def record(d):                                               # Quantus' output_func hook sees D = f(x) - f(x')
        seen.append(np.asarray(d, dtype=np.float64))
        return d

    theirs = _call(quantus.Completeness(normalise=False, abs=False, perturb_baseline=theirs_baseline,
                                        output_func=record, **QUIET), tiny_cnn, x, target, a)
    delta = np.concatenate(seen)
    ours = completeness(tiny_cnn, x, target, a, baseline=baseline, rtol=0.0, atol=0.0)
    gap = np.abs(a.double().flatten(1).sum(1).numpy() - delta)
    np.testing.assert_allclose(ours.scores["gap"].numpy(), gap, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ours.scores["rel_gap"].numpy(), gap / np.abs(delta), rtol=1e-4)
    np.testing.assert_array_equal(ours.scores["holds"].numpy().astype(bool), theirs.astype(bool))


def test_completeness_exact_equality_matches_quantus(pixel_sum):
    """Where S == D exactly (integers on the pixel-sum model), Quantus says True and so does ours at tolerance 0."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]]).view(3, 1, 2, 2)
    target = torch.tensor([0, 1, 0])
    a = torch.stack([x[0, 0], 2 * x[1, 0], x[2, 0] + 0.5])        # complete, complete, off by 2
    theirs = _call(quantus.Completeness(normalise=False, abs=False, perturb_baseline=0.0, **QUIET),
                   pixel_sum, x, target, a)
    ours = completeness(pixel_sum, x, target, a, rtol=0.0, atol=0.0)
    assert theirs.astype(bool).tolist() == [True, True, False]
    assert ours.scores["holds"].tolist() == [1.0, 1.0, 0.0] and ours.scores["gap"].tolist() == [0.0, 0.0, 2.0]


class _OneChannelNet(nn.Module):
    """conv -> ReLU -> mean -> linear on one channel, reading only the pixels of a fixed mask (others are dead)."""

    def __init__(self, size: int = 6):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 3)
        mask = torch.zeros(size, size)
        mask[1:5, 2:5] = 1
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x * self.mask)).mean(dim=(2, 3)))


@pytest.mark.parametrize("baseline, theirs_baseline", [(0.0, 0.0), ("image_min", "black")])
@pytest.mark.parametrize("eps", [1e-5, 0.2])
def test_non_sensitivity_matches_quantus(baseline, theirs_baseline, eps):
    model = _OneChannelNet().eval()
    g = torch.Generator().manual_seed(int(eps * 10))
    x = torch.randn(6, 1, 6, 6, generator=g)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    a = torch.randn(6, 6, 6, generator=g).abs() * (torch.rand(6, 6, 6, generator=g) < 0.5)   # half exact zeros
    a[0] = model.mask                                             # the map that is right
    a = a / a.flatten(1).amax(dim=1).view(-1, 1, 1)              # max |a| = 1 per map
    theirs = _call(quantus.NonSensitivity(eps=eps, features_in_step=1, normalise=False,
                                          perturb_baseline=theirs_baseline, **QUIET), model, x, target, a)
    ours = non_sensitivity(model, x, target, a, eps=eps, tolerance=eps, baseline=baseline)
    np.testing.assert_array_equal(ours.scores["violations"].numpy(), theirs.astype(np.float64))
    if eps < 1e-3:                                                # zero exactly on the 24 dead pixels
        assert ours.scores["violations"][0].item() == 0
