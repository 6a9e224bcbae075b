"""Helpers of the perturbation metrics: input checks, removal order, fills, ROAD's imputation.

Baselines and the target output are public, shared with the methods: metrics.baselines."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metrics.checks import check_finite, check_target
from metrics.baselines import target_output
from metrics.batching import chunked

# ROAD's noisy linear imputation (Rong et al. 2022): a removed pixel is the weighted mean of its
# 8 neighbours, 1/6 for the 4 direct and 1/12 for the 4 diagonal ones
_ROAD_KERNEL = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])
FillFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]   # (x_b, keep, b, j) -> fill values


def _check_inputs(model_input: Tensor, target: Tensor, attribution: Tensor) -> Tensor:
    """Shape, dtype and finiteness checks shared by the perturbation metrics; returns target as int64."""
    if not isinstance(model_input, Tensor) or model_input.ndim != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(getattr(model_input, 'shape', ()))}")
    B, _, H, W = model_input.shape
    if B == 0:
        raise ValueError("x holds no samples (B = 0): pass a batch of at least one image")
    if attribution.shape != (B, H, W):
        raise ValueError(
            f"attribution must be a channel-reduced map of shape {(B, H, W)}, got {tuple(attribution.shape)}; "
            "reduce an attribution (B, C, H, W) with metrics.to_map first"
        )
    target = check_target(target, B)
    check_finite("attribution", attribution, "a map must be finite to define an order of pixels")
    return target


def _removal_rank(attribution: Tensor, *, descending: bool, seed: int) -> Tensor:
    """Position (0 = first removed) of every pixel; ties broken by one seeded permutation shared by all maps."""
    B, n = attribution.shape[0], attribution[0].numel()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(attribution.device)   # (n,)
    order = attribution.reshape(B, n)[:, perm].argsort(dim=1, descending=descending, stable=True)     # (B, n)
    pixel = perm[order]                                                                               # (B, n)
    rank = torch.empty_like(pixel)
    rank.scatter_(1, pixel, torch.arange(n, device=pixel.device).expand(B, n))
    return rank                                                                                       # (B, n)


def _patch_sums(attribution: Tensor, patch: int) -> Tensor:
    """Sum of the map over a grid of non-overlapping patch x patch squares (partial ones at the far edges)."""
    B, H, W = attribution.shape
    Hp, Wp = math.ceil(H / patch), math.ceil(W / patch)
    a = F.pad(attribution, (0, Wp * patch - W, 0, Hp * patch - H))                # (B, Hp p, Wp p), zeros
    return a.view(B, Hp, patch, Wp, patch).sum(dim=(2, 4))                         # (B, Hp, Wp)


def _removed_at(attribution: Tensor, *, steps: int, descending: bool, patch: int, seed: int,
                budget: int | None = None) -> Tensor:
    """Step 1..steps at which each pixel is removed: units (pixels or patches) ranked, the first `budget`
    of them (default: all) in `steps` equal groups; units past the budget get steps + 1 (never removed)."""
    B, H, W = attribution.shape
    units = _patch_sums(attribution, patch) if patch > 1 else attribution            # (B, Hu, Wu)
    n = units[0].numel()
    m = n if budget is None else budget
    rank = _removal_rank(units, descending=descending, seed=seed)                    # (B, n)
    at = (rank * steps).div(m, rounding_mode="floor") + 1                            # (B, n): ceil(k m / steps) by k
    at = at.clamp_max(steps + 1).to(torch.int16 if steps < 2 ** 15 - 1 else torch.int32)   # less to gather per chunk
    if patch > 1:
        at = at.view(B, *units.shape[1:]).repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, :H, :W]
    return at.reshape(B, H * W)                                                      # (B, HW)


def _static_fill(fill: Tensor) -> FillFn:
    """A fill that does not depend on the removal mask: index its batch axis if it has one."""
    per_sample = fill.ndim == 4 and fill.shape[0] > 1
    return lambda xb, keep, b, j: fill[b] if per_sample else (fill[0] if fill.ndim == 4 else fill)


def _noisy_linear_imputation(x: Tensor, keep: Tensor, noise: Tensor, *, iterations: int) -> Tensor:
    """ROAD's imputation: removed pixels solve x_p = sum_q w_q x_q / sum_q w_q over in-image neighbours q.

    x (N, C, H, W), keep (N, 1, H, W) bool, noise (N, C, H, W) added to the imputed pixels. The
    sparse system is solved by Jacobi-preconditioned conjugate gradients, batched over samples
    and channels, for a fixed number of `iterations` (no host sync; CG needs about the hole's
    diameter in iterations: 2 max(H, W) gave errors below 1e-4 on 64 px images).
    """
    k = _ROAD_KERNEL.to(device=x.device, dtype=x.dtype).view(1, 1, 3, 3)
    nb = lambda v: F.conv2d(v, k.expand(v.shape[1], 1, 3, 3), padding=1, groups=v.shape[1])  # neighbour sums
    u = (~keep).to(x.dtype)                                                        # (N, 1, H, W) unknowns
    s = nb(torch.ones_like(u[:1]))                                                 # (1, 1, H, W) weights in image
    A = lambda v: u * (s * v - nb(v))                                              # SPD on the unknowns
    b = u * nb(x * (1 - u))                                                        # known neighbours' pull
    v = torch.zeros_like(x)
    r = b.clone()
    z = r / s
    p = z.clone()
    rz = (r * z).sum(dim=(2, 3), keepdim=True)                                     # (N, C, 1, 1)
    for _ in range(iterations):
        Ap = A(p)
        alpha = rz / (p * Ap).sum(dim=(2, 3), keepdim=True).clamp_min(1e-30)
        v, r = v + alpha * p, r - alpha * Ap
        z = r / s
        rz_new = (r * z).sum(dim=(2, 3), keepdim=True)
        p = z + rz_new / rz.clamp_min(1e-30) * p
        rz = rz_new
    return torch.where(keep, x, v + noise)


def _perturbation_curves(
    model: nn.Module, x: Tensor, target: Tensor, removed_at: Tensor, fill: FillFn, *,
    steps: int, insert: bool, output: str, chunk_size: int | None, top1: bool = False,
) -> Tensor:
    """Target output for every sample at step 0 and at steps 1..steps of every order: (B, 1 + R steps),
    or with `top1` (B, 1 + R steps, 2), the second entry 1.0 where the target is still the prediction.

    removed_at (R, B, HW) holds R orders; column j = 0 is step 0 (the unperturbed input, or the
    all-baseline input when inserting), j = 1 + r steps + (k - 1) is step k of order r. A pixel
    shows x while it is not yet removed (deletion) or once it is inserted (insertion).
    """
    R, B, n = removed_at.shape
    _, C, H, W = x.shape
    J = 1 + R * steps
    unchecked = [True]                                                             # targets checked on chunk 1

    def forward(i: Tensor) -> Tensor:                                              # i: (N,) flat into (B, J)
        b, j = i.div(J, rounding_mode="floor"), i % J
        r = (j - 1).clamp_min(0).div(steps, rounding_mode="floor")
        k = torch.where(j == 0, 0, (j - 1) % steps + 1).to(removed_at.dtype)[:, None]
        at = removed_at[r, b]                                                      # (N, HW)
        keep = (at <= k if insert else at > k).view(-1, 1, H, W)                   # (N, 1, H, W)
        xb = x.index_select(0, b)                                                  # (N, C, H, W)
        y = target_output(model, torch.where(keep, xb, fill(xb, keep, b, j), out=xb), target[b], output,
                           check=target if unchecked[0] else None, top1=top1)
        unchecked[0] = False                                                       # after a chunk that ran
        return y

    with torch.inference_mode():
        y = chunked(forward, B * J, chunk_size, device=x.device, like=x)
    return y.view(B, J, 2) if top1 else y.view(B, J)                               # (B, J[, 2])
