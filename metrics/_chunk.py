"""chunked(): the one place that bounds a metric's memory."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def chunked(fn: Callable[[Tensor], Tensor], n: int, chunk_size: int, *, device: torch.device) -> Tensor:
    """Evaluate `fn` on flat indices 0..n-1, `chunk_size` at a time, and concatenate along dim 0."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    index = torch.arange(n, device=device)
    return torch.cat([fn(i) for i in index.split(chunk_size)])
