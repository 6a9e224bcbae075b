"""Faithfulness, continued: correlation and monotonicity estimates over removed pixels, and sufficiency.

The conventions of metrics/faithfulness.py hold: a pixel is removed in all channels; `baseline=` is
the one vocabulary of metrics.baselines; ties in a ranking are broken by one seeded permutation of
positions shared by every map; random draws (subsets, noise fields) are seeded and shared by all
samples, so a sample's score depends on that sample alone (sufficiency excepted:
its definition compares a sample with the others of its batch). Every (sample, step, draw) goes
through the model `chunk_size` inputs at a time. "Groups": the map's pixels ranked (MoRF, or LeRF
where stated) and cut into `steps` consecutive groups of ceil(k n / steps) - ceil((k - 1) n / steps)
pixels; steps=None (default where the paper removes single features) gives one pixel per group.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from metrics.checks import check_choice, check_float, check_int
from metrics._map import consumes
from metrics._perturb import _check_inputs, _perturbation_curves, _removed_at, _static_fill
from metrics._result import Curve, MetricResult
from metrics._similarity import _pearson, spearman
from metrics.sweep import pixel_sweep
from metrics.baselines import Baseline, baseline_fill, target_output
from metrics.batching import chunked
from metrics.faithfulness import _check_options

__all__ = ["faithfulness_estimate", "monotonicity", "monotonicity_correlation", "sensitivity_n", "sufficiency"]
FAMILY = "faithfulness"


def _groups(x: Tensor, steps: int | None, low: int = 1) -> int:
    """The number of pixel groups: steps, or H W (one pixel each) for None."""
    n = x.shape[-2] * x.shape[-1]
    return n if steps is None else check_int("steps", steps, low, n, high_name="the number of pixels",
                                               meaning=" (pixel groups; None: one pixel per group)")


def _group_sums(attribution: Tensor, at: Tensor, steps: int, dtype: torch.dtype) -> Tensor:
    """Sum of the map over each group: at (B, HW) holds every pixel's group 1..steps; returns (B, steps)."""
    B = at.shape[0]
    a = attribution.reshape(B, -1).to(dtype)
    return torch.zeros(B, steps, dtype=dtype, device=a.device).scatter_add_(1, at.long() - 1, a)


def _group_outputs(model: nn.Module, x: Tensor, target: Tensor, at: Tensor, fill: Callable[[Tensor, Tensor], Tensor],
                   *, steps: int, draws: int, output: str, chunk_size: int | None) -> Tensor:
    """Target output with group k alone replaced by fill(b, d), for every (sample, k, draw d): (B, steps, draws)."""
    B, C, H, W = x.shape
    J = steps * draws

    def forward(i: Tensor) -> Tensor:                                              # i: flat into (B, steps, D)
        b, j = i.div(J, rounding_mode="floor"), i % J
        k, d = j.div(draws, rounding_mode="floor") + 1, j % draws
        keep = (at[b] != k[:, None].to(at.dtype)).view(-1, 1, H, W)                # (N, 1, H, W)
        return target_output(model, torch.where(keep, x.index_select(0, b), fill(b, d)), target[b], output)

    with torch.inference_mode():
        return chunked(forward, B * J, chunk_size, device=x.device, like=x).view(B, steps, draws)


def _constant_fill(x: Tensor, baseline: Baseline, seed: int) -> Callable[[Tensor, Tensor], Tensor]:
    """fill(b, d) of a baseline that is the same for every draw d."""
    fill = _static_fill(baseline_fill(x, baseline, seed=seed))
    return lambda b, d: fill(None, None, b, None)


@consumes("signed")
def faithfulness_estimate(
    model: nn.Module, x: Tensor, target: Tensor, attribution: Tensor, *,
    steps: int | None = None, baseline: Baseline = 0.0, output: Literal["logit", "softmax"] = "logit",
    seed: int = 0, chunk_size: int | None = None,
) -> MetricResult:
    """Faithfulness estimate (Alvarez-Melis & Jaakkola 2018, NeurIPS, SENN): rho = Pearson_k(a_k, f(x) - f(x_k)).

    Each group k of pixels (module docstring; default: every pixel alone, the paper's per-feature
    removal) is replaced by `baseline` on its own (not cumulatively), giving x_k; a_k is the
    signed map's sum over the group. Consumes the signed channel sum (the drop of a linear model
    under gradient x input with a zero baseline is then exactly a_k: rho = 1). Higher is better;
    NaN where a_k or the drops are constant (e.g. a constant map with one pixel per group). With
    one pixel per group the drops come from metrics.sweep.pixel_sweep, shared within a run by every
    method and by non_sensitivity.
    """
    target = _check_inputs(x, target, attribution)
    _check_options(output, seed)
    K = _groups(x, steps, 2)
    at = _removed_at(attribution, steps=K, descending=True, patch=1, seed=seed)            # (B, HW) in 1..K
    with torch.inference_mode():
        f0 = target_output(model, x, target, output, check=target)                      # (B,)
    if K == at.shape[1]:                       # one pixel per group: the shared sweep, by pixel, put in group order
        drop = f0[:, None] - pixel_sweep(model, x, target, baseline=baseline, output=output, seed=seed,
                                         chunk_size=chunk_size)                           # (B, HW)
        delta = torch.zeros_like(drop).scatter_(1, at.long() - 1, drop)                  # (B, K)
    else:
        delta = f0[:, None] - _group_outputs(model, x, target, at, _constant_fill(x, baseline, seed), steps=K, draws=1,
                                             output=output, chunk_size=chunk_size)[..., 0]   # (B, K)
    rho = _pearson(_group_sums(attribution, at, K, delta.dtype), delta).to(x.dtype)
    return MetricResult(scores={"pearson": rho}, higher_is_better={"pearson": True})


def monotonicity(
    model: nn.Module, x: Tensor, target: Tensor, attribution: Tensor, *,
    steps: int | None = None, baseline: Baseline = 0.0, output: Literal["logit", "softmax"] = "softmax",
    seed: int = 0, chunk_size: int | None = None,
) -> MetricResult:
    """Monotonicity (Arya et al. 2019, AIX360): 1.0 if f_1 <= f_2 <= ... <= f_K, else 0.0.

    Starting from the all-`baseline` image, the pixel groups are restored in order of increasing
    relevance (LeRF: least relevant first), cumulatively; f_k is the target's output (the paper's
    class probability by default) after k groups, f_K the unperturbed input. As in AIX360's
    monotonicity_metric, the all-baseline image itself is not compared (curve x = 0). Higher is
    better; the mean over samples is the fraction of monotonic explanations. Never NaN.
    """
    target = _check_inputs(x, target, attribution)
    _check_options(output, seed)
    K = _groups(x, steps, 2)
    at = _removed_at(attribution, steps=K, descending=False, patch=1, seed=seed)[None]     # (1, B, HW)
    fill = _static_fill(baseline_fill(x, baseline, seed=seed))
    y = _perturbation_curves(model, x, target, at, fill, steps=K, insert=True, output=output,
                             chunk_size=chunk_size)                                       # (B, 1 + K)
    monotonic = (y[:, 2:] >= y[:, 1:-1]).all(dim=1).to(x.dtype)
    frac = torch.arange(K + 1, device=x.device, dtype=y.dtype) / K
    return MetricResult(scores={"monotonic": monotonic}, curves={"curve": Curve(frac, y)},
                        higher_is_better={"monotonic": True})


def monotonicity_correlation(
    model: nn.Module, x: Tensor, target: Tensor, attribution: Tensor, *,
    steps: int | None = 64, samples: int = 16, baseline: Baseline = "uniform",
    output: Literal["logit", "softmax"] = "softmax", seed: int = 0, chunk_size: int | None = None,
) -> MetricResult:
    """Monotonicity correlation (Nguyen & Martinez 2020): Spearman_k(|a|_k, v_k), v_k = E_d[(f(x) - f(x_k^d))^2].

    x_k^d replaces group k of pixels (ranked by |map|, smallest first) alone by draw d of `baseline`;
    the default "uniform" draws `samples` seeded noise fields, shared by all samples, each scaled to
    the image's [min, max] (the paper's uniform perturbation of the feature); a deterministic
    baseline makes every draw equal (use samples=1). |a|_k is the group's sum of |map| (the paper
    correlates absolute attributions). Quantus divides v_k by f(x)^2, a per-sample constant that
    Spearman ignores. Ties share their average rank (scipy). Higher is better; NaN where |a|_k or
    v_k is constant.
    """
    target = _check_inputs(x, target, attribution)
    _check_options(output, seed)
    K = _groups(x, steps, 2)
    D = check_int("samples", samples, 1, meaning=" (draws of the perturbation per pixel group)")
    at = _removed_at(attribution.abs(), steps=K, descending=False, patch=1, seed=seed)      # (B, HW) by |map|
    if isinstance(baseline, str) and baseline == "uniform":
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(D, *x.shape[1:], generator=g, dtype=x.dtype).to(x.device)         # (D, C, H, W)
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)   # (B, 1, 1, 1)
        fill = lambda b, d: lo[b] + u[d] * (hi[b] - lo[b])                               # (N, C, H, W)
    else:
        fill = _constant_fill(x, baseline, seed)
    with torch.inference_mode():
        f0 = target_output(model, x, target, output, check=target)
    f = _group_outputs(model, x, target, at, fill, steps=K, draws=D, output=output, chunk_size=chunk_size)   # (B, K, D)
    v = (f0[:, None, None] - f).square().mean(dim=2)                                    # (B, K)
    rho = spearman(_group_sums(attribution.abs(), at, K, v.dtype), v).to(x.dtype)
    return MetricResult(scores={"spearman": rho}, higher_is_better={"spearman": True})


@consumes("signed")
def sensitivity_n(
    model: nn.Module, x: Tensor, target: Tensor, attribution: Tensor, *,
    sizes: int = 8, subsets: int = 32, max_fraction: float = 0.8, baseline: Baseline = 0.0,
    output: Literal["logit", "softmax"] = "logit", seed: int = 0, chunk_size: int | None = None,
) -> MetricResult:
    """Sensitivity-n (Ancona et al. 2018, ICLR): r_n = Pearson_S(sum_{i in S} a_i, f(x) - f(x_[S]))), |S| = n.

    For each of `sizes` subset sizes n_j = ceil(j m / sizes), m = ceil(max_fraction H W) (the
    paper: n from one pixel to 80 % of them), `subsets` uniformly random pixel sets S of n_j
    pixels (seeded, shared by all samples) are set to `baseline`; r_n correlates, per sample, the
    signed map's sum over S with the output drop. Score: mean of r_n over the sizes where it is
    defined; curve r_n over n / (H W). A linear model under gradient x input with a zero baseline
    has r_n = 1 (its attributions are sensitivity-n for every n). Higher is better; NaN where r_n
    is undefined at every size (a constant map: every subset of a size sums to the same value).
    """
    target = _check_inputs(x, target, attribution)
    _check_options(output, seed)
    B, C, H, W = x.shape
    check_float("max_fraction", max_fraction, 0, 1, low_open=True, meaning=" (the share of pixels in the largest "
                "subset)")
    m = max(1, math.ceil(max_fraction * H * W - 1e-9))
    J = check_int("sizes", sizes, 1, m, high_name=f"the pixels in max_fraction={max_fraction}",
                  meaning=" (subset sizes n)")
    S = check_int("subsets", subsets, 2, meaning=" (random subsets per size; at least 2 define a correlation)")
    n = torch.ceil(torch.arange(1, J + 1, dtype=torch.float64) * m / J).long()            # (J,)
    g = torch.Generator().manual_seed(seed)
    position = torch.rand(J * S, H * W, generator=g).argsort(dim=1).argsort(dim=1)        # (J S, HW) uniform ranks
    drop = (position < n.repeat_interleave(S)[:, None]).to(x.device)                      # (J S, HW)
    fill = _static_fill(baseline_fill(x, baseline, seed=seed))

    def forward(i: Tensor) -> Tensor:                                                    # i: flat into (B, J S)
        b, s = i.div(J * S, rounding_mode="floor"), i % (J * S)
        xb = x.index_select(0, b)
        keep = ~drop[s].view(-1, 1, H, W)
        return target_output(model, torch.where(keep, xb, fill(xb, keep, b, s)), target[b], output)

    with torch.inference_mode():
        f0 = target_output(model, x, target, output, check=target)
        delta = f0[:, None] - chunked(forward, B * J * S, chunk_size, device=x.device, like=x).view(B, J * S)
    a_sum = attribution.reshape(B, H * W).to(delta.dtype) @ drop.to(delta.dtype).T       # (B, J S)
    r = _pearson(a_sum.reshape(B * J, S), delta.reshape(B * J, S)).view(B, J).to(x.dtype)   # (B, J)
    return MetricResult(scores={"pearson": r.nanmean(dim=1)}, higher_is_better={"pearson": True},
                        curves={"curve": Curve((n.to(x.device, r.dtype) / (H * W)), r)})


def sufficiency(
    model: nn.Module, x: Tensor, target: Tensor, attribution: Tensor, *,
    threshold: float = 0.6, distance: Literal["seuclidean", "euclidean"] = "seuclidean",
) -> MetricResult:
    """Sufficiency (Dasgupta et al. 2022, ICML): P(pred(x_j) = pred(x_i) | e(x_j) is close to e(x_i)).

    Local sufficiency of sample i: among the other samples j of the batch whose maps lie within
    `threshold` of i's, the fraction the model predicts (argmax) the same class for as for i.
    Distances (as Quantus): "seuclidean" standardises each pixel by its variance over the batch
    (pixels constant over the batch are left out), "euclidean" does not; both are divided by the
    batch's largest distance, so threshold is in [0, 1]. The score is defined relative to the
    batch, the reference set of the definition; it is NaN where no other map is within the
    threshold (Quantus: 0). `target` is only checked: the definition uses predictions. Higher is better.
    """
    target = _check_inputs(x, target, attribution)
    threshold = check_float("threshold", threshold, 0, 1, meaning=" (a distance between maps, scaled to [0, 1])")
    check_choice("distance", distance, ("seuclidean", "euclidean"))
    B = x.shape[0]
    a = attribution.reshape(B, -1).double()                                               # (B, HW)
    if distance == "seuclidean":
        var = a.var(dim=0, keepdim=True) if B > 1 else torch.zeros_like(a[:1])
        a = torch.where(var > 0, a / var.clamp_min(1e-300).sqrt(), 0.0)
    d = torch.cdist(a[None], a[None], compute_mode="donot_use_mm_for_euclid_dist")[0]   # (B, B)
    d = d / d.max() if bool(d.max() > 0) else d
    near = (d <= threshold) & ~torch.eye(B, dtype=torch.bool, device=x.device)           # (B, B), j != i
    with torch.inference_mode():
        pred = model(x).argmax(dim=1)                                                      # (B,)
    same = (pred[None, :] == pred[:, None]) & near
    count = near.sum(dim=1)
    score = torch.where(count > 0, same.sum(dim=1) / count.clamp_min(1), torch.nan).to(x.dtype)
    return MetricResult(scores={"sufficiency": score}, higher_is_better={"sufficiency": True})
