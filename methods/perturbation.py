"""Perturbation family: attributions from the model's outputs on masked copies of the input.

Masked pixels take `baseline` (in the normalised space; 0.0 = the mean colour for
`shapes`). Random masks and coalitions are drawn once from `seed` and shared by every
sample, so a sample's map does not depend on its batch. Superpixels are the cells of a
regular `cells` x `cells` grid (no segmentation dependency); a cell's value is given
to each of its pixels.
"""
from __future__ import annotations

import math
from typing import Literal

import captum.attr
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods._common import attribution_method, generator
from metrics.baselines import target_output
from metrics.batching import chunked
from metrics.checks import check_float


def grid_segments(height: int, width: int, *, cells: int = 8, device: torch.device | str = "cpu") -> Tensor:
    """Superpixel labels (H, W), long, 0..S-1: a cells x cells grid of near-equal rectangles (S <= cells^2)."""
    if cells < 1:
        raise ValueError(f"cells must be a positive integer, got {cells}")
    rows = torch.arange(height, device=device) * min(cells, height) // height
    cols = torch.arange(width, device=device) * min(cells, width) // width
    return rows[:, None] * min(cells, width) + cols[None, :]


def _masked_scores(model: nn.Module, x: Tensor, target: Tensor, keep: Tensor, *, baseline: float,
                   output: Literal["logit", "softmax"], chunk_size: int | None) -> Tensor:
    """f_target(x * m_k + baseline * (1 - m_k)) for every sample and mask keep (K, H, W): (B, K)."""
    B, K = x.shape[0], keep.shape[0]

    def forward(i: Tensor) -> Tensor:                                             # i: (N,) flat index into (B, K)
        b, k = i.div(K, rounding_mode="floor"), i % K
        m = keep.index_select(0, k)[:, None]                                       # (N, 1, H, W)
        # x m + baseline (1 - m), in place in the gathered copy: no new (N, C, H, W) tensor per step
        return target_output(model, x.index_select(0, b).mul_(m).add_(baseline * (1 - m)), target[b], output)

    with torch.no_grad():
        return chunked(forward, B * K, chunk_size, device=x.device, like=x).view(B, K)


@attribution_method
def occlusion(
    model: nn.Module, x: Tensor, target: Tensor, *,
    window: int = 8, stride: int = 4, baseline: float = 0.0, perturbations_per_eval: int = 16,
) -> Tensor:
    """Occlusion (Zeiler & Fergus 2014, captum): a window x window patch over all channels slides
    with `stride`; each pixel gets the mean of f(x) - f(x occluded) over the patches covering it."""
    C, H, W = x.shape[1:]
    if not 1 <= window <= min(H, W) or stride < 1:
        raise ValueError(f"window must be in 1..{min(H, W)} and stride >= 1, got window={window}, stride={stride}")
    return captum.attr.Occlusion(model).attribute(
        x, sliding_window_shapes=(C, window, window), strides=(C, stride, stride), baselines=baseline,
        target=target, perturbations_per_eval=perturbations_per_eval)


@attribution_method
def rise(
    model: nn.Module, x: Tensor, target: Tensor, *,
    masks: int = 1000, cells: int = 8, p: float = 0.5, baseline: float = 0.0,
    output: Literal["softmax", "logit"] = "softmax", seed: int = 0, chunk_size: int | None = None,
) -> Tensor:
    """RISE (Petsiuk et al. 2018): S = sum_k f_target(x * M_k) M_k / (masks * p).

    M_k: a cells x cells grid of Bernoulli(p) cells, upsampled bilinearly to
    (cells + 1) times the cell size and cropped at a random shift (the paper's
    smooth masks); the softmax probability as in the paper. Masks from `seed`.
    """
    if masks < 1 or cells < 1 or not 0 < p < 1:
        raise ValueError(f"need masks >= 1, cells >= 1 and 0 < p < 1, got masks={masks}, cells={cells}, p={p}")
    H, W = x.shape[2:]
    g = generator(seed)
    grid = (torch.rand(masks, 1, cells, cells, generator=g) < p).to(x.dtype)       # (K, 1, s, s)
    ch, cw = math.ceil(H / cells), math.ceil(W / cells)
    up = F.interpolate(grid, size=((cells + 1) * ch, (cells + 1) * cw), mode="bilinear", align_corners=False)[:, 0]
    dy, dx = torch.randint(0, ch, (masks,), generator=g), torch.randint(0, cw, (masks,), generator=g)
    rows, cols = dy[:, None] + torch.arange(H), dx[:, None] + torch.arange(W)      # (K, H), (K, W)
    M = up[torch.arange(masks)[:, None, None], rows[:, :, None], cols[:, None, :]].to(x.device)   # (K, H, W)
    s = _masked_scores(model, x, target, M, baseline=baseline, output=output, chunk_size=chunk_size)   # (B, K)
    return torch.einsum("bk,khw->bhw", s, M)[:, None] / (masks * p)             # (B, 1, H, W)


def _coalitions(segments: int, samples: int, g: torch.Generator, kind: Literal["lime", "shap"]) -> Tensor:
    """(K, S) binary: LIME's Bernoulli(1/2) rows after an all-ones row; or sizes from the Shapley kernel."""
    if kind == "lime":
        z = (torch.rand(samples, segments, generator=g) < 0.5).float()
        z[0] = 1.0
        return z
    k = torch.arange(1, segments, dtype=torch.float64)
    size = torch.multinomial((segments - 1) / (k * (segments - k)), samples, replacement=True, generator=g) + 1
    rank = torch.rand(samples, segments, generator=g).argsort(dim=1).argsort(dim=1)
    return (rank < size[:, None]).float()                                          # |z| = size, a random subset


def _segment_scores(model: nn.Module, x: Tensor, target: Tensor, z: Tensor, *, cells: int, baseline: float,
                    output: Literal["logit", "softmax"], chunk_size: int | None) -> tuple[Tensor, Tensor]:
    """Labels (H, W) and the scores (B, K) of x with the segments of each coalition z_k kept."""
    seg = grid_segments(*x.shape[2:], cells=cells, device=x.device)
    keep = z.to(x)[:, seg]                                                          # (K, H, W)
    return seg, _masked_scores(model, x, target, keep, baseline=baseline, output=output, chunk_size=chunk_size)


@attribution_method
def lime(
    model: nn.Module, x: Tensor, target: Tensor, *,
    samples: int = 500, cells: int = 8, kernel_width: float = 0.25, ridge: float = 1.0, baseline: float = 0.0,
    output: Literal["softmax", "logit"] = "softmax", seed: int = 0, chunk_size: int | None = None,
) -> Tensor:
    """LIME (Ribeiro et al. 2016) over grid superpixels: the coefficients of a weighted ridge regression
    (with intercept) of f_target(x_z) on the coalition z in {0, 1}^S.

    z ~ Bernoulli(1/2) (first row: all kept); weights pi(z) = exp(-d^2 / (2 w^2)) with d
    the cosine distance of z to all-ones and w = kernel_width (the lime package's image
    defaults: w = 0.25, ridge alpha = 1, class probability).
    """
    check_float("kernel_width", kernel_width, 0, low_open=True)
    S = int(grid_segments(*x.shape[2:], cells=cells).max()) + 1
    z = _coalitions(S, samples, generator(seed), "lime").to(x)                      # (K, S)
    seg, y = _segment_scores(model, x, target, z, cells=cells, baseline=baseline, output=output,
                             chunk_size=chunk_size)                                 # (B, K)
    d = 1 - torch.sqrt(z.sum(dim=1) / S)                                            # cosine distance to all-ones
    pi = torch.exp(-d.square() / (2 * kernel_width ** 2))                            # (K,)
    w = pi / pi.sum()
    zc, yc = z - w @ z, y - (y @ w)[:, None]                                        # weighted centring: intercept
    gram = zc.T @ (pi[:, None] * zc) + ridge * torch.eye(S, dtype=x.dtype, device=x.device)
    coef = torch.linalg.solve(gram, zc.T @ (pi[:, None] * yc.T))                    # (S, B)
    return coef.T[:, seg][:, None]                                                  # (B, 1, H, W)


@attribution_method
def kernel_shap(
    model: nn.Module, x: Tensor, target: Tensor, *,
    samples: int = 500, cells: int = 8, baseline: float = 0.0,
    output: Literal["logit", "softmax"] = "logit", seed: int = 0, chunk_size: int | None = None,
) -> Tensor:
    """Kernel SHAP (Lundberg & Lee 2017) over grid superpixels: Shapley values of the segments,
    estimated by least squares under the efficiency constraint sum_j phi_j = f(x) - f(baseline).

    Coalition sizes are drawn from the Shapley kernel (S - 1) / (|z| (S - |z|)), members
    uniformly, so the regression is unweighted; the constraint is exact.
    """
    S = int(grid_segments(*x.shape[2:], cells=cells).max()) + 1
    if S < 2:
        raise ValueError(f"kernel_shap needs at least 2 superpixels, got cells={cells} on {tuple(x.shape[2:])}")
    z = _coalitions(S, samples, generator(seed), "shap")
    z = torch.cat([z, torch.zeros(1, S), torch.ones(1, S)]).to(x)                  # (K + 2, S): + empty, + full
    seg, y = _segment_scores(model, x, target, z, cells=cells, baseline=baseline, output=output,
                             chunk_size=chunk_size)                                 # (B, K + 2)
    empty, full, y, z = y[:, -2], y[:, -1], y[:, :-2], z[:-2]
    delta = full - empty                                                            # (B,)
    # eliminate phi_S = delta - sum_{j<S} phi_j: y - f(0) - z_S delta = sum_{j<S} phi_j (z_j - z_S)
    a = z[:, :-1] - z[:, -1:]                                                       # (K, S - 1)
    rhs = (y - empty[:, None] - z[:, -1] * delta[:, None]).T                        # (K, B)
    phi = torch.linalg.pinv(a) @ rhs                                               # (S - 1, B), min-norm if rank-deficient
    phi = torch.cat([phi, (delta - phi.sum(dim=0))[None]])                          # (S, B)
    return phi.T[:, seg][:, None]                                                   # (B, 1, H, W)


@attribution_method
def feature_ablation(
    model: nn.Module, x: Tensor, target: Tensor, *,
    cells: int = 8, baseline: float = 0.0, perturbations_per_eval: int = 16,
) -> Tensor:
    """Feature ablation over grid superpixels (captum FeatureAblation; Zeiler & Fergus 2014):
    each segment gets f(x) - f(x with that segment set to baseline)."""
    seg = grid_segments(*x.shape[2:], cells=cells, device=x.device)
    return captum.attr.FeatureAblation(model).attribute(
        x, baselines=baseline, target=target, feature_mask=seg[None, None],
        perturbations_per_eval=perturbations_per_eval)
