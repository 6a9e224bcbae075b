"""The batched similarity kernels (issue 22) against the direct formulas they replaced, kept here as oracles:
HOG's cell histograms by scatter vs one-hot votes averaged per cell, SSIM's box means by shifted slices vs
avg_pool2d, average ranks from one argsort vs per-group sums of places (and scipy's rankdata)."""
import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from metrics import hog, similarities, ssim
from metrics._rank import average_rank
from metrics._similarity import _local_mean


def _rank_oracle(v):
    """Ranks 0..n-1 along dim 1, ties averaged: the total of a group's sorted places over its size."""
    B, n = v.shape
    sorted_v, order = v.sort(dim=1, stable=True)
    new_group = torch.ones_like(sorted_v, dtype=torch.bool)
    new_group[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    group = new_group.cumsum(dim=1) - 1 + torch.arange(B)[:, None] * n
    position = torch.arange(n, dtype=torch.float64).expand(B, n).reshape(-1)
    total = torch.zeros(B * n, dtype=torch.float64).index_add_(0, group.reshape(-1), position)
    count = torch.zeros(B * n, dtype=torch.float64).index_add_(0, group.reshape(-1), torch.ones_like(position))
    return torch.empty(B, n, dtype=torch.float64).scatter_(1, order, (total / count.clamp(min=1))[group])


def _hog_oracle(a, orientations=9, cell=8, block=3):
    """HOG as skimage: per-pixel one-hot votes of the magnitude, averaged per cell, L2-Hys blocks."""
    B, H, W = a.shape
    rows, cols = H // cell, W // cell
    a = a.double()
    g_row, g_col = torch.zeros_like(a), torch.zeros_like(a)
    g_row[:, 1:-1] = a[:, 2:] - a[:, :-2]
    g_col[:, :, 1:-1] = a[:, :, 2:] - a[:, :, :-2]
    magnitude = torch.hypot(g_row, g_col)
    bin_ = (torch.rad2deg(torch.atan2(g_row, g_col)) % 180 / (180 / orientations)).floor().long()
    votes = F.one_hot(bin_.clamp(max=orientations - 1), orientations).permute(0, 3, 1, 2) * magnitude[:, None]
    blocks = F.unfold(F.avg_pool2d(votes[:, :, :rows * cell, :cols * cell], cell), block)
    blocks = blocks / (blocks.square().sum(dim=1, keepdim=True) + 1e-10).sqrt()
    blocks = blocks.clamp(max=0.2)
    blocks = blocks / (blocks.square().sum(dim=1, keepdim=True) + 1e-10).sqrt()
    n_r, n_c = rows - block + 1, cols - block + 1
    return blocks.view(B, orientations, block, block, n_r, n_c).permute(0, 4, 5, 2, 3, 1).reshape(B, -1)


def _maps(seed, shape=(6, 40, 37)):
    """Float maps, heavily tied integer maps, a constant one and a sparse one (most pixels 0)."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.rand(shape, generator=g, dtype=torch.float64)
    tied = torch.randint(0, 5, shape, generator=g).double()
    tied[0] = 3.0                                                              # constant map
    smooth[1] = torch.where(smooth[1] > 0.9, smooth[1], 0.0)                  # sparse map
    return smooth, tied


@pytest.mark.parametrize("seed", [0, 1, 0xDEADBEEF])
def test_average_rank_equals_oracle_and_scipy(seed):
    smooth, tied = _maps(seed)
    for m in (smooth, tied, smooth.float(), tied.float(), -tied):
        v = m.reshape(m.shape[0], -1)
        ours = average_rank(v)
        torch.testing.assert_close(ours, _rank_oracle(v), rtol=0, atol=0)
        ref = np.stack([scipy.stats.rankdata(row) - 1 for row in v.double().numpy()])
        np.testing.assert_array_equal(ours.numpy(), ref)
    half = tied.half().reshape(tied.shape[0], -1)                             # torch's own sort, not numpy's
    torch.testing.assert_close(average_rank(half), _rank_oracle(half), rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cell,block", [(8, 3), (3, 3), (5, 2), (4, 1)])
def test_hog_equals_oracle(seed, cell, block):
    smooth, tied = _maps(seed)
    for m in (smooth, tied, smooth.float()):
        torch.testing.assert_close(hog(m, cell=cell, block=block), _hog_oracle(m, cell=cell, block=block),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("win", [3, 7])
def test_box_mean_equals_avg_pool(win):
    smooth, tied = _maps(2)
    for m in (smooth, tied, smooth * 1e3):
        t = m[:, None]
        torch.testing.assert_close(_local_mean(t, "uniform", win), F.avg_pool2d(t, win, stride=1),
                                   rtol=1e-13, atol=1e-13)


def test_similarities_pin_the_oracles():
    """The measures on a pair, through the fast kernels, equal the oracles' Spearman, HOG Pearson and SSIM."""
    smooth, tied = _maps(3, (4, 48, 48))
    a, b = smooth.float(), (smooth + 0.3 * tied).float()
    s = similarities(a, b, measures=["spearman", "hog", "ssim"])
    mm = lambda t: (t - t.amin(dim=(1, 2), keepdim=True)) / (t.amax(dim=(1, 2), keepdim=True)   # noqa: E731
                                                           - t.amin(dim=(1, 2), keepdim=True))
    ra, rb = (_rank_oracle(t.abs().reshape(4, -1)) for t in (a, b))
    torch.testing.assert_close(s["spearman"].double(), torch.tensor(
        [np.corrcoef(ra[i], rb[i])[0, 1] for i in range(4)], dtype=torch.float64), rtol=1e-6, atol=1e-7)
    fa, fb = _hog_oracle(mm(a.abs())), _hog_oracle(mm(b.abs()))
    torch.testing.assert_close(s["hog"].double(), torch.tensor(
        [np.corrcoef(fa[i], fb[i])[0, 1] for i in range(4)], dtype=torch.float64), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s["ssim"], ssim(mm(a.abs()), mm(b.abs())), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu():
    smooth, tied = _maps(4, (4, 48, 48))
    a, b = smooth.float(), (smooth + 0.3 * tied).float()
    cpu = similarities(a, b)
    gpu = similarities(a.cuda(), b.cuda())
    for k in cpu:
        torch.testing.assert_close(gpu[k].cpu(), cpu[k], rtol=1e-6, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(average_rank(tied.reshape(4, -1).cuda()).cpu(), _rank_oracle(tied.reshape(4, -1)),
                               rtol=0, atol=0)
