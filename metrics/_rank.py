"""Exact rank statistics: average ranks of each row (Spearman's, metrics._similarity), and of maps against
masks (localization_auc): each row sorted once by an integer key 2 k(value) + in-mask, and the Mann-Whitney U
read off the sorted keys."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def average_rank(v: Tensor) -> Tensor:
    """Ranks 0..n-1 along dim 1 of (B, n), float64, tied values sharing their average rank (as scipy.stats.rankdata
    less one): a group of ties at sorted places first..last ranks (first + last) / 2. One sort of the batch, in
    numpy on CPU (its argsort of 64 x 4096 float32 is 2-3x torch.sort's speed on our machine; ties may come in
    any order, their average does not depend on it)."""
    B, n = v.shape
    if v.device.type == "cpu" and v.dtype in (torch.float32, torch.float64):
        order = torch.from_numpy(np.argsort(v.detach().numpy(), axis=1))
    else:
        order = v.argsort(dim=1)
    sorted_v = v.gather(1, order)                                       # (B, n)
    place = torch.arange(n, device=v.device).expand(B, n)
    first = torch.ones_like(sorted_v, dtype=torch.bool)
    first[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]                  # a group starts here
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]                                         # a group ends here
    start = torch.where(first, place, 0).cummax(dim=1).values
    end = torch.where(last, place, n).flip(1).cummin(dim=1).values.flip(1)
    return torch.empty(B, n, dtype=torch.float64, device=v.device).scatter_(1, order, (start + end).double() / 2)


def _sorted_keys(a: Tensor, m: Tensor) -> Tensor:
    """(N, n) integer keys 2 k(value) + in-mask, each row sorted ascending: pixels in value order,
    and among equal values those outside the mask first. k is order-preserving and equal exactly
    for equal values: the float32 bits for maps of at most 32 bits, the value's dense rank otherwise.

    On CPU the keys are built and sorted in numpy, a few rows per thread, as int32 where they fit
    (_narrow_keys): numpy's vectorised sort (x86-simd-sort) of 1000 x 224^2 int32 keys takes 0.2 s
    on the 2-core reference machine, torch.sort of the values 2.3 s (it also sorts the indices)."""
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        v, order = a.sort(dim=1)                                        # e.g. float64: dense ranks as k
        dense = F.pad((v[:, 1:] != v[:, :-1]).cumsum(dim=1), (1, 0))
        keys = 2 * torch.empty_like(dense).scatter_(1, order, dense) + m
        return keys.sort(dim=1).values
    a = a.detach().float()
    if a.device.type != "cpu":
        return _wide_keys(a, m).sort(dim=1).values
    values, inside = a.numpy(), m.numpy()

    def in_threads(job: Callable[[slice], object]) -> list:              # numpy's sort releases the GIL
        blocks = (slice(s, s + _ROWS_PER_THREAD_JOB) for s in range(0, len(values), _ROWS_PER_THREAD_JOB))
        with ThreadPoolExecutor(torch.get_num_threads()) as pool:
            return list(pool.map(job, blocks))

    narrow = np.empty(values.shape, dtype=np.int32)

    def narrow_sorted(rows: slice) -> bool:
        fits = _narrow_keys(values[rows], inside[rows], narrow[rows])
        if fits:
            narrow[rows].sort(axis=1)
        return fits

    if all(in_threads(narrow_sorted)):
        return torch.from_numpy(narrow)
    keys = _wide_keys(a, m)                                             # e.g. inf, or a span over 2^126
    wide = keys.numpy()
    in_threads(lambda rows: wide[rows].sort(axis=1))
    return keys


_ROWS_PER_THREAD_JOB = 16


def _wide_keys(a: Tensor, m: Tensor) -> Tensor:
    """int64 keys 2 k + in-mask of float32 values; k: the magnitude bits, complemented (-k - 1) for
    negative values, an order-preserving integer (-0.0 is read as 0.0)."""
    bits = (a + 0.0).view(torch.int32)                                  # + 0.0 turns -0.0 into 0.0
    return (((bits & 0x7FFFFFFF) ^ (bits >> 31)).long() << 1) | m


def _narrow_keys(values: np.ndarray, inside: np.ndarray, out: np.ndarray) -> bool:
    """_wide_keys' order in int32 where it fits, written to `out`: each row's magnitude bits less
    those of its smallest nonzero magnitude's power of two (zero stays 0) take 30 bits when the row's
    nonzero magnitudes span less than 2^126, which any real map does. False (out unusable) else."""
    bits = (values + 0.0).view(np.int32)
    magnitude = bits & 0x7FFFFFFF
    smallest = np.where(magnitude > 0, magnitude, 0x7FFFFFFF).min(axis=1, keepdims=True)
    magnitude -= np.maximum((smallest >> 23) - 1, 0) << 23             # exponent field minus one, >= 0
    np.maximum(magnitude, 0, out=magnitude)
    if magnitude.max(initial=0) >= 1 << 30:
        return False
    magnitude ^= bits >> 31                                             # negatives: -k - 1
    np.left_shift(magnitude, 1, out=out)
    out |= inside
    return True


def _twice_u(keys: Tensor) -> tuple[Tensor, Tensor]:
    """2U and P (pixels in the mask) per row of sorted keys (see _sorted_keys); U counts the (in, out)
    pixel pairs ordered in > out, plus half the tied pairs.

    A positive at sorted place j follows j pixels: every positive before it and every negative with a
    smaller or equal value, so sum_j (over positives) - P (P - 1) / 2 counts each tied pair once in
    full. Each value held by both N_g negatives and P_g positives takes back half of its N_g P_g pairs;
    such a group is where a negative key 2k is followed by the positive key 2k + 1."""
    N, n = keys.shape
    weights = torch.stack([torch.ones(n, device=keys.device), torch.arange(n, device=keys.device)], 1).double()
    P, place_sum = ((keys & 1).double() @ weights).long().unbind(1)      # exact: sums < 2^53
    twice_u = 2 * place_sum - P * (P - 1)
    r, c = (keys[:, 1:] - keys[:, :-1] == 1).nonzero(as_tuple=True)
    mixed = (keys[r, c] & 1) == 0
    r, c = r[mixed], c[mixed]                                           # (G,) last negative of each group
    if r.numel():
        per_row = torch.bincount(r, minlength=N)
        slot = torch.arange(r.numel(), device=keys.device) - (per_row.cumsum(0) - per_row)[r]
        neg, pos = (keys[:, :1].repeat(1, int(per_row.max())) for _ in range(2))   # (N, G_max), padded
        neg[r, slot], pos[r, slot] = keys[r, c], keys[r, c + 1]
        first_neg = torch.searchsorted(keys, neg)[r, slot]
        end_pos = torch.searchsorted(keys, pos, right=True)[r, slot]
        twice_u.index_add_(0, r, -(c + 1 - first_neg) * (end_pos - c - 1))
    return twice_u, P
