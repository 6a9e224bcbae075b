"""Batching shared by methods and metrics (public API): chunked() bounds a pass's memory and retries a
chunk that ran out of it; draws_per_pass() and retry_smaller() serve methods that batch internally;
pass_sizes() sets the images per model pass tuned to the model (bench.tuning measures them), which every
pass without an explicit size takes; gaussian_blur() is the one blur of the blur baselines and fills."""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CHUNK_BYTES", "ChunkRetryWarning", "PassSizes", "auto_chunk_size", "chunked", "draws_per_pass",
           "gaussian_blur", "is_out_of_memory", "pass_sizes", "retry_smaller"]

T = TypeVar("T")


# Input bytes per chunk when chunk_size is None and no pass_sizes() context covers the inputs (a function
# called outside a run or bench.api). On CPU a chunk whose inputs fit in the cache runs fastest: pixel
# flipping on small_cnn (2-core reference machine) made 7300 forward passes/s at 32 px in chunks of 2 MiB
# (170 images) against 4700/s at 4 MiB, and 1890/s against 1530/s at 64 px; resnet18 at 224 px runs as
# fast in chunks of 3 as of 6; but another small CNN at 32 px ran 1.9x faster in chunks of 64 than 170
# (issue 22), hence the tuned sizes. On a GPU larger chunks only fill the device better
# (an out-of-memory chunk is retried at half the size).
CHUNK_BYTES = {"cpu": 2 << 20, "cuda": 512 << 20}


@dataclass(frozen=True)
class PassSizes:
    """Images per model pass tuned to one model for inputs of `shape` (C, H, W) on a device of type
    `device`: `forward` for inference passes, `backward` for forward+backward (gradient) passes."""

    shape: tuple[int, ...]
    device: str
    forward: int
    backward: int

    def __post_init__(self) -> None:
        for name in ("forward", "backward"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PassSizes.{name} must be a positive integer (images per pass), got {v!r}")


_TUNED: ContextVar[PassSizes | None] = ContextVar("pass_sizes", default=None)


@contextmanager
def pass_sizes(sizes: PassSizes | None) -> Iterator[PassSizes | None]:
    """Within the block, passes over inputs of sizes.shape on sizes.device given no explicit chunk size take
    the tuned sizes (None: the CHUNK_BYTES budget). The runner sets it for a run, bench.api per call."""
    token = _TUNED.set(sizes)
    try:
        yield sizes
    finally:
        _TUNED.reset(token)


def auto_chunk_size(x: Tensor, *, backward: bool = False) -> int:
    """Inputs per chunk for x's items: the pass_sizes() in force where it covers x's shape and device
    (its backward size for gradient passes), else such that a chunk takes CHUNK_BYTES (at least 1)."""
    tuned = _TUNED.get()
    if tuned is not None and tuple(x.shape[1:]) == tuple(tuned.shape) and x.device.type == tuned.device:
        return tuned.backward if backward else tuned.forward
    budget = CHUNK_BYTES.get(x.device.type, CHUNK_BYTES["cuda"])
    return max(1, budget // max(1, x.shape[1:].numel() * x.element_size()))


def draws_per_pass(chunk_size: int | None, x: Tensor) -> int:
    """Draws of the whole batch x (noise samples, references, IG nodes) per gradient pass: `chunk_size`
    images, or where it is None auto_chunk_size(x, backward=True), over the batch size; at least 1."""
    images = auto_chunk_size(x, backward=True) if chunk_size is None else chunk_size
    return max(1, images // max(1, len(x)))


class ChunkRetryWarning(RuntimeWarning):
    """A chunk ran out of memory and was retried at half the size; the runner records these."""


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's 'can't allocate memory' RuntimeError."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e))


def _halved_after_oom(name: str, size: int, smallest: int) -> int:
    """The size to retry with after `name`=`size` ran out of memory: half, not below `smallest`. Frees
    CUDA's cached blocks and warns with a ChunkRetryWarning, which the runner records."""
    half = max(smallest, size // 2)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    warnings.warn(ChunkRetryWarning(f"out of memory at {name}={size}; retried with {name}={half}"), stacklevel=3)
    return half


def retry_smaller(fn: Callable[[int], T], size: int, *, smallest: int = 1, name: str = "size") -> T:
    """fn(size), retried once at half the size (not below `smallest`) if it runs out of memory:
    chunked()'s rule, for a call that batches internally (e.g. captum's IG); `name` labels the warning."""
    try:
        return fn(size)
    except Exception as e:                                      # noqa: BLE001 - only OOM is handled
        if not is_out_of_memory(e) or size <= smallest:
            raise
        del e
    return fn(_halved_after_oom(name, size, smallest))


def chunked(fn: Callable[[Tensor], Tensor], n: int, chunk_size: int | None, *, device: torch.device,
            like: Tensor | None = None) -> Tensor:
    """Evaluate `fn` on flat indices 0..n-1, `chunk_size` at a time, and concatenate along dim 0.

    A chunk that runs out of memory is retried once at half the size (and the rest of the call
    keeps the smaller size), with a ChunkRetryWarning; a second out-of-memory is raised. Results
    do not depend on the chunk size, so a retry never changes a number. chunk_size None picks
    auto_chunk_size(like), `like` being one of the inputs fn builds (e.g. the model's input x): the
    tuned pass size where pass_sizes() is set, else the memory budget.
    """
    if chunk_size is None and like is not None:
        chunk_size = auto_chunk_size(like)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, or None to size chunks from memory, "
                         f"got {chunk_size!r}")
    index = torch.arange(n, device=device)
    out, start, retried = [], 0, False
    while start < n:
        i = index[start:start + chunk_size]
        try:
            out.append(fn(i))
        except Exception as e:                                  # noqa: BLE001 - only OOM is handled
            if retried or not is_out_of_memory(e) or chunk_size == 1:
                raise
            del e
            retried, chunk_size = True, _halved_after_oom("chunk_size", chunk_size, 1)
            continue
        start += len(i)
    return torch.cat(out) if out else fn(index)

def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of every channel, replicate padding (any image size)."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    C = x.shape[1]
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
