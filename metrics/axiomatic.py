"""Axiomatic properties: an attribution must satisfy a property that holds by construction of a faithful
explanation (invariance to a compensated input shift, Kindermans et al. 2019; more in issue 20).

Each metric returns per-sample scores (MetricResult) from pure, batched tensor code.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from metrics._map import consumes
from metrics._result import MetricResult
from metrics._similarity import SIMILARITIES, Constant, similarities

__all__ = ["input_invariance"]

Method = Callable[[nn.Module, Tensor, Tensor], Tensor]          # (model, x, target) -> (B, C, H, W)


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
