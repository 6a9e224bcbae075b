"""The channel reduction to maps, and what each metric consumes of an attribution.

`to_map()` is the one channel reduction from an attribution (B, C, H, W) to a map (B, H, W).
`consumes()` declares, on a metric function, which form of the attribution its paper's formula
takes; the runner reads it with `consumed()` and hands the metric exactly that (`metric_input`):

- ``raw``: the attribution as the method returned it, (B, C, H, W) (e.g. MPRT computes
  Adebayo et al.'s absolute and signed maps from it itself);
- ``signed``: its channel sum Σ_c E_c, (B, H, W) (e.g. infidelity's Iᵀφ);
- ``reduced``: the run's map, `to_map(attribution, reduce)` (metrics that rank or locate pixels).

A metric without a declaration consumes ``reduced``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Literal, TypeVar

from torch import Tensor

Reduce = Literal["sum", "abs_sum", "max_abs", "l2"]
REDUCTIONS: tuple[str, ...] = ("sum", "abs_sum", "max_abs", "l2")
Consumes = Literal["raw", "signed", "reduced"]
CONSUMES: tuple[str, ...] = ("raw", "signed", "reduced")
F = TypeVar("F", bound=Callable[..., Any])


def to_map(attribution: Tensor, reduce: Reduce = "abs_sum") -> Tensor:
    """Reduce an attribution over channels: sum (signed), abs_sum (the default, as a run's), max_abs or l2.

    `sum` keeps the sign, so evidence for and against the target stay apart; the
    other three give non-negative maps. The reduction is part of every run's manifest.
    """
    if attribution.ndim != 4:
        raise ValueError(f"attribution must have shape (B, C, H, W), got {tuple(attribution.shape)}")
    if reduce == "sum":
        return attribution.sum(dim=1)
    if reduce == "abs_sum":
        return attribution.abs().sum(dim=1)
    if reduce == "max_abs":
        return attribution.abs().amax(dim=1)
    if reduce == "l2":
        return attribution.norm(dim=1)
    raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")


def consumes(kind: Consumes) -> Callable[[F], F]:
    """Decorator: the metric's `attribution` argument is the ``raw``, ``signed`` or ``reduced`` form."""
    if kind not in CONSUMES:
        raise ValueError(f"a metric consumes one of {CONSUMES}, got {kind!r}")

    def mark(fn: F) -> F:
        fn.consumes = kind                                          # type: ignore[attr-defined]
        return fn
    return mark


def consumed(metric: Callable[..., Any]) -> str:
    """What `metric` (a function or a functools.partial of one) consumes; ``reduced`` when undeclared."""
    while isinstance(metric, functools.partial):
        metric = metric.func
    return getattr(metric, "consumes", "reduced")


def metric_input(attribution: Tensor, kind: str, reduce: Reduce) -> Tensor:
    """The form `kind` of a raw attribution (B, C, H, W), as `consumed()` names it."""
    if kind == "raw":
        return attribution
    if kind == "signed":
        return to_map(attribution, "sum")
    if kind == "reduced":
        return to_map(attribution, reduce)
    raise ValueError(f"a metric consumes one of {CONSUMES}, got {kind!r}")
