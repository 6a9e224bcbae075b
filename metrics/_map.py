"""to_map(): the one channel reduction from an attribution (B, C, H, W) to a map (B, H, W)."""
from __future__ import annotations

from typing import Literal

from torch import Tensor

Reduce = Literal["sum", "abs_sum", "max_abs", "l2"]
REDUCTIONS: tuple[str, ...] = ("sum", "abs_sum", "max_abs", "l2")


def to_map(attribution: Tensor, reduce: Reduce = "sum") -> Tensor:
    """Reduce an attribution over channels: sum (signed), abs_sum, max_abs or l2 (Euclidean norm).

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
