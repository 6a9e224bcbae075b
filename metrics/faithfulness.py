"""Faithfulness: does removing what the map calls relevant change the model's output?

Shared conventions of the perturbation metrics (helpers in metrics._perturb):
- A pixel is removed in all channels at once; steps are whole pixels, or whole patches.
- The map each consumes (metrics._map): infidelity and faithfulness correlation take the signed
  channel sum (their formulas are of the signed attribution: I^T phi, a subset's sum); ROAD ranks
  by the signed sum as its authors' code does; pixel flipping / region perturbation and
  deletion / insertion rank by the run's reduced map: Samek et al.'s heatmaps differ per method
  (LRP's signed channel sum, sensitivity's gradient norm) and Petsiuk et al.'s saliency maps are
  single-channel, so the run's `reduce` (in its manifest) is their map.
- Ties in the ranking are broken by a seeded random permutation of positions, the same for
  every map, never by the sort's accident: a constant map removes pixels in a random order.
- A sample's score depends on that sample alone: maps are never normalised across the
  batch, baselines are computed per image, and random draws are shared by all samples.
- Every (sample, step) goes through the model `chunk_size` inputs at a time; None (default)
  sizes chunks from a memory budget (metrics.batching.CHUNK_BYTES: 2 MiB of inputs on CPU, where
  cache-sized chunks run fastest, 512 MiB on a GPU). Numbers never depend on the chunk size.
- Baselines (`baseline=`) are the methods' vocabulary, metrics.baselines: a float is a constant in
  the model's (normalised) input space (0.0 = the dataset mean for standardised data, mid-grey on
  `shapes`); "image_min" each image's minimum over channels and pixels (Quantus' "black");
  "channel_min" each channel's minimum (the data's black); "mean" each image's per-channel mean;
  "blur" a Gaussian blur of the image (sigma = 5 px); "uniform" a seeded noise field, shared by all
  samples, scaled to each image's [min, max]; a tensor broadcastable to x (B, C, H, W) is used as
  given. ROAD's noisy linear imputation depends on the removal mask and is `road`'s own fill.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from metrics.checks import check_bool, check_choice, check_float, check_int
from metrics.baselines import Baseline, baseline_fill, target_output
from metrics.batching import chunked
from metrics._map import consumes
from metrics._perturb import _check_inputs, _noisy_linear_imputation, _perturbation_curves, _removed_at, _static_fill
from metrics._result import Curve, MetricResult
from metrics._similarity import _pearson                      # the one Pearson (float64), also spearman's

__all__ = ["pixel_flipping", "deletion", "insertion", "road", "faithfulness_correlation", "infidelity"]

Order = Literal["morf", "lerf", "both"]


def _check_options(output: str, seed: int) -> None:
    check_choice("output", output, ("logit", "softmax"))
    check_int("seed", seed, 0)


def _check_steps(x: Tensor, steps: int | None, patch: int, max_fraction: float = 1.0) -> tuple[int, int]:
    """Validate steps/patch/max_fraction (steps None: one unit per step); return the number of removal units
    n (pixels or patches) and the budget m = ceil(max_fraction n) of units removed by the last step."""
    H, W = x.shape[-2:]
    check_int("patch", patch, 1, min(H, W), high_name="min(H, W)")
    n = -(-H // patch) * -(-W // patch)
    check_float("max_fraction", max_fraction, 0, 1, low_open=True, meaning=" (the share of units removed by the "
                "last step)")
    m = max(1, math.ceil(max_fraction * n - 1e-9))
    units = "patches" if patch > 1 else "pixels"
    if steps is not None:
        check_int("steps", steps, 1, m, high_name=f"the number of {units}" if m == n else
                  f"the {units} in max_fraction={max_fraction}")
    return n, m


def _orders(order: str) -> list[str]:
    check_choice("order", order, ("morf", "lerf", "both"))
    return ["morf", "lerf"] if order == "both" else [order]


def _fraction_axis(n: int, m: int, steps: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """x_k = ceil(k m / steps) / n: the exact fraction of the n units removed after k steps, (K,)."""
    k = torch.arange(steps + 1, device=device, dtype=torch.float64)
    return (torch.ceil(k * m / steps) / n).to(dtype)


def _curve_results(y: Tensor, orders: list[str], frac: Tensor, steps: int) -> dict[str, Tensor]:
    """Split (B, 1 + R steps) into one (B, steps + 1) curve per order."""
    return {o: torch.cat([y[:, :1], y[:, 1 + r * steps:1 + (r + 1) * steps]], dim=1) for r, o in enumerate(orders)}


def pixel_flipping(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W), already normalised
    target: Tensor,               # (B,)
    attribution: Tensor,          # (B, H, W), channel-reduced map
    *,
    steps: int | None = 16,
    order: Order = "morf",
    patch: int = 1,
    max_fraction: float = 1.0,
    baseline: Baseline = 0.0,
    output: Literal["logit", "softmax"] = "logit",
    seed: int = 0,
    chunk_size: int | None = None,
) -> MetricResult:
    """Pixel flipping (Bach et al. 2015) and region perturbation (Samek et al. 2017), AUC, AOPC, SRG.

    Units (pixels, or patch x patch squares of a fixed grid ranked by the map's sum over them)
    are ranked most relevant first (MoRF) or least relevant first (LeRF); the first
    m = ceil(max_fraction n) of the n units are removed in `steps` equal groups and replaced by
    `baseline` (module docstring; steps=None: one unit per step, m steps). f_k is the target output
    after k groups, f_0 the unperturbed input; x_k = ceil(k m / steps) / n is the exact fraction of units removed.
    AUC = trapezoid of f_k over x_k (x in [0, max_fraction]); AOPC = 1/(L+1) sum_{k=0..L} (f_0 - f_k),
    L = steps. Samek et al.'s AOPC removes one region per step for L = 100 steps, 9x9 regions at
    224 px: 100 of ~620 regions, max_fraction = 0.16 (conf/experiment/samek2017.yaml); the default
    max_fraction = 1 averages over the removal of the whole image. order="both" computes both
    curves and adds SRG = AUC(LeRF) - AUC(MoRF) (symmetric relevance gain, Bluecher et al. 2024),
    scores auc_morf, auc_lerf, aopc_morf, aopc_lerf, srg. Logits are the default output: on a
    near-perfect model the softmax stays saturated at 1 until the object is almost gone.
    """
    target = _check_inputs(x, target, attribution)
    orders = _orders(order)
    _check_options(output, seed)
    n, m = _check_steps(x, steps, patch, max_fraction)
    steps = m if steps is None else steps                                         # None: one unit per step
    removed_at = torch.stack([_removed_at(attribution, steps=steps, descending=o == "morf", patch=patch, seed=seed,
                                          budget=m) for o in orders])             # (R, B, HW)
    fill = _static_fill(baseline_fill(x, baseline, seed=seed))
    y = _perturbation_curves(model, x, target, removed_at, fill, steps=steps, insert=False, output=output,
                             chunk_size=chunk_size)                               # (B, 1 + R steps)
    frac = _fraction_axis(n, m, steps, x.device, y.dtype)                         # (K,)
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
    target = _check_inputs(x, target, attribution)
    _check_options(output, seed)
    n, _ = _check_steps(x, steps, 1)
    removed_at = _removed_at(attribution, steps=steps, descending=True, patch=1, seed=seed)[None]   # (1, B, HW)
    fill = _static_fill(baseline_fill(x, baseline, seed=seed))
    y = _perturbation_curves(model, x, target, removed_at, fill, steps=steps, insert=insert, output=output,
                             chunk_size=chunk_size)                               # (B, K)
    frac = _fraction_axis(n, n, steps, x.device, y.dtype)
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


@consumes("signed")
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
    pixel_flipping (default: both orders, 10 steps, the paper's 10 %..90 % plus both ends).
    Rong et al. (and Quantus) report accuracy: the curves acc_<order> hold, per sample and step,
    1.0 where the target is still the model's prediction (argmax) after imputation, else 0.0; their
    mean over samples is the paper's accuracy curve, and acc_auc_<order> (trapezoid over the
    fraction removed) averages to that curve's AUC. auc_<order> is the target output's AUC. The
    solver runs `iterations` conjugate-gradient steps (None: 2 max(H, W), error < 1e-4 at 64 px).
    Pixels are ranked by the signed channel sum (consumes "signed"), as the authors' code does
    (road_evaluation's rescale_channel: np.sum over channels, then a monotone min-max rescaling),
    whatever the run's reduce; their 1e-4 random jitter of ties is our seeded tie permutation.
    """
    target = _check_inputs(x, target, attribution)
    orders = _orders(order)
    _check_options(output, seed)
    n, _ = _check_steps(x, steps, 1)
    noise = check_float("noise", noise, 0, meaning=" (the imputation noise's standard deviation)")
    its = 2 * max(x.shape[-2:]) if iterations is None else check_int(
        "iterations", iterations, 0, meaning=" (conjugate-gradient steps; None: 2 max(H, W))")
    removed_at = torch.stack([_removed_at(attribution, steps=steps, descending=o == "morf", patch=1, seed=seed)
                              for o in orders])                                   # (R, B, HW)
    g = torch.Generator().manual_seed(seed)
    field = noise * torch.randn((1 + len(orders) * steps, *x.shape[1:]), generator=g, dtype=x.dtype).to(x.device)

    def fill(xb: Tensor, keep: Tensor, b: Tensor, j: Tensor) -> Tensor:
        return _noisy_linear_imputation(xb, keep, field[j], iterations=its)

    y = _perturbation_curves(model, x, target, removed_at, fill, steps=steps, insert=False, output=output,
                             chunk_size=chunk_size, top1=True)                    # (B, 1 + R steps, 2)
    frac = _fraction_axis(n, n, steps, x.device, y.dtype)
    curves = _curve_results(y[..., 0], orders, frac, steps)
    correct = _curve_results(y[..., 1], orders, frac, steps)
    scores, hib = {}, {}
    for o in orders:
        scores[f"auc_{o}"] = torch.trapezoid(curves[o], frac, dim=1)
        scores[f"acc_auc_{o}"] = torch.trapezoid(correct[o], frac, dim=1)
        hib[f"auc_{o}"] = hib[f"acc_auc_{o}"] = o == "lerf"
    if order == "both":
        scores["srg"], hib["srg"] = scores["auc_lerf"] - scores["auc_morf"], True
    return MetricResult(scores=scores, higher_is_better=hib,
                        curves={**{o: Curve(frac, c) for o, c in curves.items()},
                                **{f"acc_{o}": Curve(frac, c) for o, c in correct.items()}})


@consumes("signed")
def faithfulness_correlation(
    model: nn.Module, x: Tensor, target: Tensor, attribution: Tensor, *,
    subsets: int = 32, fraction: float = 0.05, baseline: Baseline = 0.0,
    output: Literal["logit", "softmax"] = "logit", seed: int = 0, chunk_size: int | None = None,
) -> MetricResult:
    """Faithfulness correlation (Bhatt et al. 2020): Pearson r over random pixel subsets S.

    mu_F = corr_S(sum_{i in S} g_i, f(x) - f(x with x_S set to the baseline)), g the attribution.
    A subset removes whole pixels (all channels), so sum_{i in S} g_i is the signed map's sum over
    the pixels of S: the metric consumes the signed channel sum a = sum_c g_c (metrics._map), not
    the run's reduced map; an absolute map would make the correlation blind to counter-evidence.
    `subsets` seeded subsets S of round(fraction H W) pixels (at least 1; the same subsets for every
    sample; Quantus' default of 224 px of a 224 x 224 image is fraction 0.0045). Higher is better;
    NaN where either side is constant over the subsets (e.g. a constant map).
    """
    target = _check_inputs(x, target, attribution)
    _check_options(output, seed)
    B, C, H, W = x.shape
    fraction = check_float("fraction", fraction, 0, 1, low_open=True, meaning=" (the share of pixels in each subset)")
    subset_size = max(1, round(fraction * H * W))
    check_int("subsets", subsets, 2, meaning=" (random subsets; at least 2 define a correlation)")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(subsets, H * W, generator=g).argsort(dim=1)[:, :subset_size].to(x.device)
    drop = torch.zeros(subsets, H * W, dtype=torch.bool, device=x.device).scatter_(1, chosen, True)   # (S, HW)
    fill = baseline_fill(x, baseline, seed=seed).expand_as(x)                      # (B, C, H, W)

    def forward(i: Tensor) -> Tensor:                                              # i: flat into (B, S)
        b, s = i.div(subsets, rounding_mode="floor"), i % subsets
        keep = ~drop[s].view(-1, 1, H, W)
        return target_output(model, torch.where(keep, x[b], fill[b]), target[b], output)

    with torch.inference_mode():
        f0 = target_output(model, x, target, output, check=target)                # (B,)
        delta = f0[:, None] - chunked(forward, B * subsets, chunk_size, device=x.device, like=x).view(B, subsets)
    a_sum = attribution.reshape(B, 1, H * W).to(delta.dtype).mul(drop.to(delta.dtype)).sum(dim=2)     # (B, S)
    r = _pearson(a_sum, delta).to(delta.dtype)                                    # (B,)
    return MetricResult(scores={"pearson": r}, higher_is_better={"pearson": True})


@consumes("signed")
def infidelity(
    model: nn.Module, x: Tensor, target: Tensor, attribution: Tensor, *,
    perturbations: int = 16, noise_std: float = 0.2, normalize: bool = True,
    output: Literal["logit", "softmax"] = "logit", seed: int = 0, chunk_size: int | None = None,
) -> MetricResult:
    """Infidelity (Yeh et al. 2019): INFD = E_I[(I^T phi - (f(x) - f(x - I)))^2], lower is better.

    phi is the signed attribution. I is seeded Gaussian noise of std `noise_std` per pixel, the
    same in every channel and the same draws for every sample, so I^T phi = sum_p I_p sum_c phi_cp:
    the metric consumes the signed channel sum (metrics._map), which gives I^T phi of the full
    attribution exactly; the run's reduced map (e.g. abs_sum) would not. With `normalize`, phi is
    first scaled by beta = E[I.phi Df] / E[(I.phi)^2], the least-squares optimal factor (captum's
    `normalize=True`), so the score ignores the map's scale; beta = 0 when I.phi is always 0.
    Matches captum.metrics.infidelity given the same perturbations.
    """
    target = _check_inputs(x, target, attribution)
    _check_options(output, seed)
    check_int("perturbations", perturbations, 1, meaning=" (noise draws per sample)")
    noise_std = check_float("noise_std", noise_std, 0, low_open=True, meaning=" (the noise's standard deviation)")
    check_bool("normalize", normalize)
    B, C, H, W = x.shape
    g = torch.Generator().manual_seed(seed)
    noise = (noise_std * torch.randn(perturbations, 1, H, W, generator=g, dtype=x.dtype)).to(x.device)   # (S, 1, H, W)

    def forward(i: Tensor) -> Tensor:                                              # i: flat into (B, S)
        b, s = i.div(perturbations, rounding_mode="floor"), i % perturbations
        return target_output(model, x[b] - noise[s], target[b], output)

    with torch.inference_mode():
        f0 = target_output(model, x, target, output, check=target)
        f = chunked(forward, B * perturbations, chunk_size, device=x.device, like=x)
        delta = f0[:, None] - f.view(B, perturbations)
    dot = (noise.view(1, perturbations, H * W) * attribution.reshape(B, 1, H * W)).sum(dim=2).to(delta.dtype)  # (B, S)
    if normalize:
        den = (dot * dot).sum(dim=1, keepdim=True)
        beta = torch.where(den > 0, (dot * delta).sum(dim=1, keepdim=True) / den.clamp_min(1e-30), 0.0)
        dot = beta * dot
    return MetricResult(scores={"infidelity": ((dot - delta) ** 2).mean(dim=1)},
                        higher_is_better={"infidelity": False})
