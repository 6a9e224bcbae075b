"""The one-pixel removal sweep, shared by the metrics that remove every pixel alone (public API).

pixel_sweep(model, x, target, baseline=...) is f_t(x_{-p}) for every pixel p: the target output with
pixel p (all channels) alone replaced by the baseline, (B, H W). It does not depend on the attribution:
faithfulness_estimate with one pixel per group and non_sensitivity with patch=1 both consist of it, for
every method of a run. Inside `with sweeps_shared():` (the runner opens it around its scoring loop) a
sweep is computed once per key and then reused; outside, nothing is kept and every call computes, so
the metrics stay pure functions. The key is everything the numbers depend on: the model object (held
weakly: another object, such as MPRT's randomized copy, never matches) and a hash of its weights and
buffers, hashes of the contents of x, target and the baseline fill (which is where seed enters: a
"uniform" baseline's field; a constant one is the same under any seed), the output, the images per
pass (sums over a pass of another size may round differently) and the autocast and determinism
settings. Memory is bounded: least recently used sweeps are dropped past `max_bytes`.
"""
from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import torch
from torch import Tensor, nn

from metrics.baselines import Baseline, baseline_fill, target_output
from metrics.batching import auto_chunk_size, chunked

__all__ = ["SweepMemo", "pixel_sweep", "sweeps_shared"]

SWEEP_BYTES = 256 << 20          # the memo's default budget: 1,300 samples at 224 px, 16,000 at 64 px


@dataclass
class SweepMemo:
    """The sweeps kept by one sweeps_shared() block, least recently used first; hits and misses count calls."""

    max_bytes: int
    entries: OrderedDict = field(default_factory=OrderedDict)      # key -> (weakref to model, (B, HW) tensor)
    nbytes: int = 0
    hits: int = 0
    misses: int = 0

    def get(self, key: tuple, model: nn.Module) -> Tensor | None:
        """The sweep stored under key for this very model object, or None (an entry of a dead model is dropped)."""
        entry = self.entries.get(key)
        if entry is None or entry[0]() is not model:
            if entry is not None:
                self._drop(key)
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: tuple, model: nn.Module, sweep: Tensor) -> None:
        """Keep sweep under key, dropping the least recently used entries past max_bytes (never one larger)."""
        size = sweep.numel() * sweep.element_size()
        if size > self.max_bytes:
            return
        self.entries[key] = (weakref.ref(model), sweep)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple) -> None:
        _, sweep = self.entries.pop(key)
        self.nbytes -= sweep.numel() * sweep.element_size()


_MEMO: ContextVar[SweepMemo | None] = ContextVar("pixel_sweeps", default=None)


@contextmanager
def sweeps_shared(max_bytes: int = SWEEP_BYTES) -> Iterator[SweepMemo]:
    """Within the block, pixel_sweep() computes each sweep once and reuses it (at most max_bytes kept);
    the memo (its hits and misses) is yielded and emptied on exit."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes must be a non-negative integer (bytes of sweeps kept), got {max_bytes!r}")
    memo = SweepMemo(max_bytes)
    token = _MEMO.set(memo)
    try:
        yield memo
    finally:
        _MEMO.reset(token)
        memo.entries.clear()
        memo.nbytes = 0


def _digest(*tensors: Any) -> str:
    """A content hash of tensors: dtype, shape, strides and bytes (copied to the CPU from elsewhere)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        if not isinstance(t, Tensor):                                               # a module's extra state
            h.update(repr(t).encode())
            continue
        t = t.detach()
        h.update(f"{t.dtype}{tuple(t.shape)}{tuple(t.stride())}".encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).cpu().numpy())                # buffer: no copy
    return h.hexdigest()


def _key(model: nn.Module, x: Tensor, target: Tensor, fill: Tensor, output: str, size: int) -> tuple[Any, ...]:
    """Everything a sweep's numbers depend on (module docstring)."""
    device = x.device.type
    amp = ((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) if hasattr(torch, "get_autocast_dtype")
           else (torch.is_autocast_enabled(), torch.is_autocast_cpu_enabled(), torch.get_autocast_gpu_dtype(),
                 torch.get_autocast_cpu_dtype()))                                  # torch < 2.4
    return (id(model), _digest(*model.state_dict(keep_vars=False).values()), str(x.device), _digest(x),
            _digest(target), _digest(fill), output, size, amp, torch.are_deterministic_algorithms_enabled())


def pixel_sweep(
    model: nn.Module, x: Tensor, target: Tensor, *, baseline: Baseline = 0.0,
    output: Literal["logit", "softmax"] = "logit", seed: int = 0, chunk_size: int | None = None,
) -> Tensor:
    """f_t(x_{-p}) for every sample and pixel p (row-major), (B, H W): pixel p alone, in all channels,
    replaced by `baseline` (metrics.baselines; `seed` draws "uniform"), the target's logit or softmax.

    One pass per (sample, pixel), `chunk_size` images at a time (None: auto_chunk_size). Inside
    sweeps_shared() a sweep already computed for the same key is returned instead (a copy); a model
    in training mode is never memoised (dropout draws differ per call).
    """
    B, C, H, W = x.shape
    n = H * W
    fill = baseline_fill(x, baseline, seed=seed)
    size = auto_chunk_size(x) if chunk_size is None else chunk_size
    memo = _MEMO.get()
    key = None
    if memo is not None and not model.training:
        key = _key(model, x, target, fill, output, size)
        if (found := memo.get(key, model)) is not None:
            return found.clone()
    full = fill.expand_as(x)                                                        # (B, C, H, W), a view
    pixel = torch.arange(n, device=x.device).view(1, 1, H, W)

    def forward(i: Tensor) -> Tensor:                                               # i: flat into (B, HW)
        b, p = i.div(n, rounding_mode="floor"), i % n
        keep = pixel != p.view(-1, 1, 1, 1)                                         # (N, 1, H, W)
        return target_output(model, torch.where(keep, x[b], full[b]), target[b], output)

    with torch.inference_mode():
        sweep = chunked(forward, B * n, size, device=x.device, like=x).view(B, n)  # (B, HW)
    if key is not None:
        memo.put(key, model, sweep.clone())
    return sweep
