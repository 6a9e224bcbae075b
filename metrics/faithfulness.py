"""Faithfulness: does removing what the map calls relevant change the model's output?

Shared conventions of the perturbation metrics (helpers in metrics._perturb):
- A pixel is removed in all channels at once; steps are whole pixels, or whole patches.
- Ties in the ranking are broken by a seeded random permutation of positions, the same for
  every map, never by the sort's accident: a constant map removes pixels in a random order.
- A sample's score depends on that sample alone: maps are never normalised across the
  batch, baselines are computed per image, and random draws are shared by all samples.
- Every (sample, step) goes through the model `chunk_size` inputs at a time; None (default)
  sizes chunks from a memory budget (metrics._chunk.CHUNK_BYTES: 2 MiB of inputs on CPU, where
  cache-sized chunks run fastest, 512 MiB on a GPU). Numbers never depend on the chunk size.
- Baselines (`baseline=`): a float is a constant in the model's (normalised) input space
  (0.0 = the dataset mean for standardised data, mid-grey on `shapes`); "black" is each
  image's own minimum over channels and pixels (Quantus' convention; the data's darkest
  value, not zero); "mean" each image's per-channel mean; "blur" a Gaussian blur of the image
  (sigma = 5 px); "uniform" a seeded noise field, shared by all samples, scaled to each image's
  [min, max]; a tensor broadcastable to x (B, C, H, W) is used as given. ROAD's noisy linear
  imputation depends on the removal mask and is `road`'s own fill.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from metrics._chunk import chunked
from metrics._perturb import (
    Baseline, _baseline_fill, _check_choice, _check_inputs, _noisy_linear_imputation,
    _perturbation_curves, _removed_at, _static_fill, _target_output,
)
from metrics._result import Curve, MetricResult

__all__ = ["pixel_flipping", "deletion", "insertion", "road", "faithfulness_correlation", "infidelity"]

Order = Literal["morf", "lerf", "both"]


def _check_steps(x: Tensor, steps: int, patch: int, output: str) -> int:
    """Validate steps/patch/output; return the number of removal units (pixels or patches)."""
    _check_choice("output", output, ("logit", "softmax"))
    H, W = x.shape[-2:]
    if not isinstance(patch, int) or not 1 <= patch <= min(H, W):
        raise ValueError(f"patch must be an integer between 1 and min(H, W) = {min(H, W)}, got {patch!r}")
    n = -(-H // patch) * -(-W // patch)
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be between 1 and the number of {'patches' if patch > 1 else 'pixels'} "
                         f"({n}), got {steps}")
    return n


def _orders(order: str) -> list[str]:
    _check_choice("order", order, ("morf", "lerf", "both"))
    return ["morf", "lerf"] if order == "both" else [order]


def _fraction_axis(n: int, steps: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """x_k = ceil(k n / steps) / n: the exact fraction of units removed after k steps, (K,)."""
    k = torch.arange(steps + 1, device=device, dtype=torch.float64)
    return (torch.ceil(k * n / steps) / n).to(dtype)


def _curve_results(y: Tensor, orders: list[str], frac: Tensor, steps: int) -> dict[str, Tensor]:
    """Split (B, 1 + R steps) into one (B, steps + 1) curve per order."""
    return {o: torch.cat([y[:, :1], y[:, 1 + r * steps:1 + (r + 1) * steps]], dim=1) for r, o in enumerate(orders)}


def pixel_flipping(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W), already normalised
    target: Tensor,               # (B,)
    attribution: Tensor,          # (B, H, W), channel-reduced map
    *,
    steps: int = 16,
    order: Order = "morf",
    patch: int = 1,
    baseline: Baseline = 0.0,
    output: Literal["logit", "softmax"] = "logit",
    seed: int = 0,
    chunk_size: int | None = None,
) -> MetricResult:
    """Pixel flipping (Bach et al. 2015) and region perturbation (Samek et al. 2017), AUC, AOPC, SRG.

    Units (pixels, or patch x patch squares of a fixed grid ranked by the map's sum over them)
    are removed in `steps` equal groups, most relevant first (MoRF) or least relevant first
    (LeRF), and replaced by `baseline` (module docstring). f_k is the target output after k
    groups, f_0 the unperturbed input; x_k = ceil(k n / steps) / n is the exact fraction of
    units removed. AUC = trapezoid of f_k over x_k (x in [0, 1]); AOPC = mean over k = 0..steps
    of (f_0 - f_k). order="both" computes both curves and adds SRG = AUC(LeRF) - AUC(MoRF)
    (symmetric relevance gain, Bluecher et al. 2024), with scores auc_morf, auc_lerf, aopc_morf,
    aopc_lerf, srg. Logits are the default output: on a near-perfect model the softmax stays
    saturated at 1 until the object is almost gone, which hides differences between methods.
    """
    _check_inputs(x, target, attribution)
    orders = _orders(order)
    n = _check_steps(x, steps, patch, output)
    removed_at = torch.stack([_removed_at(attribution, steps=steps, descending=o == "morf", patch=patch, seed=seed)
                              for o in orders])                                   # (R, B, HW)
    fill = _static_fill(_baseline_fill(x, baseline, seed=seed))
    y = _perturbation_curves(model, x, target, removed_at, fill, steps=steps, insert=False, output=output,
                             chunk_size=chunk_size)                               # (B, 1 + R steps)
    frac = _fraction_axis(n, steps, x.device, y.dtype)                            # (K,)
    curves = _curve_results(y, orders, frac, steps)
    auc = {o: torch.trapezoid(c, frac, dim=1) for o, c in curves.items()}
    aopc = {o: (c[:, :1] - c).mean(dim=1) for o, c in curves.items()}
    if order != "both":
        return MetricResult(scores={"auc": auc[order], "aopc": aopc[order]}, curves={"curve": Curve(frac, y)},
                            higher_is_better={"auc": order == "lerf", "aopc": order == "morf"})
    return MetricResult(
        scores={"auc_morf": auc["morf"], "auc_lerf": auc["lerf"], "aopc_morf": aopc["morf"],
                "aopc_lerf": aopc["lerf"], "srg": auc["lerf"] - auc["morf"]},
        curves={"morf": Curve(frac, curves["morf"]), "lerf": Curve(frac, curves["lerf"])},
        higher_is_better={"auc_morf": False, "auc_lerf": True, "aopc_morf": True, "aopc_lerf": False, "srg": True},
    )


def _deletion_insertion(model: nn.Module, x: Tensor, target: Tensor, attribution: Tensor, *, insert: bool,
                        steps: int, baseline: Baseline, output: str, seed: int,
                        chunk_size: int | None) -> MetricResult:
    _check_inputs(x, target, attribution)
    n = _check_steps(x, steps, 1, output)
    removed_at = _removed_at(attribution, steps=steps, descending=True, patch=1, seed=seed)[None]   # (1, B, HW)
    fill = _static_fill(_baseline_fill(x, baseline, seed=seed))
    y = _perturbation_curves(model, x, target, removed_at, fill, steps=steps, insert=insert, output=output,
                             chunk_size=chunk_size)                               # (B, K)
    frac = _fraction_axis(n, steps, x.device, y.dtype)
    return MetricResult(scores={"auc": torch.trapezoid(y, frac, dim=1)}, curves={"curve": Curve(frac, y)},
                        higher_is_better={"auc": insert})


def deletion(
    model: nn.Module, x: Tensor, target: Tensor, attribution: Tensor, *,
    steps: int = 16, baseline: Baseline = 0.0, output: Literal["logit", "softmax"] = "softmax",
    seed: int = 0, chunk_size: int | None = None,
) -> MetricResult:
    """Deletion (Petsiuk et al. 2018, RISE): AUC of the target probability as pixels go, MoRF.

    Pixels are set to `baseline` in `steps` equal groups, most relevant first; the curve starts
    at the unperturbed input and ends at the all-baseline image; AUC over the fraction deleted
    (x in [0, 1]), lower is better. Same removal rule, ties and baselines as pixel_flipping;
    the paper's softmax probability is the default output.
    """
    return _deletion_insertion(model, x, target, attribution, insert=False, steps=steps, baseline=baseline,
                               output=output, seed=seed, chunk_size=chunk_size)


def insertion(
    model: nn.Module, x: Tensor, target: Tensor, attribution: Tensor, *,
    steps: int = 16, baseline: Baseline = "blur", output: Literal["logit", "softmax"] = "softmax",
    seed: int = 0, chunk_size: int | None = None,
) -> MetricResult:
    """Insertion (Petsiuk et al. 2018, RISE): AUC of the target probability as pixels come back.

    Starts from the baseline image (default: the blurred input, as in the paper) and restores
    the input's pixels in `steps` equal groups, most relevant first; the curve runs from the
    all-baseline image (x = 0) to the input (x = 1); AUC over the fraction inserted, higher is
    better. Ties and baselines as in pixel_flipping.
    """
    return _deletion_insertion(model, x, target, attribution, insert=True, steps=steps, baseline=baseline,
                               output=output, seed=seed, chunk_size=chunk_size)


def road(
    model: nn.Module, x: Tensor, target: Tensor, attribution: Tensor, *,
    steps: int = 10, order: Order = "both", noise: float = 0.01, output: Literal["logit", "softmax"] = "logit",
    iterations: int | None = None, seed: int = 0, chunk_size: int | None = None,
) -> MetricResult:
    """ROAD, Remove And Debias (Rong et al. 2022): pixel flipping with noisy linear imputation.

    A removed pixel is not set to a constant (whose shape would leak the mask) but imputed as
    the weighted mean of its 8 neighbours (1/6 direct, 1/12 diagonal; the sparse linear system
    over all removed pixels, solved per channel), plus Gaussian noise of std `noise` in the
    input space, one seeded field per step shared by all samples. With every pixel removed the
    system has no data and the image is 0 + noise. Removal order, steps, AUC and SRG as in
    pixel_flipping (default: both orders, 10 steps, the paper's 10 %..90 % plus both ends). The
    solver runs `iterations` conjugate-gradient steps (None: 2 max(H, W), error < 1e-4 at 64 px).
    """
    _check_inputs(x, target, attribution)
    orders = _orders(order)
    n = _check_steps(x, steps, 1, output)
    if noise < 0:
        raise ValueError(f"noise must be a non-negative standard deviation, got {noise}")
    removed_at = torch.stack([_removed_at(attribution, steps=steps, descending=o == "morf", patch=1, seed=seed)
                              for o in orders])                                   # (R, B, HW)
    its = 2 * max(x.shape[-2:]) if iterations is None else iterations
    if its < 0:
        raise ValueError(f"iterations must be None or a non-negative integer, got {iterations}")
    g = torch.Generator().manual_seed(seed)
    field = noise * torch.randn((1 + len(orders) * steps, *x.shape[1:]), generator=g, dtype=x.dtype).to(x.device)

    def fill(xb: Tensor, keep: Tensor, b: Tensor, j: Tensor) -> Tensor:
        return _noisy_linear_imputation(xb, keep, field[j], iterations=its)

    y = _perturbation_curves(model, x, target, removed_at, fill, steps=steps, insert=False, output=output,
                             chunk_size=chunk_size)
    frac = _fraction_axis(n, steps, x.device, y.dtype)
    curves = _curve_results(y, orders, frac, steps)
    auc = {o: torch.trapezoid(c, frac, dim=1) for o, c in curves.items()}
    scores = {f"auc_{o}": auc[o] for o in orders}
    hib = {f"auc_{o}": o == "lerf" for o in orders}
    if order == "both":
        scores["srg"], hib["srg"] = auc["lerf"] - auc["morf"], True
    return MetricResult(scores=scores, curves={o: Curve(frac, c) for o, c in curves.items()}, higher_is_better=hib)


def faithfulness_correlation(
    model: nn.Module, x: Tensor, target: Tensor, attribution: Tensor, *,
    subsets: int = 32, fraction: float = 0.05, baseline: Baseline = 0.0,
    output: Literal["logit", "softmax"] = "logit", seed: int = 0, chunk_size: int | None = None,
) -> MetricResult:
    """Faithfulness correlation (Bhatt et al. 2020): Pearson r over random pixel subsets S.

    For `subsets` seeded subsets S of round(fraction H W) pixels (at least 1; the same subsets for
    every sample; Quantus' default of 224 px of a 224 x 224 image is fraction 0.0045),
    r = corr_S(sum_{p in S} a_p, f(x) - f(x with S set to `baseline`)). Higher is better; NaN
    where either side is constant over the subsets (e.g. a constant map).
    """
    _check_inputs(x, target, attribution)
    _check_choice("output", output, ("logit", "softmax"))
    B, C, H, W = x.shape
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], the share of pixels in each subset, got {fraction}")
    subset_size = max(1, round(fraction * H * W))
    if subsets < 2:
        raise ValueError(f"subsets must be at least 2 to define a correlation, got {subsets}")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(subsets, H * W, generator=g).argsort(dim=1)[:, :subset_size].to(x.device)
    drop = torch.zeros(subsets, H * W, dtype=torch.bool, device=x.device).scatter_(1, chosen, True)   # (S, HW)
    fill = _baseline_fill(x, baseline, seed=seed).expand_as(x)                      # (B, C, H, W)

    def forward(i: Tensor) -> Tensor:                                              # i: flat into (B, S)
        b, s = i.div(subsets, rounding_mode="floor"), i % subsets
        keep = ~drop[s].view(-1, 1, H, W)
        return _target_output(model, torch.where(keep, x[b], fill[b]), target[b], output)

    with torch.inference_mode():
        f0 = _target_output(model, x, target, output)                              # (B,)
        delta = f0[:, None] - chunked(forward, B * subsets, chunk_size, device=x.device, like=x).view(B, subsets)
    a_sum = attribution.reshape(B, 1, H * W).to(delta.dtype).mul(drop.to(delta.dtype)).sum(dim=2)     # (B, S)
    return MetricResult(scores={"pearson": _pearson(a_sum, delta)}, higher_is_better={"pearson": True})


def _pearson(u: Tensor, v: Tensor) -> Tensor:
    """Row-wise Pearson correlation of (B, S) tensors; NaN where a row is constant."""
    u, v = u - u.mean(dim=1, keepdim=True), v - v.mean(dim=1, keepdim=True)
    den = u.norm(dim=1) * v.norm(dim=1)
    return torch.where(den > 0, (u * v).sum(dim=1) / den, torch.nan)


def infidelity(
    model: nn.Module, x: Tensor, target: Tensor, attribution: Tensor, *,
    perturbations: int = 16, noise_std: float = 0.2, normalize: bool = True,
    output: Literal["logit", "softmax"] = "logit", seed: int = 0, chunk_size: int | None = None,
) -> MetricResult:
    """Infidelity (Yeh et al. 2019): E_I[(I . a - (f(x) - f(x - I)))^2], lower is better.

    I is seeded Gaussian noise of std `noise_std` per pixel, the same in every channel (so the
    channel-summed map gives exactly I . a of the full attribution) and the same draws for every
    sample. With `normalize`, a is first scaled by beta = E[I.a Df] / E[(I.a)^2], the least-squares
    optimal factor (captum's `normalize=True`), so the score ignores the map's scale; beta = 0 when
    I.a is always 0. Matches captum.metrics.infidelity given the same perturbations.
    """
    _check_inputs(x, target, attribution)
    _check_choice("output", output, ("logit", "softmax"))
    if perturbations < 1 or noise_std <= 0:
        raise ValueError(f"perturbations must be >= 1 and noise_std > 0, got {perturbations} and {noise_std}")
    B, C, H, W = x.shape
    g = torch.Generator().manual_seed(seed)
    noise = (noise_std * torch.randn(perturbations, 1, H, W, generator=g, dtype=x.dtype)).to(x.device)   # (S, 1, H, W)

    def forward(i: Tensor) -> Tensor:                                              # i: flat into (B, S)
        b, s = i.div(perturbations, rounding_mode="floor"), i % perturbations
        return _target_output(model, x[b] - noise[s], target[b], output)

    with torch.inference_mode():
        f0 = _target_output(model, x, target, output)
        f = chunked(forward, B * perturbations, chunk_size, device=x.device, like=x)
        delta = f0[:, None] - f.view(B, perturbations)
    dot = (noise.view(1, perturbations, H * W) * attribution.reshape(B, 1, H * W)).sum(dim=2).to(delta.dtype)  # (B, S)
    if normalize:
        den = (dot * dot).sum(dim=1, keepdim=True)
        beta = torch.where(den > 0, (dot * delta).sum(dim=1, keepdim=True) / den.clamp_min(1e-30), 0.0)
        dot = beta * dot
    return MetricResult(scores={"infidelity": ((dot - delta) ** 2).mean(dim=1)},
                        higher_is_better={"infidelity": False})
