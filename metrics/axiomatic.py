"""Axiomatic properties: an attribution must satisfy a property that holds by construction of a faithful
explanation: completeness (Sundararajan et al. 2017), non-sensitivity (Nguyen & Martínez 2020) and
invariance to a compensated input shift (Kindermans et al. 2019).

Each metric returns per-sample scores (MetricResult) from pure, batched tensor code; baselines are
in the model's (normalised) input space, in the vocabulary of metrics.baselines shared with the
methods, and every model pass runs through metrics.batching.chunked.
"""
from __future__ import annotations

import copy
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metrics.checks import check_bool, check_choice, check_float, check_int
from metrics._map import consumes
from metrics._perturb import _check_inputs
from metrics._result import MetricResult
from metrics._similarity import SIMILARITIES, Constant, similarities
from metrics.sweep import pixel_sweep
from metrics.baselines import Baseline, baseline_fill, target_output
from metrics.batching import chunked

__all__ = ["completeness", "non_sensitivity", "input_invariance"]
Output = Literal["logit", "softmax"]

Method = Callable[[nn.Module, Tensor, Tensor], Tensor]          # (model, x, target) -> (B, C, H, W)


@consumes("signed")
def completeness(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W)
    target: Tensor,               # (B,)
    attribution: Tensor,          # (B, H, W), the signed channel sum
    *,
    baseline: Baseline = 0.0,
    output: Output = "logit",
    rtol: float = 0.05,
    atol: float = 1e-5,
    seed: int = 0,
    chunk_size: int | None = None,
) -> MetricResult:
    """Completeness (Sundararajan et al. 2017; summation-to-delta, conservation): sum a = f(x) - f(x').

    S = sum_{c,h,w} a, the total attribution (the signed channel sum's total: consumes "signed"), and
    D = f_t(x) - f_t(x'), x' = `baseline` (metrics.baselines; it must be the baseline the method used:
    0.0 is integrated_gradients' default). Scores: gap = |S - D| (0 when complete), rel_gap = gap / |D|
    (NaN where D = 0), holds = 1.0 where gap <= atol + rtol |D| (the paper's IG is complete up to its
    quadrature error: 20-300 steps give about 5 %, hence rtol = 0.05). Quantus 0.6 returns S == D
    exactly (rtol = atol = 0 here). Logits by default, as Quantus; `seed` draws the "uniform" baseline.
    """
    target = _check_inputs(x, target, attribution)
    check_choice("output", output, ("logit", "softmax"))
    rtol = check_float("rtol", rtol, 0, meaning=" (the gap allowed as a share of |f(x) - f(baseline)|)")
    atol = check_float("atol", atol, 0, meaning=" (the gap allowed in the output's units)")
    check_int("seed", seed, 0)
    B = x.shape[0]
    fill = baseline_fill(x, baseline, seed=seed).expand_as(x)                     # (B, C, H, W), a view

    def forward(i: Tensor) -> Tensor:                                              # i: flat into (2, B)
        b = i % B
        return target_output(model, torch.where((i < B).view(-1, 1, 1, 1), x[b], fill[b]), target[b], output,
                             check=target if i[0] == 0 else None)

    with torch.inference_mode():
        f = chunked(forward, 2 * B, chunk_size, device=x.device, like=x).view(2, B)
    delta = f[0] - f[1]                                                            # (B,)
    gap = (attribution.reshape(B, -1).to(delta.dtype).sum(dim=1) - delta).abs()
    scores = {"gap": gap, "rel_gap": torch.where(delta != 0, gap / delta.abs(), torch.nan),
              "holds": (gap <= atol + rtol * delta.abs()).to(delta.dtype)}
    return MetricResult(scores={k: v.to(x.dtype) for k, v in scores.items()},
                        higher_is_better={"gap": False, "rel_gap": False, "holds": True})


@consumes("reduced")
def non_sensitivity(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W)
    target: Tensor,               # (B,)
    attribution: Tensor,          # (B, H, W), the run's reduced map
    *,
    eps: float = 1e-5,
    tolerance: float = 1e-5,
    relative: bool = True,
    patch: int = 1,
    baseline: Baseline = 0.0,
    output: Output = "logit",
    seed: int = 0,
    chunk_size: int | None = None,
) -> MetricResult:
    """Non-sensitivity (Nguyen & Martínez 2020): zero attribution exactly where the model does not care.

    Units are pixels (all channels at once), or patch x patch squares of a grid from the top-left
    corner. Z_a: units whose |a| is at most eps (times the map's own max |a| when `relative`) at every
    pixel; Z_f: units whose replacement by `baseline` changes the target output by at most
    `tolerance`, |f_t(x) - f_t(x with the unit replaced)| <= tolerance. violations = |Z_a xor Z_f|,
    the number of units in one set and not the other, as Quantus 0.6 counts them (in [0, units];
    lower is better; 0 for a map that is zero exactly where the model is insensitive). One forward
    pass per (sample, unit), all in chunks of `chunk_size` (patch=1: metrics.sweep.pixel_sweep, shared
    within a run with faithfulness_estimate); `seed` draws the "uniform" baseline.
    Consumes the run's reduced map, the pixels a user reads as unattributed (under abs_sum: all channels
    zero); Quantus thresholds its a_batch, the channel-reduced map in its image examples, the same way.
    """
    target = _check_inputs(x, target, attribution)
    eps = check_float("eps", eps, 0, meaning=" (the |a| at or below which a pixel counts as unattributed)")
    tolerance = check_float("tolerance", tolerance, 0, meaning=" (the output change that counts as none)")
    check_bool("relative", relative)
    check_choice("output", output, ("logit", "softmax"))
    check_int("seed", seed, 0)
    B, C, H, W = x.shape
    check_int("patch", patch, 1, min(H, W), high_name="min(H, W)")
    Hu, Wu = -(-H // patch), -(-W // patch)
    U = Hu * Wu
    unit = (torch.arange(H, device=x.device)[:, None] // patch * Wu
            + torch.arange(W, device=x.device)[None, :] // patch).view(1, 1, H, W)    # unit of each pixel
    a = attribution.abs()
    top = F.max_pool2d(a[:, None], patch, ceil_mode=True).view(B, U)               # (B, U): max |a| in a unit
    threshold = eps * a.reshape(B, -1).amax(dim=1, keepdim=True) if relative else eps
    unattributed = top <= threshold                                                # (B, U)
    fill = baseline_fill(x, baseline, seed=seed).expand_as(x)

    def forward(i: Tensor) -> Tensor:                                              # i: flat into (B, U)
        b, u = i.div(U, rounding_mode="floor"), i % U
        keep = unit != u.view(-1, 1, 1, 1)                                         # (N, 1, H, W)
        return target_output(model, torch.where(keep, x[b], fill[b]), target[b], output)

    with torch.inference_mode():
        f0 = target_output(model, x, target, output, check=target)                # (B,)
    if patch == 1:                             # single pixels: the sweep faithfulness_estimate shares in a run
        f = pixel_sweep(model, x, target, baseline=baseline, output=output, seed=seed, chunk_size=chunk_size)
    else:
        with torch.inference_mode():
            f = chunked(forward, B * U, chunk_size, device=x.device, like=x).view(B, U)
    insensitive = (f - f0[:, None]).abs() <= tolerance                             # (B, U)
    violations = (unattributed ^ insensitive).sum(dim=1).to(x.dtype)
    return MetricResult(scores={"violations": violations}, higher_is_better={"violations": False})


def _first_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    """(name, module) of the layer that reads the input: `layer`, or the first parameterised leaf module."""
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())
              and any(True for _ in m.parameters(recurse=False))]
    modules = dict(model.named_modules())
    name, module = (layer, modules.get(layer)) if layer is not None else (leaves or [(None, None)])[0]
    if not isinstance(module, (nn.Conv2d, nn.Linear)) or (isinstance(module, nn.Conv2d)
                                                          and module.padding_mode != "zeros"):
        raise ValueError(f"input_invariance needs `layer` to name the first layer, a Linear or zero-padded Conv2d "
                         f"that reads the input; got {name!r} ({type(module).__name__}) in {type(model).__name__}")
    return name, module


class _BiasMapConv2d(nn.Conv2d):
    """A Conv2d whose bias is a map (C', h, w), one value per output location: the first layer of
    input_invariance's compensated copy (a zero-padded conv's response to a constant is not uniform)."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, None) + self.bias


def _compensated(model: nn.Module, name: str, x: Tensor, shift: float) -> nn.Module:
    """A copy of `model` that computes model(z - shift) on z: the first layer's bias becomes b - W·shift.

    Kindermans et al.'s network 2 (b2 = b1 - W m2): the compensation is an ordinary bias, so every
    method sees an ordinary network, LRP rules included (they treat it as the bias it is). A batch
    norm that directly follows the first layer (the next leaf, as zennit's SequentialMergeBatchNorm
    finds it), in eval mode, is folded into that layer first and replaced by nn.Identity: W' = W s,
    b' = (b - mu) s + beta, s = gamma / sqrt(var + eps). Otherwise LRP's canonizer would merge it after
    the offset was fixed, and the copy's output would be off (0.035 in the logit on a conv-BN net).
    """
    shifted = copy.deepcopy(model)
    modules = dict(shifted.named_modules())
    first = modules[name]
    leaves = [n for n, m in shifted.named_modules() if not any(True for _ in m.children())]
    after = leaves[leaves.index(name) + 1] if name in leaves and leaves.index(name) + 1 < len(leaves) else None
    with torch.no_grad():
        weight = first.weight.detach()
        bias = first.bias.detach() if first.bias is not None else weight.new_zeros(weight.shape[0])
        bn = modules.get(after)
        if (isinstance(bn, nn.modules.batchnorm._BatchNorm) and not bn.training and bn.track_running_stats
                and bn.num_features == weight.shape[0]):
            scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
            weight = weight * scale.view(-1, *[1] * (weight.ndim - 1))
            bias = (bias - bn.running_mean) * scale + (bn.bias if bn.affine else 0.0)
            parent, _, leaf = after.rpartition(".")
            setattr(modules[parent] if parent else shifted, leaf, nn.Identity())
        if isinstance(first, nn.Conv2d):
            offset = first._conv_forward(torch.full_like(x[:1], shift), weight, None)[0]   # (C', h, w)
            first.__class__ = _BiasMapConv2d
            first.bias = nn.Parameter(bias.view(-1, 1, 1) - offset, requires_grad=first.weight.requires_grad)
        else:
            first.bias = nn.Parameter(bias - shift * weight.sum(dim=1), requires_grad=first.weight.requires_grad)
        first.weight = nn.Parameter(weight.clone(), requires_grad=first.weight.requires_grad)
        with torch.autocast(x.device.type, enabled=False):                       # checked at the model's precision
            expected, got = model(x), shifted(x + shift)
    tol = max(1e-4, 100 * torch.finfo(expected.dtype).eps)
    if not torch.allclose(got, expected, rtol=tol, atol=tol * (1.0 + expected.abs().max().item())):
        raise ValueError(f"input_invariance: the compensated copy of {type(model).__name__} does not reproduce "
                         f"model(x) (max difference {(got - expected).abs().max().item():.3g}); `layer` ({name!r}) "
                         "must be the layer that reads the input, with nothing but a batch norm between it and "
                         "the next non-linearity, and the model in eval mode")
    return shifted


@consumes("raw")
def input_invariance(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W)
    target: Tensor,               # (B,)
    method: Method,
    *,
    attribution: Tensor | None = None,   # (B, C, H, W) raw attribution of (model, x), recomputed if None
    shift: float = 1.0,
    layer: str | None = None,
    measures: Sequence[str] = SIMILARITIES,
    absolute: bool = True,
    top_k: float = 0.1,
    constant: Constant = "zero",
    seed: int = 0,
) -> MetricResult:
    """Input invariance (Kindermans et al. 2019): a compensated constant input shift must not change the attribution.

    The input becomes x + shift; a copy of the model absorbs the shift in its first layer's bias
    (`layer`, default the first parameterised leaf, a Linear or zero-padded Conv2d): b2 = b1 - W·shift,
    a map (C', h, w) for a padded conv, after folding a batch norm that follows (see _compensated),
    so the copy computes model(x) on x + shift under any method's preparation, LRP's canonizers
    included. The paper compares the attributions themselves, so this consumes the raw attribution:
    E of (model, x) and E' of (copy, x + shift) give rel_l1 = sum |E' - E| / sum |E| over (C, H, W)
    (0 when invariant; NaN for an all-zero E) and the measures of `similarities` (ABS and signed
    maps built from E, E'). Higher similarity is better, rel_l1 lower. `seed` is part of the cell
    key only (no draw here). One extra method call and two forward passes (the copy is checked).
    """
    B, C, H, W = x.shape
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not abs(shift) < float("inf"):
        raise ValueError(f"shift must be a finite number (in the normalised input space), got {shift!r}")
    name, _ = _first_layer(model, layer)
    original = method(model, x, target) if attribution is None else attribution
    if original.shape != (B, C, H, W):
        raise ValueError(f"attribution must be the raw attribution of shape {(B, C, H, W)} (input_invariance "
                         f"consumes 'raw'), got {tuple(original.shape)}")
    other = method(_compensated(model, name, x, float(shift)), x + shift, target)            # (B, C, H, W)
    scores = similarities(original, other, measures=measures, absolute=absolute, top_k=top_k, constant=constant)
    norm = original.reshape(B, -1).abs().sum(dim=1)
    diff = (other - original).reshape(B, -1).abs().sum(dim=1)
    scores["rel_l1"] = torch.where(norm > 0, diff / norm.clamp(min=torch.finfo(x.dtype).tiny), torch.nan)
    return MetricResult(scores=scores, higher_is_better={s: s != "rel_l1" for s in scores})
