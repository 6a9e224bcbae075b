"""Agreement with Quantus 0.6 (an independent implementation), conventions reproduced by our parameters.

Where the two differ, and how the tests bridge it:
- Ties: Quantus orders features with numpy's unstable argsort, so tied maps give arbitrary orders;
  ours breaks ties with a seeded permutation. The maps here are continuous draws: no ties.
- Features: Quantus flattens C x H x W and, given our map repeated over the channels, ranks every
  channel of a pixel equally; with no ties between pixels `features_in_step = C * p` therefore
  removes p whole pixels per step, as ours does (steps = HW / p).
- "black": Quantus' is each image's minimum value over channels and pixels: our baseline="image_min".
- Normalisation: Quantus divides the maps by one maximum over the whole batch (normalise=True),
  which does not change any sample's order; we never normalise across the batch.
- Curves: Quantus' pixel-flipping curve starts after the first step (ours has the unperturbed
  f_0 at x = 0); its region-perturbation curve is the drop f_0 - f_k.
- Region grid: Quantus centres its patch grid on the image (padding split on both sides), ours
  starts at the top-left corner (partial patches at the right and bottom); the same grid when the
  patch size divides H and W, which the tests use.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

quantus = pytest.importorskip("quantus")

from metrics import pixel_flipping  # noqa: E402
from metrics._perturb import _noisy_linear_imputation  # noqa: E402


def _quiet(metric, model, x, target, a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=a[:, None].expand_as(x).numpy(),
                                 device="cpu", softmax=False, channel_first=True))


@pytest.mark.parametrize("pixels_per_step", [1, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_flipping_matches_quantus(tiny_cnn, batch, pixels_per_step, seed):
    # Quantus asserts that features_in_step divides H * W (not C * H * W): 6 x 6 images allow 3 and 12
    x, target = batch
    x = x[:, :, 1:7, 1:7].contiguous()
    a = torch.randn(5, 6, 6, generator=torch.Generator().manual_seed(seed))       # continuous: no ties
    theirs = _quiet(quantus.PixelFlipping(features_in_step=3 * pixels_per_step, perturb_baseline="black",
                                          disable_warnings=True, display_progressbar=False), tiny_cnn, x, target, a)
    ours = pixel_flipping(tiny_cnn, x, target, a, steps=36 // pixels_per_step, baseline="image_min")
    assert theirs.shape == (5, 36 // pixels_per_step)
    np.testing.assert_allclose(ours.curves["curve"].y[:, 1:].numpy(), theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("patch", [2, 4])
@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_region_perturbation_matches_quantus(tiny_cnn, batch, patch, order):
    x, target = batch
    a = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(patch))
    regions = (8 // patch) ** 2
    theirs = _quiet(quantus.RegionPerturbation(patch_size=patch, order=order, regions_evaluation=regions,
                                               perturb_baseline="black", disable_warnings=True,
                                               display_progressbar=False), tiny_cnn, x, target, a)
    ours = pixel_flipping(tiny_cnn, x, target, a, steps=regions, order=order, patch=patch, baseline="image_min")
    y = ours.curves["curve"].y
    np.testing.assert_allclose((y[:, :1] - y[:, 1:]).numpy(), theirs, atol=1e-5, rtol=1e-5)
    # the same through order="both"
    both = pixel_flipping(tiny_cnn, x, target, a, steps=regions, order="both", patch=patch, baseline="image_min")
    torch.testing.assert_close(both.curves[order].y, y)


def test_noisy_linear_imputation_matches_quantus():
    from quantus.functions.perturb_func import noisy_linear_imputation

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, 11, generator=g, dtype=torch.float64)
    keep = torch.rand(9, 11, generator=g) > 0.6
    keep[:, 4:8] = False                                                            # and one large hole
    removed = np.flatnonzero(~keep.numpy().reshape(-1))
    theirs = noisy_linear_imputation(x.numpy(), removed, noise=0.0)
    ours = _noisy_linear_imputation(x[None], keep.view(1, 1, 9, 11), torch.zeros(1, 3, 9, 11, dtype=torch.float64),
                                    iterations=200)
    np.testing.assert_allclose(ours[0].numpy(), theirs, atol=1e-8, rtol=0)


@pytest.mark.parametrize("regions", [1, 4, 9])
def test_region_perturbation_budget_matches_quantus(tiny_cnn, batch, regions):
    """Samek et al.'s AOPC over the first L regions: Quantus' regions_evaluation=L against our max_fraction =
    L / (number of regions), one region per step; AOPC = mean over k = 0..L of f_0 - f_k."""
    x, target = batch
    a = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(regions))
    theirs = _quiet(quantus.RegionPerturbation(patch_size=2, order="morf", regions_evaluation=regions,
                                               perturb_baseline="black", disable_warnings=True,
                                               display_progressbar=False), tiny_cnn, x, target, a)
    ours = pixel_flipping(tiny_cnn, x, target, a, steps=regions, patch=2, max_fraction=regions / 16, baseline="image_min")
    y = ours.curves["curve"].y
    assert theirs.shape == (5, regions)
    np.testing.assert_allclose((y[:, :1] - y[:, 1:]).numpy(), theirs, atol=1e-5, rtol=1e-5)
    aopc = np.concatenate([np.zeros((5, 1)), theirs], axis=1).mean(axis=1)
    np.testing.assert_allclose(ours.scores["aopc"].numpy(), aopc, atol=1e-5, rtol=1e-5)
