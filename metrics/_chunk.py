"""chunked(): the one place that bounds a metric's memory, and retries a chunk that ran out of it."""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor


class ChunkRetryWarning(RuntimeWarning):
    """A chunk ran out of memory and was retried at half the size; the runner records these."""


def _is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's 'can't allocate memory' RuntimeError."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e))


def chunked(fn: Callable[[Tensor], Tensor], n: int, chunk_size: int, *, device: torch.device) -> Tensor:
    """Evaluate `fn` on flat indices 0..n-1, `chunk_size` at a time, and concatenate along dim 0.

    A chunk that runs out of memory is retried once at half the size (and the rest of the call
    keeps the smaller size), with a ChunkRetryWarning; a second out-of-memory is raised. Results
    do not depend on the chunk size, so a retry never changes a number.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    index = torch.arange(n, device=device)
    out, start, retried = [], 0, False
    while start < n:
        i = index[start:start + chunk_size]
        try:
            out.append(fn(i))
        except Exception as e:                                  # noqa: BLE001 - only OOM is handled
            if retried or not _is_oom(e) or chunk_size == 1:
                raise
            retried, before, chunk_size = True, chunk_size, max(1, chunk_size // 2)
            del e
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            warnings.warn(ChunkRetryWarning(f"out of memory at chunk_size={before}; retried with chunk_size="
                                            f"{chunk_size}"), stacklevel=2)
            continue
        start += len(i)
    return torch.cat(out) if out else fn(index)
