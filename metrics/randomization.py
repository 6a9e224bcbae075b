"""Randomization sanity checks: a map that explains the model must change when the model does.

Every test here recomputes the method's attribution under a change that should matter (weights,
class, labels) or should not (a compensated input shift) and compares it with the original by
the measures of `metrics._similarity.similarities`, all from one pair, batched, with the context
score `degenerate` (1 where either map is constant: `metrics._similarity.degenerate`). The tests of
Adebayo et al. 2018 consume the raw attribution (B, C, H, W) (`consumes("raw")`): their ABS map
sum_c |E_c| and signed map sum_c E_c are built from it whatever the run's `reduce` is.
"""
from __future__ import annotations

from numbers import Integral
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from metrics.batching import chunked
from metrics._map import consumes
from metrics._result import Curve, MetricResult
from metrics._similarity import (SIMILARITIES, Constant, Correlation, Window, degenerate, hog, hog_similarity,
                                 similarities, spearman, ssim, top_k_overlap)
from metrics._stages import Order, _fully_randomized, _stages, model_free, mprt_stages, randomization_layers

__all__ = ["mprt", "mprt_stages", "model_free", "emprt", "smprt", "random_logit", "data_randomization",
           "randomization_layers", "similarities", "degenerate", "spearman", "ssim", "hog", "hog_similarity",
           "top_k_overlap", "SIMILARITIES"]

Method = Callable[[nn.Module, Tensor, Tensor], Tensor]          # (model, x, target) -> (B, C, H, W)
Measure = Literal["spearman", "spearman_signed", "ssim", "hog", "top_k"]
Explain = Literal["label", "prediction"]
_DRAW_STRIDE = 100_003          # draw r re-draws layer i from seed + r * _DRAW_STRIDE + i: no two draws share a seed


# ---------------------------------------------------------------- shared pieces

def _check_repeats(repeats: int) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, Integral) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer (independent randomization draws), got {repeats!r}")


def _check_explain(explain: str) -> None:
    if explain not in ("label", "prediction"):
        raise ValueError(f"explain must be 'label' (the dataset's target) or 'prediction' (each model's own "
                         f"argmax, as Adebayo et al.'s code), got {explain!r}")


def _draw_seed(seed: int, r: int) -> int:
    return seed + r * _DRAW_STRIDE


def _explained(model: nn.Module, x: Tensor, target: Tensor, explain: str) -> Tensor:
    """The class each sample's map explains: the label, or the model's own prediction."""
    if explain == "label":
        return target
    with torch.no_grad():                                     # not inference_mode: methods take grads of it
        return model(x).argmax(dim=1).to(target.dtype)


def _raw_original(model: nn.Module, x: Tensor, target: Tensor, method: Method, attribution: Tensor | None,
                  explain: str = "label") -> Tensor:
    """The original raw attribution (B, C', H, W): `attribution` (the runner's, for the label) or recomputed."""
    B, C, H, W = x.shape
    if attribution is not None and (attribution.ndim != 4 or attribution.shape[0] != B or attribution.shape[2:] != (H, W)):
        raise ValueError(f"attribution must be the method's raw attribution (B, C, H, W) = ({B}, C, {H}, {W}) "
                         f"(the runner passes it: this metric consumes 'raw'), or None to recompute it; got "
                         f"{tuple(attribution.shape)}")
    explained = _explained(model, x, target, explain)
    if attribution is None or (explain == "prediction" and not torch.equal(explained, target)):
        attribution = method(model, x, explained)                                   # (B, C, H, W)
    return attribution


def _compared(a: Tensor, b: Tensor, reference: dict, options: dict[str, Any]) -> dict[str, Tensor]:
    """`similarities` of the pair under `options` and, as the context score `degenerate`, whether it is degenerate."""
    return {**similarities(a, b, reference=reference, **options),
            "degenerate": degenerate(a, b, clip=options["clip"], reference=reference)}


def _mean_std(draws: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-sample mean over draws of each score and, with several draws, its sample sd as `<score>_std` (not of
    `degenerate`, whose mean is already the fraction of degenerate draws)."""
    out = {}
    for name in draws[0]:
        y = torch.stack([d[name] for d in draws])                                   # (R, B)
        out[name] = y.mean(dim=0)
        if len(draws) > 1 and name != "degenerate":
            out[f"{name}_std"] = y.std(dim=0)
    return out


# ---------------------------------------------------------------- model parameter randomization

def _result(draws: list[list[dict[str, Tensor]]], labels: Sequence[str], x: Tensor) -> MetricResult:
    """Scores `<measure>@<label>` per stage and `<measure>` for the last stage, means over draws (with
    `<measure>_std@<label>`, `<measure>_std` over several draws); one mean curve per measure, none of the
    context score `degenerate` (per stage too: the fraction of draws whose pair is degenerate). Lower is better."""
    scores, curves = {}, {}
    for m in draws[0][0]:
        y = torch.stack([torch.stack([stage[m] for stage in d], dim=1) for d in draws])   # (R, B, L)
        mean = y.mean(dim=0)
        for j, label in enumerate(labels):
            scores[f"{m}@{label}"] = mean[:, j]
        scores[m] = mean[:, -1]
        if m == "degenerate":
            continue
        if len(draws) > 1:
            sd = y.std(dim=0)
            for j, label in enumerate(labels):
                scores[f"{m}_std@{label}"] = sd[:, j]
            scores[f"{m}_std"] = sd[:, -1]
        curves[m] = Curve(torch.arange(1, len(labels) + 1, device=x.device, dtype=x.dtype), mean, tuple(labels))
    return MetricResult(scores=scores, curves=curves, higher_is_better={s: False for s in scores})


@consumes("raw")
def mprt(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W)
    target: Tensor,               # (B,)
    method: Method,
    *,
    attribution: Tensor | None = None,   # (B, C, H, W) raw attribution of the unchanged model, recomputed if None
    explain: Explain = "label",
    order: Order = "cascading_top_down",
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    seed: int = 0,
    layer_seed: Literal["offset", "shared"] = "offset",
    init: Literal["default", "normal"] = "default",
    init_std: float = 0.01,
    repeats: int = 1,
    measures: Sequence[str] = SIMILARITIES,
    absolute: bool = True,
    top_k: float = 0.1,
    constant: Constant = "zero",
    clip: float | None = None,
    ssim_window: Window = "uniform",
    hog_cell: float = 8,
    hog_correlation: Correlation = "pearson",
) -> MetricResult:
    """Model parameter randomization test (Adebayo et al. 2018).

    Layers (`layers`, default `randomization_layers`, minus `exclude`) are re-drawn from their
    default initialisation (or N(0, init_std^2)): layer i, counted from the input, from seed + i
    (`layer_seed="shared"`: every layer from `seed`, as Quantus 0.6 does with seed + 1).
    `cascading_top_down` (alias `cascading`) randomizes from the output layer towards the input,
    keeping earlier stages; `cascading_bottom_up` from the input; `independent` one layer at a
    time (output first). After each stage the attribution is recomputed and compared with the
    original by `similarities` (spearman of sum_c |E_c|, spearman_signed of sum_c E_c, ...).
    `explain`: the class explained, the label (default) or each model's own argmax (Adebayo's code).
    `repeats` independent draws (draw r: seed + 100003 r in place of seed) are averaged per sample,
    their sd stored as `<score>_std`. Scores: `<measure>@<layer>` per stage, `<measure>` after the last
    stage; one mean curve per measure. Lower is better. Also the context score `degenerate` (`degenerate@<layer>`
    per stage), 1 where either map is constant (`similarities` then scores 0 by convention, not by measurement;
    never ranked; the sanity table's "degenerate" verdict). `model` and the global RNG are never changed.
    Cost: repeats x layers method calls; one for a method declared `model_free` (metrics.model_free).
    """
    _check_repeats(repeats)
    _check_explain(explain)
    for r in range(repeats):                                                       # arguments checked before any map
        mprt_stages(model, order=order, layers=layers, exclude=exclude, seed=_draw_seed(seed, r),
                    layer_seed=layer_seed, init=init, init_std=init_std)
    options = dict(measures=measures, absolute=absolute, top_k=top_k, constant=constant, clip=clip,
                   ssim_window=ssim_window, hog_cell=hog_cell, hog_correlation=hog_correlation)
    original = _raw_original(model, x, target, method, attribution, explain)
    similarities(original[:1], original[:1], **options)                            # similarity options checked
    reference: dict = {}                                                          # original's side, kept
    stage_map = lambda m: method(m, x, _explained(m, x, target, explain))          # noqa: E731 (B, C, H, W)
    # a map of x alone (metrics.model_free): computed and compared once, the same at every stage
    fixed = _compared(original, stage_map(model), reference, options) if model_free(method) else None
    draws, names = [], []
    for r in range(repeats):
        names = [name for _, name in _stages(model, layers, exclude, order)]
        stages = mprt_stages(model, order=order, layers=layers, exclude=exclude, seed=_draw_seed(seed, r),
                             layer_seed=layer_seed, init=init, init_std=init_std)
        draws.append([fixed] * len(names) if fixed is not None else
                     [_compared(original, stage_map(randomized), reference, options) for _, randomized in stages])
    return _result(draws, names, x)


def _entropy(m: Tensor, bins: int) -> Tensor:
    """Discrete entropy (nats) of the histogram of each (B, ...) map, `bins` equal bins over its own range."""
    B = m.shape[0]
    v = m.reshape(B, -1).double()
    low, high = v.amin(dim=1, keepdim=True), v.amax(dim=1, keepdim=True)
    span = torch.where(high > low, high - low, 1.0)
    idx = ((v - low) / span * bins).floor().long().clamp(0, bins - 1)              # constant map: all in bin 0
    counts = torch.zeros(B, bins, dtype=torch.float64, device=m.device).scatter_add_(1, idx, torch.ones_like(v))
    p = counts / v.shape[1]
    return -(p * p.clamp(min=1e-300).log()).sum(dim=1)


@consumes("raw")
def emprt(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W)
    target: Tensor,               # (B,)
    method: Method,
    *,
    attribution: Tensor | None = None,
    explain: Explain = "label",
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    seed: int = 0,
    repeats: int = 1,
    bins: int = 100,
    absolute: bool = False,
) -> MetricResult:
    """Efficient MPRT (Hedström et al. 2023): relative rise in map complexity after full randomization.

    emprt = (H(e_rand) - H(e)) / H(e), H = discrete entropy (nats) of the histogram of the map's
    values in `bins` equal bins over its own range (Quantus' default complexity), e = the signed
    map sum_c E_c (`absolute`: sum_c |E_c|; Quantus' abs takes |sum_c E_c|), e_rand = the map on the
    model with every layer randomized as at mprt's last stage (same seeds; `repeats` draws averaged,
    sd as `emprt_std`). A map that explains the model turns to noise: higher is better. A constant
    original map has H = 0 and scores NaN; a constant randomized map scores -1.
    """
    if isinstance(bins, bool) or not isinstance(bins, Integral) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    _check_repeats(repeats)
    _check_explain(explain)
    to = (lambda e: e.abs().sum(dim=1)) if absolute else (lambda e: e.sum(dim=1))     # noqa: E731
    h0 = _entropy(to(_raw_original(model, x, target, method, attribution, explain)), bins)
    draws = []
    for r in range(repeats):
        randomized = _fully_randomized(model, layers, exclude, _draw_seed(seed, r))
        h1 = _entropy(to(method(randomized, x, _explained(randomized, x, target, explain))), bins)
        draws.append({"emprt": torch.where(h0 > 0, (h1 - h0) / h0.clamp(min=1e-300), torch.nan).to(x.dtype)})
    scores = _mean_std(draws)
    return MetricResult(scores=scores, higher_is_better={"emprt": True, "emprt_std": False} if repeats > 1
                        else {"emprt": True})


def _smoothed(method: Method, *, samples: int, noise: float, seed: int, chunk_size: int) -> Method:
    """`method` averaged over `samples` noisy copies of x, N(0, (noise * (max - min of each x))^2), fixed noise."""
    def smooth(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        B = x.shape[0]
        g = torch.Generator(device=x.device).manual_seed(seed)
        std = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))                  # (B,)
        eps = torch.randn((samples, *x.shape), generator=g, device=x.device, dtype=x.dtype) * std[:, None, None, None]

        def attribute(i: Tensor) -> Tensor:                                           # i: (N,) into (S*B)
            s, b = i.div(B, rounding_mode="floor"), i % B
            return method(model, x[b] + eps[s, b], target[b])
        out = chunked(attribute, samples * B, chunk_size, device=x.device)            # (S*B, C, H, W)
        return out.view(samples, *x.shape[:1], *out.shape[1:]).mean(dim=0)
    return smooth


@consumes("raw")
def smprt(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W)
    target: Tensor,               # (B,)
    method: Method,
    *,
    explain: Explain = "label",
    order: Order = "cascading_bottom_up",
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    seed: int = 0,
    repeats: int = 1,
    samples: int = 16,
    noise: float = 0.1,
    measures: Sequence[str] = SIMILARITIES,
    absolute: bool = True,
    top_k: float = 0.1,
    constant: Constant = "zero",
    clip: float | None = None,
    ssim_window: Window = "uniform",
    hog_cell: float = 8,
    hog_correlation: Correlation = "pearson",
    chunk_size: int = 256,
) -> MetricResult:
    """Smooth MPRT (Hedström et al. 2023): MPRT on maps denoised by averaging over noisy inputs.

    Every attribution, of the original and of each randomized model, is the mean attribution over
    `samples` copies x + N(0, sigma^2), sigma = noise * (max(x) - min(x)) per sample (Quantus'
    convention; it uses 50 copies), the same noise draws (from `seed`) for every model and every
    repeat; stages, draws, scores and measures as `mprt` (default order bottom-up, as the paper
    recommends). The runner's attribution is not used: the original is smoothed too. Lower is better.
    Cost: repeats x samples x (layers + 1) method calls, in chunks of `chunk_size` inputs.
    """
    if isinstance(samples, bool) or not isinstance(samples, Integral) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be a non-negative fraction of each image's value range, got {noise!r}")
    smooth = _smoothed(method, samples=samples, noise=noise, seed=seed, chunk_size=chunk_size)
    return mprt(model, x, target, smooth, explain=explain, order=order, layers=layers, exclude=exclude, seed=seed,
                repeats=repeats, measures=measures, absolute=absolute, top_k=top_k, constant=constant, clip=clip,
                ssim_window=ssim_window, hog_cell=hog_cell, hog_correlation=hog_correlation)


# ---------------------------------------------------------------- class, data and input checks

@consumes("raw")
def random_logit(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W)
    target: Tensor,               # (B,)
    method: Method,
    *,
    attribution: Tensor | None = None,
    seed: int = 0,
    repeats: int = 1,
    sign_flip: bool = False,
    measures: Sequence[str] = SIMILARITIES,
    absolute: bool = True,
    top_k: float = 0.1,
    constant: Constant = "zero",
    clip: float | None = None,
    ssim_window: Window = "uniform",
    hog_cell: float = 8,
    hog_correlation: Correlation = "pearson",
) -> MetricResult:
    """Random logit test (Sixt et al. 2020): the map for another class should differ.

    The other class is target + u mod K, u uniform in 1..K-1 (K = the model's outputs), drawn
    per sample in batch order from a generator seeded with `seed` (draw r of `repeats`: seed +
    100003 r; scores averaged per sample, sd as `<measure>_std`); its attribution is compared with
    the target's by `similarities`. `sign_flip`: each measure is max(s(E, E'), s(E, -E')), as Sixt
    et al. do, so a map that only flips its sign for the other class counts as unchanged (the ABS
    measures do not see the sign anyway). Lower is better; a class-blind map (edge) scores 1.
    """
    _check_repeats(repeats)
    if not isinstance(sign_flip, bool):
        raise ValueError(f"sign_flip must be true or false, got {sign_flip!r}")
    options = dict(measures=measures, absolute=absolute, top_k=top_k, constant=constant, clip=clip,
                   ssim_window=ssim_window, hog_cell=hog_cell, hog_correlation=hog_correlation)
    original = _raw_original(model, x, target, method, attribution)
    similarities(original[:1], original[:1], **options)                            # similarity options checked
    with torch.inference_mode():
        K = model(x[:1]).shape[1]
    if K < 2:
        raise ValueError(f"random_logit needs a model with at least 2 outputs, got {K}")
    reference: dict = {}
    draws = []
    for r in range(repeats):
        g = torch.Generator().manual_seed(_draw_seed(seed, r))
        other = (target + torch.randint(1, K, target.shape, generator=g).to(target.device)) % K
        other_attribution = method(model, x, other)
        s = _compared(original, other_attribution, reference, options)
        if sign_flip:                                                    # -E' is degenerate exactly when E' is
            flipped = similarities(original, -other_attribution, reference=reference, **options)
            s = {m: torch.maximum(s[m], flipped[m]) if m in flipped else s[m] for m in s}
        draws.append(s)
    scores = _mean_std(draws)
    return MetricResult(scores=scores, higher_is_better={s: False for s in scores})


@consumes("raw")
def data_randomization(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W)
    target: Tensor,               # (B,)
    method: Method,
    label_randomized_model: nn.Module,
    *,
    attribution: Tensor | None = None,
    measures: Sequence[str] = SIMILARITIES,
    absolute: bool = True,
    top_k: float = 0.1,
    constant: Constant = "zero",
    clip: float | None = None,
    ssim_window: Window = "uniform",
    hog_cell: float = 8,
    hog_correlation: Correlation = "pearson",
    seed: int = 0,
    retrain: Mapping[str, Any] | None = None,
) -> MetricResult:
    """Data randomization test (Adebayo et al. 2018): the model trained on permuted labels.

    `label_randomized_model` has the same architecture, trained on the same images with their
    labels permuted (it can only memorise); the runner loads it from the zoo with train option
    `permute_labels: true` and the overrides of the model's `train` config in `retrain` (e.g.
    fewer images, more epochs, so that it memorises them). `retrain` is read by the runner only;
    being part of the metric's config, it is part of the cell key. Its attribution for the same
    target class is compared with the original by `similarities`. Scores: one per measure, lower
    is better (maps that depend on what the model learnt from the labels must change). `seed`
    is part of the cell key only (no draw here).
    """
    if retrain is not None and not isinstance(retrain, Mapping):
        raise ValueError(f"retrain must be a mapping of train-config overrides (e.g. {{'epochs': 40}}), got {retrain!r}")
    original = _raw_original(model, x, target, method, attribution)
    other = method(label_randomized_model, x, target)
    scores = _compared(original, other, {}, dict(measures=measures, absolute=absolute, top_k=top_k, constant=constant,
                                                 clip=clip, ssim_window=ssim_window, hog_cell=hog_cell,
                                                 hog_correlation=hog_correlation))
    return MetricResult(scores=scores, higher_is_better={s: False for s in scores})
