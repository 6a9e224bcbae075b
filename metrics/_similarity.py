"""Similarity of two attributions, the measures of the randomization sanity checks (Adebayo et al. 2018).

`similarities(a, b)` compares two attributions (B, C, H, W) per sample under every measure at once.
From each attribution E it builds Adebayo et al.'s two maps (their code: saliency's
VisualizeImageGrayscale / VisualizeImageDiverging):

- ABS    = sum_c |E_c|  (B, H, W), optionally clipped at its `clip`-th percentile;
- signed = sum_c E_c    (B, H, W), optionally clipped to [-3 s, s], s = |`clip`-th percentile| (what
  VisualizeImageDiverging's clip to [-1, 1] of (m + s) / 2s keeps, up to an order-preserving rescaling).

spearman ranks ABS, spearman_signed ranks signed. ssim, hog and top_k compare the ABS maps
(`absolute=True`, as Adebayo's code does with its grayscale maps) or the signed ones, min-max normalised
to [0, 1] per sample. A (B, H, W) tensor is taken as a one-channel attribution (ABS = |map|).

Chance levels, for two independent maps of iid pixels: spearman, spearman_signed 0; top_k = the
fraction `top_k` (|A & B| / k of two random k-sets of n pixels is k / n on average), not 0; ssim and
hog near 0 but not 0 (64 x 64 iid uniform maps, mean over 256 pairs: ssim 0.005 (either window), hog
0.071 by Pearson with 8 px cells, 0.010 by Spearman with Adebayo's 5% cells). Scores are reported
raw, chance not subtracted: compare with the random control, which scores chance.
"""
from __future__ import annotations

from numbers import Real
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from metrics._rank import average_rank as _average_rank

__all__ = ["similarities", "degenerate", "spearman", "ssim", "hog", "hog_similarity", "top_k_overlap", "SIMILARITIES"]

SIMILARITIES: tuple[str, ...] = ("spearman", "spearman_signed", "ssim", "hog", "top_k")
Constant = Literal["zero", "nan"]
Window = Literal["uniform", "gaussian"]
Correlation = Literal["pearson", "spearman"]
_GAUSS_SIGMA, _GAUSS_TRUNCATE = 1.5, 3.5            # skimage's gaussian_weights=True: an 11 x 11 window


# ---------------------------------------------------------------- correlations

def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation per row of (B, n) tensors in float64; NaN where a row is constant."""
    a, b = a.double() - a.double().mean(dim=1, keepdim=True), b.double() - b.double().mean(dim=1, keepdim=True)
    den = (a.square().sum(dim=1) * b.square().sum(dim=1)).sqrt()
    return torch.where(den > 0, (a * b).sum(dim=1) / den, torch.nan)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation per row of (B, ...) tensors, ties given average ranks.

    A row that is constant in `a` or `b` has no rank order: the result is NaN there.
    """
    B = a.shape[0]
    return _pearson(_average_rank(a.reshape(B, -1)), _average_rank(b.reshape(B, -1))).to(a.dtype)


# ---------------------------------------------------------------- SSIM

def _check_window(window: str) -> None:
    if window not in ("uniform", "gaussian"):
        raise ValueError(f"ssim_window must be 'uniform' or 'gaussian', got {window!r}")


def _window_size(window: str, win_size: int) -> int:
    return 2 * int(_GAUSS_TRUNCATE * _GAUSS_SIGMA + 0.5) + 1 if window == "gaussian" else win_size


def _local_mean(t: Tensor, window: str, win: int) -> Tensor:
    """Weighted mean over every win x win window inside (B, 1, H, W): uniform, or a normalised Gaussian
    (sigma 1.5, separable, as scipy's gaussian_filter with truncate 3.5 away from the border)."""
    if window == "uniform":                          # box sums of shifted slices: 2 win adds, not win^2 per pixel
        H, W = t.shape[-2] - win + 1, t.shape[-1] - win + 1
        rows = t[..., :H, :].clone()
        for i in range(1, win):
            rows += t[..., i:i + H, :]
        out = rows[..., :W].clone()
        for j in range(1, win):
            out += rows[..., j:j + W]
        return out.div_(win ** 2)
    r = torch.arange(win, dtype=t.dtype, device=t.device) - win // 2
    g = torch.exp(-r.square() / (2 * _GAUSS_SIGMA ** 2))
    g = g / g.sum()
    return F.conv2d(F.conv2d(t, g.view(1, 1, win, 1)), g.view(1, 1, 1, win))


def ssim(a: Tensor, b: Tensor, *, win_size: int = 7, data_range: float = 1.0, window: Window = "uniform") -> Tensor:
    """Mean structural similarity (Wang et al. 2004) of (B, H, W) maps, as skimage's structural_similarity.

    Local means, variances (sample, n/(n-1), n = win^2) and covariance over every window that fits
    inside the map: `window="uniform"`, win_size x win_size (skimage's default), or "gaussian", an
    11 x 11 Gaussian of sigma 1.5 (skimage's gaussian_weights=True, Adebayo et al.'s setting; win_size
    unused). C1 = (0.01 R)^2, C2 = (0.03 R)^2, R = data_range; SSIM = mean over windows of
    (2 ma mb + C1)(2 sab + C2) / ((ma^2 + mb^2 + C1)(sa^2 + sb^2 + C2)). Maps smaller than a window: NaN.
    """
    B, H, W = a.shape
    _check_window(window)
    if window == "uniform" and (win_size < 2 or win_size % 2 == 0):
        raise ValueError(f"win_size must be an odd integer >= 3, got {win_size}")
    win = _window_size(window, win_size)
    if win > min(H, W):
        return torch.full((B,), torch.nan, dtype=a.dtype, device=a.device)
    return _ssim(_ssim_side(a, window, win), _ssim_side(b, window, win), window, win, data_range).to(a.dtype)


def _ssim_side(t: Tensor, window: str, win: int) -> tuple[Tensor, Tensor, Tensor]:
    """One map's share of SSIM: the map (B, 1, H, W) in float64, its local means and local means of squares."""
    t = t.double()[:, None]
    return t, _local_mean(t, window, win), _local_mean(t * t, window, win)


def _ssim(sa: tuple[Tensor, Tensor, Tensor], sb: tuple[Tensor, Tensor, Tensor], window: str, win: int,
          data_range: float) -> Tensor:
    a, ma, aa = sa
    b, mb, bb = sb
    cov = win ** 2 / (win ** 2 - 1)
    va, vb = cov * (aa - ma ** 2), cov * (bb - mb ** 2)
    vab = cov * (_local_mean(a * b, window, win) - ma * mb)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ma * mb + c1) * (2 * vab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    return s.mean(dim=(1, 2, 3))


# ---------------------------------------------------------------- HOG

def hog(a: Tensor, *, orientations: int = 9, cell: int = 8, block: int = 3) -> Tensor:
    """Histogram of oriented gradients (Dalal & Triggs 2005) of (B, H, W) maps, as skimage.feature.hog.

    Central-difference gradients (zero on the border rows/columns), unsigned orientation in
    [0, 180) hard-binned into `orientations` bins, magnitudes averaged per cell x cell cell,
    block x block cells per block normalised by L2-Hys (eps 1e-5, clip 0.2). Returns
    (B, n_blocks_row * n_blocks_col * block * block * orientations) in skimage's order;
    (B, 0) when the map holds less than one block.
    """
    B, H, W = a.shape
    rows, cols = H // cell, W // cell                                            # cells
    if rows < block or cols < block:
        return a.new_zeros(B, 0)
    a = a.double()
    g_row, g_col = torch.zeros_like(a), torch.zeros_like(a)
    g_row[:, 1:-1] = a[:, 2:] - a[:, :-2]
    g_col[:, :, 1:-1] = a[:, :, 2:] - a[:, :, :-2]
    h, w = rows * cell, cols * cell                                              # the cells' pixels
    g_row, g_col = g_row[:, :h, :w], g_col[:, :h, :w]
    magnitude = torch.hypot(g_row, g_col)                                        # (B, h, w)
    angle = torch.rad2deg(torch.atan2(g_row, g_col)) % 180
    bin_ = (angle / (180 / orientations)).floor().long().clamp(max=orientations - 1)
    # each pixel's magnitude added to its (sample, bin, cell) in pixel order, then the cell's mean
    r, c = (torch.arange(n, device=a.device) // cell for n in (h, w))
    index = ((torch.arange(B, device=a.device)[:, None, None] * orientations + bin_) * rows + r[:, None]) * cols + c
    hist = a.new_zeros(B * orientations * rows * cols).index_add_(0, index.flatten(), magnitude.flatten())
    hist = hist.view(B, orientations, rows, cols) / cell ** 2                    # (B, O, rows, cols)
    blocks = F.unfold(hist, block)                                               # (B, O*block*block, L)
    eps2 = 1e-10
    blocks = blocks / (blocks.square().sum(dim=1, keepdim=True) + eps2).sqrt()
    blocks = blocks.clamp(max=0.2)
    blocks = blocks / (blocks.square().sum(dim=1, keepdim=True) + eps2).sqrt()
    n_r, n_c = rows - block + 1, cols - block + 1
    out = blocks.view(B, orientations, block, block, n_r, n_c).permute(0, 4, 5, 2, 3, 1)
    return out.reshape(B, -1)


def _hog_cell(cell: float, width: int) -> int:
    """Cell side in pixels: `cell` itself, or round(cell * width) (at least 2) when 0 < cell < 1."""
    if isinstance(cell, bool) or not isinstance(cell, Real) or not cell > 0 or (cell >= 1 and cell != int(cell)):
        raise ValueError(f"hog_cell must be a whole number of pixels >= 1 or a fraction of the map's width in "
                         f"(0, 1) (Adebayo et al.: 16 / 299 = 0.0535), got {cell!r}")
    return int(cell) if cell >= 1 else max(2, round(cell * width))


def _correlation(fa: Tensor, fb: Tensor, correlation: str) -> Tensor:
    """Pearson or Spearman per row of (B, n) features; NaN where there are none."""
    if fa.shape[1] == 0:
        return torch.full((fa.shape[0],), torch.nan, dtype=torch.float64, device=fa.device)
    return _pearson(fa, fb) if correlation == "pearson" else _pearson(_average_rank(fa), _average_rank(fb))


def hog_similarity(a: Tensor, b: Tensor, *, orientations: int = 9, cell: float = 8, block: int = 3,
                   correlation: Correlation = "pearson") -> Tensor:
    """Correlation (Pearson, or Spearman as Adebayo et al.'s code) of the `hog` features of two (B, H, W)
    maps; `cell` in pixels or as a fraction of the width (`_hog_cell`). NaN if either has none or is flat."""
    if correlation not in ("pearson", "spearman"):
        raise ValueError(f"hog_correlation must be 'pearson' or 'spearman', got {correlation!r}")
    c = _hog_cell(cell, a.shape[-1])
    return _correlation(hog(a, orientations=orientations, cell=c, block=block),
                        hog(b, orientations=orientations, cell=c, block=block), correlation).to(a.dtype)


# ---------------------------------------------------------------- top-k intersection

def _top_k_count(fraction: float, n: int) -> int:
    """k = max(1, round(fraction * n)) after checking that fraction lies in (0, 1]."""
    if isinstance(fraction, bool) or not isinstance(fraction, Real) or not 0 < fraction <= 1:
        raise ValueError(f"top_k must be a fraction of the pixels in (0, 1], got {fraction!r}")
    return max(1, round(fraction * n))


def _top_k_weights(v: Tensor, k: int) -> Tensor:
    """(B, n) float64: the probability that each entry is among the k largest of its row when ties at
    the k-th value are broken uniformly at random: 1 above it, (k - #above) / #tied at it, 0 below.
    The membership form of localization's `_top_k_hits` (which counts a fixed mask's hits)."""
    t = v.topk(k, dim=1).values[:, -1:]                                        # (B, 1) k-th largest
    above, tied = v > t, v == t
    g, e = above.sum(dim=1, keepdim=True), tied.sum(dim=1, keepdim=True)
    return above.double() + tied.double() * (k - g).double() / e.clamp(min=1).double()


def top_k_overlap(a: Tensor, b: Tensor, *, fraction: float = 0.1) -> Tensor:
    """E|top_k(a) & top_k(b)| / k per row (Ghorbani et al. 2019), k = max(1, round(fraction * n)).

    Ties at the k-th value are taken in expectation over uniform tie-breaking, independently in
    each map: E|A & B| = sum_p P(p in A) P(p in B). So two sparse maps with disjoint supports smaller
    than k score about k / n, not the overlap of one shared permutation of their zeros. Chance
    (independent maps): `fraction`. Identical maps score 1 unless their k-th value is tied (then
    two independent tie-breaks overlap in expectation only: a map that cannot rank its top k
    does not get credit for it).
    """
    B = a.shape[0]
    a, b = a.reshape(B, -1), b.reshape(B, -1)
    k = _top_k_count(fraction, a.shape[1])
    return _overlap(_top_k_weights(a, k), _top_k_weights(b, k), k).to(a.dtype)


def _overlap(wa: Tensor, wb: Tensor, k: int) -> Tensor:
    return (wa * wb).sum(dim=1) / k


# ---------------------------------------------------------------- the pair of maps

def _as_attribution(t: Tensor, name: str) -> Tensor:
    if t.ndim == 3:
        return t[:, None]
    if t.ndim != 4:
        raise ValueError(f"{name} must be an attribution (B, C, H, W) or a map (B, H, W), got {tuple(t.shape)}")
    return t


def _check_clip(clip: float | None) -> None:
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, Real) or not 0 < clip <= 100):
        raise ValueError(f"clip must be a percentile in (0, 100] (Adebayo et al.: 99) or None, got {clip!r}")


def _percentile(v: Tensor, q: float) -> Tensor:
    """q-th percentile of each row of (B, n), linear interpolation (numpy's default); float64, no size limit."""
    n = v.shape[1]
    pos = q / 100 * (n - 1)
    lo = v.kthvalue(int(pos) + 1, dim=1).values.double()
    hi = v.kthvalue(min(int(pos) + 2, n), dim=1).values.double()
    return lo + (pos - int(pos)) * (hi - lo)


def _maps(e: Tensor, clip: float | None) -> tuple[Tensor, Tensor]:
    """Adebayo et al.'s ABS map sum_c |E_c| and signed map sum_c E_c (B, H, W), clipped as their code does."""
    g, s = e.abs().sum(dim=1), e.sum(dim=1)
    if clip is not None:
        B = e.shape[0]
        top = _percentile(g.reshape(B, -1), clip).to(g.dtype)[:, None, None]
        span = _percentile(s.reshape(B, -1), clip).abs().to(s.dtype)[:, None, None]
        g, s = torch.minimum(g, top), torch.maximum(torch.minimum(s, span), -3 * span)
    return g, s


def _minmax(m: Tensor) -> Tensor:
    """Per-sample min-max normalisation of (B, H, W) maps to [0, 1]; a constant map becomes zeros."""
    low = m.amin(dim=(1, 2), keepdim=True)
    span = m.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (m - low) / torch.where(span > 0, span, 1), 0)


def _constant(m: Tensor) -> Tensor:
    return m.amax(dim=(1, 2)) == m.amin(dim=(1, 2))


def degenerate(a: Tensor, b: Tensor, *, clip: float | None = None, reference: dict | None = None) -> Tensor:
    """1.0 per sample where the pair is degenerate, else 0.0 (B,): the ABS map sum_c |E_c| or the signed map
    sum_c E_c of `a` or of `b` (clipped as in `similarities`) is constant, fewer than 2 distinct values.

    There the rank correlations have no rank order to compare: `similarities` scores them 0 by convention
    (`constant="zero"`, "no structure in common") or NaN, so a method whose maps collapse (an all-zero
    Grad-CAM after ReLU) would "pass" a randomization test without a measurement. A context score: stored
    and reported beside the similarities (the sanity table's "degenerate" verdict), never ranked. `reference`
    as in `similarities` (a's side kept).
    """
    a, b = _as_attribution(a, "a"), _as_attribution(b, "b")
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"a and b must have the same batch and spatial shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    _check_clip(clip)
    memo = {} if reference is None else reference

    def flat(e: Tensor) -> Tensor:                                                  # (B,) bool
        g, s = _maps(e, clip)
        return _constant(g) | _constant(s)

    if ("degenerate", clip) not in memo:
        memo["degenerate", clip] = flat(a)
    return (memo["degenerate", clip] | flat(b)).to(a.dtype)


def similarities(
    a: Tensor,                    # (B, C, H, W) original attribution, or a (B, H, W) map
    b: Tensor,                    # the attribution under the change, same form
    *,
    measures: Sequence[str] = SIMILARITIES,
    absolute: bool = True,
    top_k: float = 0.1,
    constant: Constant = "zero",
    clip: float | None = None,
    ssim_window: Window = "uniform",
    hog_cell: float = 8,
    hog_correlation: Correlation = "pearson",
    reference: dict | None = None,
) -> dict[str, Tensor]:
    """Similarity of two attributions per sample under each measure, all from the same pair.

    spearman: Spearman of the ABS maps sum_c |E_c|; spearman_signed: of the signed maps sum_c E_c
    (Adebayo et al. 2018's pair; `clip`: their percentile clip, e.g. 99, which ties the top 1%).
    ssim, hog and top_k compare the ABS maps (`absolute`, default, as Adebayo's code) or the signed
    ones, min-max normalised to [0, 1] per sample: SSIM with data range 1 and a 7 x 7 uniform or
    (`ssim_window="gaussian"`, Adebayo's) 11 x 11 sigma-1.5 Gaussian window; Pearson or
    (`hog_correlation="spearman"`, Adebayo's) Spearman of HOG features, `hog_cell` px cells (or a
    fraction of the width: Adebayo's 16 px at 299 = 0.0535), 3 x 3 blocks; top-k intersection with
    ties in expectation (`top_k` = fraction of pixels; chance level = `top_k`, see the module).
    A measure whose map is constant in exactly one of a, b scores 0 ("no structure in common";
    `constant="nan"` gives NaN), constant in both NaN; a map with NaN or inf gives NaN. `reference`:
    a dict passed with the same `a` to every call comparing it (MPRT's stages, repeats) keeps a's
    side of each measure.
    """
    a, b = _as_attribution(a, "a"), _as_attribution(b, "b")
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"a and b must have the same batch and spatial shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    unknown = [m for m in measures if m not in SIMILARITIES]
    if unknown or not measures or isinstance(measures, str):
        raise ValueError(f"measures {unknown or measures!r} unknown; choose a list among {list(SIMILARITIES)}")
    if constant not in ("zero", "nan"):
        raise ValueError(f"constant must be 'zero' or 'nan', got {constant!r}")
    if hog_correlation not in ("pearson", "spearman"):
        raise ValueError(f"hog_correlation must be 'pearson' or 'spearman', got {hog_correlation!r}")
    _check_window(ssim_window)
    _check_clip(clip)
    B, _, H, W = a.shape
    k, cell, win = _top_k_count(top_k, H * W), _hog_cell(hog_cell, W), _window_size(ssim_window, 7)
    memo = {} if reference is None else reference
    options = (clip, absolute, top_k, ssim_window, hog_cell, hog_correlation)

    def side(name: str, of: Callable[[Any], Any], sa: Any, sb: Any) -> tuple[Any, Any]:
        """(a's value, kept in memo under the options; b's value)."""
        if (name, options) not in memo:
            memo[name, options] = of(sa)
        return memo[name, options], of(sb)

    (ga, sa), (gb, sb) = side("maps", lambda e: _maps(e, clip), a, b)
    ma, mb = (ga, gb) if absolute else (sa, sb)                                     # ssim / hog / top_k's maps
    na, nb = side("minmax", _minmax, ma, mb)
    rank = lambda t: _average_rank(t.reshape(B, -1))                                 # noqa: E731

    def ssim_() -> Tensor:
        if win > min(H, W):
            return torch.full((B,), torch.nan, dtype=torch.float64, device=a.device)
        return _ssim(*side("ssim", lambda t: _ssim_side(t, ssim_window, win), na, nb), ssim_window, win, 1.0)

    fns = {
        "spearman": lambda: _pearson(*side("rank_abs", rank, ga, gb)),
        "spearman_signed": lambda: _pearson(*side("rank", rank, sa, sb)),
        "ssim": ssim_,
        "hog": lambda: _correlation(*side("hog", lambda t: hog(t, cell=cell), na, nb), hog_correlation),
        "top_k": lambda: _overlap(*side("top_k", lambda t: _top_k_weights(t.reshape(B, -1), k), na, nb), k),
    }
    const = {"abs": side("constant_abs", _constant, ga, gb), "signed": side("constant_signed", _constant, sa, sb)}
    finite = side("finite", lambda e: torch.isfinite(e).flatten(1).all(dim=1), a, b)
    nonnegative = a.numel() > 0 and bool(a.amin() >= 0) and bool(b.amin() >= 0)    # then signed = ABS, clipped too
    raw: dict[str, Tensor] = {}
    out = {}
    for m in measures:
        source = "spearman" if m == "spearman_signed" and nonnegative else m        # E >= 0: signed map = ABS map
        if source not in raw:
            raw[source] = fns[source]()
        ca, cb = const["signed" if m == "spearman_signed" or (m != "spearman" and not absolute) else "abs"]
        one = (ca ^ cb) if constant == "zero" else torch.zeros_like(ca)
        undefined = ((ca & cb) if constant == "zero" else (ca | cb)) | ~(finite[0] & finite[1])
        out[m] = torch.where(undefined, torch.nan, torch.where(one, 0.0, raw[source])).to(a.dtype)
    return out

