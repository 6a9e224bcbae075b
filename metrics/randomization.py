"""Randomization sanity checks: a map that explains the model must change when the model does."""
from __future__ import annotations

import copy
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from metrics._map import Reduce, to_map
from metrics._result import Curve, MetricResult

__all__ = ["mprt", "randomization_layers", "spearman"]

Method = Callable[[nn.Module, Tensor, Tensor], Tensor]          # (model, x, target) -> (B, C, H, W)


def _average_rank(v: Tensor) -> Tensor:
    """Ranks 0..n-1 along dim 1, tied values sharing their average rank (as scipy.stats.rankdata)."""
    B, n = v.shape
    sorted_v, order = v.sort(dim=1, stable=True)                                   # (B, n)
    new_group = torch.ones_like(sorted_v, dtype=torch.bool)
    new_group[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    group = new_group.cumsum(dim=1) - 1 + torch.arange(B, device=v.device)[:, None] * n   # (B, n) global id
    position = torch.arange(n, device=v.device, dtype=torch.float64).expand(B, n).reshape(-1)
    total = torch.zeros(B * n, device=v.device, dtype=torch.float64).index_add_(0, group.reshape(-1), position)
    count = torch.zeros(B * n, device=v.device, dtype=torch.float64).index_add_(0, group.reshape(-1), torch.ones_like(position))
    mean_rank = (total / count.clamp(min=1))[group]                                # (B, n) in sorted order
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation per row of (B, ...) tensors, ties given average ranks.

    A row that is constant in `a` or `b` has no rank order: the result is NaN there.
    """
    B = a.shape[0]
    ra, rb = _average_rank(a.reshape(B, -1)), _average_rank(b.reshape(B, -1))      # (B, n) float64
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    den = (ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(dim=1) / den, torch.nan).to(a.dtype)


def randomization_layers(model: nn.Module) -> list[str]:
    """Names of the layers MPRT randomizes, from input to output.

    A model may declare them as `mprt_layers` (e.g. one entry per residual block);
    otherwise every module that owns parameters directly, in registration order.
    """
    declared = getattr(model, "mprt_layers", None)
    if declared is not None:
        return list(declared)
    return [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def _randomize(layer: nn.Module, seed: int) -> None:
    """Re-draw a layer's parameters from its default initialisation, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in layer.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def mprt(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W)
    target: Tensor,               # (B,)
    method: Method,
    *,
    attribution: Tensor | None = None,   # (B, H, W) map of the unchanged model, recomputed if None
    reduce: Reduce = "sum",
    order: Literal["cascading", "independent"] = "cascading",
    layers: Sequence[str] | None = None,
    seed: int = 0,
) -> MetricResult:
    """Model parameter randomization test (Adebayo et al. 2018).

    Layers are re-initialised with their default initialisation (layer i from
    seed + i), from the output layer towards the input: `cascading` keeps the
    layers randomized before (the paper's cascading test), `independent` resets
    one layer at a time on a fresh copy. After each stage the method's map is
    recomputed on the randomized copy and compared with the original by the
    Spearman rank correlation of the absolute maps (the paper's main measure).
    A faithful method decorrelates (lower is better). Scores: `spearman@<layer>`
    per stage and `spearman` after the last stage (full randomization in cascading
    order). A constant map has no rank order and scores NaN. `model` is never modified.
    """
    B, C, H, W = x.shape
    names = list(layers) if layers is not None else randomization_layers(model)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing or not names:
        raise ValueError(f"layers {missing or names} are not modules of {type(model).__name__}; "
                         f"choose among {[n for n in modules if n]}")
    if order not in ("cascading", "independent"):
        raise ValueError(f"order must be 'cascading' or 'independent', got {order!r}")
    original = to_map(method(model, x, target), reduce) if attribution is None else attribution
    if original.shape != (B, H, W):
        raise ValueError(f"attribution must have shape {(B, H, W)}, got {tuple(original.shape)}")

    randomized = copy.deepcopy(model)
    stages = list(reversed(list(enumerate(names))))                       # output layer first
    scores, similarity = {}, []
    for i, name in stages:
        if order == "independent":
            randomized = copy.deepcopy(model)
        _randomize(dict(randomized.named_modules())[name], seed + i)
        stage_map = to_map(method(randomized, x, target), reduce)           # (B, H, W)
        rho = spearman(original.abs(), stage_map.abs())                      # (B,)
        scores[f"spearman@{name}"] = rho
        similarity.append(rho)
    scores["spearman"] = similarity[-1]
    labels = tuple(name for _, name in stages)
    curve = Curve(torch.arange(1, len(stages) + 1, device=x.device, dtype=x.dtype), torch.stack(similarity, dim=1), labels)
    return MetricResult(
        scores=scores,
        curves={"spearman": curve},
        higher_is_better={name: False for name in scores},
    )
