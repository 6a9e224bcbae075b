"""Robustness: does the explanation stay put when the input barely changes?

Shared conventions (the machinery lives in metrics._reexplain):
- The metrics that re-explain take the method and call it on whole chunks of perturbed copies (all
  samples x all perturbations flattened, `chunk_size` inputs per call, None: metrics.batching's
  memory budget); they consume the raw attribution (B, C, H, W) (`consumes("raw")`): the papers
  compare the explanation Phi(x) with Phi(x') as the method returns both, so the run's channel
  reduction never enters. `attribution=None` recomputes Phi(x) for the label.
- Perturbations live in the model's input space (after the dataset's normalisation): "uniform" adds
  U[-radius, radius] to every value (an L-inf ball, Yeh et al.'s sampling), "gaussian" adds
  N(0, radius^2). Draw s is one seeded (C, H, W) field shared by all samples, so a sample's score
  depends neither on its batch nor on the chunking.
- Prediction changes: a perturbation changes the prediction when argmax f(x') != argmax f(x).
  `changed="keep"` scores every perturbation (Yeh et al., Alvarez-Melis & Jaakkola, Montavon et al.;
  Quantus' default); "drop" maximises or averages over the unchanged ones only (Agarwal et al.'s
  constraint), NaN where every one changed. Each re-explaining metric also returns
  `changed_fraction`, the share of perturbations that changed the prediction (context, lower is
  better, not a quality of the map).
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from metrics.checks import check_choice, check_float, check_int
from metrics._map import consumes
from metrics._reexplain import (Changed, Method, Noise, explain_perturbed, noise_field, original, reduce_draws,
                                relative, shifted)
from metrics._result import MetricResult

__all__ = ["max_sensitivity", "avg_sensitivity", "local_lipschitz_estimate", "continuity", "consistency",
           "relative_input_stability", "relative_output_stability", "relative_representation_stability"]

_EPS_MIN = 1e-6          # Agarwal et al.'s epsilon_min (and Quantus'): floor of a relative denominator


def _norm(t: Tensor, p: float = 2) -> Tensor:
    return t.flatten(1).norm(p=p, dim=1)                                           # (N,)


def _result(name: str, ratio: Tensor, changed: Tensor, how: str, rule: Changed) -> MetricResult:
    scores = {name: reduce_draws(ratio, changed, how, rule), "changed_fraction": changed.to(ratio.dtype).mean(dim=1)}
    return MetricResult(scores=scores, higher_is_better={s: False for s in scores})


def _sensitivity(model, x, target, method, attribution, samples, radius, noise, normalize, changed, seed,
                 chunk_size, how):
    a = original(model, x, target, method, attribution, changed)                           # (B, C', H, W)
    scale = _norm(a) if normalize else torch.ones(len(x), dtype=x.dtype, device=x.device)
    # a zero map has no relative sensitivity: NaN, never a flattering 0
    scale = torch.where(scale > 0, scale, torch.nan)
    delta = noise_field(x, samples, radius, noise, seed)                          # (S, C, H, W)
    ratio, moved = explain_perturbed(
        model, x, target, method, lambda b, s: x[b] + delta[s],
        lambda b, xp, ap, out, rep: _norm(ap - a[b]) / scale[b], samples, chunk_size)
    return _result(f"{how}_sensitivity", ratio, moved, how, changed)


@consumes("raw")
def max_sensitivity(
    model: nn.Module, x: Tensor, target: Tensor, method: Method, *, attribution: Tensor | None = None,
    samples: int = 16, radius: float = 0.2, noise: Noise = "uniform", normalize: bool = True,
    changed: Changed = "keep", seed: int = 0, chunk_size: int | None = None,
) -> MetricResult:
    """Max-sensitivity (Yeh et al. 2019): SENS_MAX = max_{|x' - x|_inf <= r} ||Phi(x') - Phi(x)||_2.

    Estimated over `samples` seeded draws x' = x + U[-radius, radius] (noise="uniform"). With
    `normalize` the norm is divided by ||Phi(x)||_2, as Yeh et al.'s code and Quantus do (NaN for an
    all-zero Phi(x)); without, it is the paper's formula. Lower is better; 0 for a method whose map
    does not move (e.g. the gradient of a linear model). Quantus: MaxSensitivity(lower_bound=radius,
    nr_samples=samples, normalise=False, abs=False) with normalize=True.
    """
    return _sensitivity(model, x, target, method, attribution, samples, radius, noise, normalize, changed, seed,
                        chunk_size, "max")


@consumes("raw")
def avg_sensitivity(
    model: nn.Module, x: Tensor, target: Tensor, method: Method, *, attribution: Tensor | None = None,
    samples: int = 16, radius: float = 0.2, noise: Noise = "uniform", normalize: bool = True,
    changed: Changed = "keep", seed: int = 0, chunk_size: int | None = None,
) -> MetricResult:
    """Avg-sensitivity (Yeh et al. 2019): SENS_AVG = E_{x' ~ U(B_inf(x, r))} ||Phi(x') - Phi(x)||_2.

    The mean over the draws of `max_sensitivity` (same perturbations, same `normalize`: divided by
    ||Phi(x)||_2, as Quantus' AvgSensitivity with its defaults). Lower is better.
    """
    return _sensitivity(model, x, target, method, attribution, samples, radius, noise, normalize, changed, seed,
                        chunk_size, "avg")


@consumes("raw")
def local_lipschitz_estimate(
    model: nn.Module, x: Tensor, target: Tensor, method: Method, *, attribution: Tensor | None = None,
    samples: int = 16, radius: float = 0.1, noise: Noise = "gaussian", changed: Changed = "keep", seed: int = 0,
    chunk_size: int | None = None,
) -> MetricResult:
    """Local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018): L(x) = max_{x'} ||Phi(x) - Phi(x')||_2 / ||x - x'||_2.

    The maximum runs over `samples` seeded neighbours x' = x + N(0, radius^2) (noise="gaussian", the
    sampling Quantus uses; the paper also searches the ball B_eps(x)). Lower is better; 0 when the
    map does not move. Quantus: LocalLipschitzEstimate(perturb_std=radius, nr_samples=samples,
    normalise=False, abs=False), which adds 1e-10 to the denominator.
    """
    a = original(model, x, target, method, attribution, changed)
    delta = noise_field(x, samples, radius, noise, seed)
    ratio, moved = explain_perturbed(
        model, x, target, method, lambda b, s: x[b] + delta[s],
        lambda b, xp, ap, out, rep: _norm(ap - a[b]) / _norm(xp - x[b]), samples, chunk_size)
    return _result("lipschitz", ratio, moved, "max", changed)


@consumes("raw")
def continuity(
    model: nn.Module, x: Tensor, target: Tensor, method: Method, *, attribution: Tensor | None = None,
    max_shift: float = 0.125, shifts: Sequence[int] | None = None, baseline: float | Literal["image_min"] = "image_min",
    changed: Changed = "keep", chunk_size: int | None = None,
) -> MetricResult:
    """Explanation continuity (Montavon et al. 2018): max_{x' != x} ||R(x) - R(x')||_1 / ||x - x'||_2.

    x' runs over horizontal translations of x by d pixels (the paper's example), the uncovered
    columns filled with `baseline` ("image_min": each image's minimum, Quantus' "black"; or a constant):
    d in `shifts`, or by default every d in [-m, m] except 0, m = max(1, round(max_shift W)).
    R is the raw attribution (signed: Quantus' defaults abs=True, normalise=True are not applied).
    Lower is better. Quantus 0.6 Continuity(nr_steps=n) uses d = -W + k (2W + 1) // n, k = 1..n.
    """
    W = x.shape[-1] if isinstance(x, Tensor) and x.ndim == 4 else 1
    if shifts is None:
        m = max(1, round(check_float("max_shift", max_shift, 0, 1, low_open=True,
                                     meaning=" (the largest translation, a fraction of the width)") * W))
        shifts = [d for d in range(-m, m + 1) if d]
    if not isinstance(shifts, Sequence) or isinstance(shifts, str) or not shifts:
        raise ValueError(f"shifts must be a non-empty list of pixel translations, or null, got {shifts!r}")
    shifts = [check_int("shifts", d, -W, W, meaning=" (a translation in pixels, |d| <= W)") for d in shifts]
    if 0 in shifts:
        raise ValueError("shifts must not contain 0: continuity compares x with inputs x' != x")
    a = original(model, x, target, method, attribution, changed)
    move = shifted(x, torch.tensor(shifts, device=x.device), baseline)
    ratio, moved = explain_perturbed(
        model, x, target, method, move,
        lambda b, xp, ap, out, rep: _norm(ap - a[b], 1) / _norm(xp - x[b]), len(shifts), chunk_size)
    return _result("continuity", ratio, moved, "max", changed)


def _relative_stability(model, x, target, method, attribution, samples, radius, noise, changed, seed, chunk_size,
                        name, layers=None, output=False):
    a = original(model, x, target, method, attribution, changed)
    delta = noise_field(x, samples, radius, noise, seed)
    rel_a = lambda b, ap: _norm(relative(a[b], ap, _EPS_MIN))                     # ||(e_x - e_x') / e_x||_2
    if output:
        with torch.no_grad():
            h = model(x)                                                           # (B, K) logits
        stat = lambda b, xp, ap, out, rep: rel_a(b, ap) / _norm(out - h[b]).clamp_min(_EPS_MIN)
    elif layers is not None:
        stat = lambda b, xp, ap, out, rep: \
            rel_a(b, ap) / _norm(relative(rep[1][b], rep[0], _EPS_MIN)).clamp_min(_EPS_MIN)   # rep: (L(x'), L(x))
    else:
        stat = lambda b, xp, ap, out, rep: \
            rel_a(b, ap) / _norm(relative(x[b], xp, _EPS_MIN)).clamp_min(_EPS_MIN)
    ratio, moved = explain_perturbed(model, x, target, method, lambda b, s: x[b] + delta[s], stat, samples,
                                     chunk_size, layers=layers)
    return _result(name, ratio, moved, "max", changed)


_RS_DOC = """Relative {long} stability (Agarwal et al. 2022): {key} = max_{{x'}} ||(e_x - e_x') / e_x||_2 / max({den}, eps).

    e is the raw attribution; x' = x + U[-radius, radius] (noise="gaussian": N(0, radius^2)) over
    `samples` seeded draws; the maximum runs over the x' whose predicted class is x's
    (`changed="drop"`, the paper's constraint; NaN where every draw changed it; Quantus 0.6 returns
    NaN as soon as one draw does).
    Ratios are elementwise; an exactly-zero entry of e_x{zero} is replaced by eps = 1e-6, as Quantus
    does. Lower is better.{extra}
    """


@consumes("raw")
def relative_input_stability(
    model: nn.Module, x: Tensor, target: Tensor, method: Method, *, attribution: Tensor | None = None,
    samples: int = 16, radius: float = 0.2, noise: Noise = "uniform", changed: Changed = "drop", seed: int = 0,
    chunk_size: int | None = None,
) -> MetricResult:
    return _relative_stability(model, x, target, method, attribution, samples, radius, noise, changed, seed,
                               chunk_size, "ris")


@consumes("raw")
def relative_output_stability(
    model: nn.Module, x: Tensor, target: Tensor, method: Method, *, attribution: Tensor | None = None,
    samples: int = 16, radius: float = 0.2, noise: Noise = "uniform", changed: Changed = "drop", seed: int = 0,
    chunk_size: int | None = None,
) -> MetricResult:
    return _relative_stability(model, x, target, method, attribution, samples, radius, noise, changed, seed,
                               chunk_size, "ros", output=True)


@consumes("raw")
def relative_representation_stability(
    model: nn.Module, x: Tensor, target: Tensor, method: Method, *, attribution: Tensor | None = None,
    layers: Sequence[str] | None = None, samples: int = 16, radius: float = 0.2, noise: Noise = "uniform",
    changed: Changed = "drop", seed: int = 0, chunk_size: int | None = None,
) -> MetricResult:
    if layers is None:                                                             # hidden layers: all but the output
        owners = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
        layers = owners[:-1] or owners
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"layers must be a non-empty list of module names, or null, got {layers!r}")
    return _relative_stability(model, x, target, method, attribution, samples, radius, noise, changed, seed,
                               chunk_size, "rrs", layers=list(layers))


relative_input_stability.__doc__ = _RS_DOC.format(long="input", key="RIS", den="||(x - x') / x||_2", zero=" and x",
                                                  extra="\n    Quantus: RelativeInputStability(nr_samples=samples, perturb_func_kwargs={'lower_bound': -radius,\n"
                                                        "    'upper_bound': radius}, normalise=False, abs=False).")
relative_output_stability.__doc__ = _RS_DOC.format(
    long="output", key="ROS", den="||h(x) - h(x')||_2", zero="",
    extra="\n    h is the model's output (logits), as in the paper and Quantus' RelativeOutputStability.")
relative_representation_stability.__doc__ = _RS_DOC.format(
    long="representation", key="RRS", den="||(L_x - L_x') / L_x||_2", zero=" and L_x",
    extra="\n    L is the concatenated, flattened output of `layers` (default: every module that owns\n"
          "    parameters but the last, i.e. the hidden layers; Quantus' default is every module).")


def consistency(
    model: nn.Module, x: Tensor, attribution: Tensor, *,
    discretise: Literal["top_k_sign", "first_n_sign"] = "top_k_sign", k: int = 5,
) -> MetricResult:
    """Local consistency (Dasgupta et al. 2022): m_c(x) = P[f(x') = f(x) | e(x') = e(x)], x' another sample.

    Maps are discretised to e(x): "top_k_sign", the positions of the k largest |map| values
    (ties: lower index first) with their signs; "first_n_sign", the signs of the map's first k
    values in row-major order (what Quantus' default top_n_sign computes). The probability is the
    share, among the other samples of the batch with the same e, of those with x's predicted
    class: the batch is the reference set, so the score depends on the batch's other samples
    (not on their order). NaN where no other sample shares e(x) (Quantus: 0). Higher is better.
    Consumes the run's map (B, H, W).
    """
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(getattr(x, 'shape', ()))}")
    B, _, H, W = x.shape
    if not isinstance(attribution, Tensor) or attribution.shape != (B, H, W):
        raise ValueError(f"attribution must be a map of shape {(B, H, W)} (the run's reduced map), got "
                         f"{tuple(getattr(attribution, 'shape', ()))}")
    check_choice("discretise", discretise, ("top_k_sign", "first_n_sign"))
    k = check_int("k", k, 1, H * W, high_name="H * W", meaning=" (values per discretised map)")
    flat = attribution.reshape(B, -1)
    if discretise == "first_n_sign":
        code = flat[:, :k].sign()                                                  # (B, k)
    else:
        top = flat.abs().argsort(dim=1, descending=True, stable=True)[:, :k].sort(dim=1).values
        code = 3 * top + flat.gather(1, top).sign().long() + 1                     # (B, k) position and sign
    same_e = (code[:, None] == code[None]).all(dim=2) & ~torch.eye(B, dtype=torch.bool, device=x.device)
    with torch.no_grad():
        pred = model(x).argmax(dim=1)
    same_f = pred[:, None] == pred[None]
    n = same_e.sum(dim=1)
    score = torch.where(n > 0, (same_e & same_f).sum(dim=1) / n.clamp_min(1), torch.nan).to(x.dtype)
    return MetricResult(scores={"consistency": score}, higher_is_better={"consistency": True})
