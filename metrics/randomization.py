"""Randomization sanity checks: a map that explains the model must change when the model does.

Every test here recomputes the method's map under a change that should matter (weights,
class, labels) or should not (a compensated input shift) and compares it with the original
map by the same similarity measures (`similarities`): Spearman of absolute and of signed
maps, SSIM, HOG similarity and top-k intersection, all from one pair of maps, batched.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metrics._chunk import chunked
from metrics._map import Reduce, to_map
from metrics._result import Curve, MetricResult

__all__ = ["mprt", "mprt_stages", "emprt", "smprt", "random_logit", "data_randomization", "input_invariance",
           "randomization_layers", "similarities", "spearman", "ssim", "hog", "hog_similarity",
           "top_k_overlap", "SIMILARITIES"]

Method = Callable[[nn.Module, Tensor, Tensor], Tensor]          # (model, x, target) -> (B, C, H, W)
Measure = Literal["spearman", "spearman_signed", "ssim", "hog", "top_k"]
SIMILARITIES: tuple[str, ...] = ("spearman", "spearman_signed", "ssim", "hog", "top_k")
Order = Literal["cascading_top_down", "cascading_bottom_up", "independent", "cascading"]
Constant = Literal["zero", "nan"]


# ---------------------------------------------------------------- similarity measures, (B, H, W) -> (B,)

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


def ssim(a: Tensor, b: Tensor, *, win_size: int = 7, data_range: float = 1.0) -> Tensor:
    """Mean structural similarity (Wang et al. 2004) of (B, H, W) maps, as skimage's defaults.

    Local means, variances (sample, n/(n-1)) and covariance over every win_size x win_size
    window that fits inside the map (uniform weights), C1 = (0.01 R)^2, C2 = (0.03 R)^2 with
    R = data_range; SSIM = mean over windows of (2 ma mb + C1)(2 sab + C2) /
    ((ma^2 + mb^2 + C1)(sa^2 + sb^2 + C2)). Maps smaller than one window: NaN.
    """
    B, H, W = a.shape
    if win_size < 2 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd integer >= 3, got {win_size}")
    if win_size > min(H, W):
        return torch.full((B,), torch.nan, dtype=a.dtype, device=a.device)
    return _ssim(_ssim_side(a, win_size), _ssim_side(b, win_size), win_size, data_range).to(a.dtype)


def _ssim_side(t: Tensor, win_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """One map's share of SSIM: the map (B, 1, H, W) in float64, its local means and local means of squares."""
    t = t.double()[:, None]
    return t, F.avg_pool2d(t, win_size, stride=1), F.avg_pool2d(t * t, win_size, stride=1)


def _ssim(sa: tuple[Tensor, Tensor, Tensor], sb: tuple[Tensor, Tensor, Tensor], win_size: int,
          data_range: float) -> Tensor:
    a, ma, aa = sa
    b, mb, bb = sb
    cov = win_size ** 2 / (win_size ** 2 - 1)
    va, vb = cov * (aa - ma ** 2), cov * (bb - mb ** 2)
    vab = cov * (F.avg_pool2d(a * b, win_size, stride=1) - ma * mb)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ma * mb + c1) * (2 * vab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    return s.mean(dim=(1, 2, 3))


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
    magnitude = torch.hypot(g_row, g_col)                                        # (B, H, W)
    angle = torch.rad2deg(torch.atan2(g_row, g_col)) % 180
    bin_ = (angle / (180 / orientations)).floor().long().clamp(max=orientations - 1)
    votes = F.one_hot(bin_, orientations).permute(0, 3, 1, 2) * magnitude[:, None]   # (B, O, H, W)
    hist = F.avg_pool2d(votes[:, :, :rows * cell, :cols * cell], cell)          # (B, O, rows, cols)
    blocks = F.unfold(hist, block)                                               # (B, O*block*block, L)
    eps2 = 1e-10
    blocks = blocks / (blocks.square().sum(dim=1, keepdim=True) + eps2).sqrt()
    blocks = blocks.clamp(max=0.2)
    blocks = blocks / (blocks.square().sum(dim=1, keepdim=True) + eps2).sqrt()
    n_r, n_c = rows - block + 1, cols - block + 1
    out = blocks.view(B, orientations, block, block, n_r, n_c).permute(0, 4, 5, 2, 3, 1)
    return out.reshape(B, -1)


def hog_similarity(a: Tensor, b: Tensor, *, orientations: int = 9, cell: int = 8, block: int = 3) -> Tensor:
    """Pearson correlation of the `hog` features of two (B, H, W) maps; NaN if either has none or is flat."""
    return _feature_correlation(hog(a, orientations=orientations, cell=cell, block=block),
                                hog(b, orientations=orientations, cell=cell, block=block)).to(a.dtype)


def _feature_correlation(fa: Tensor, fb: Tensor) -> Tensor:
    """Pearson per row of (B, n) features; NaN where there are none."""
    return torch.full((fa.shape[0],), torch.nan, dtype=fa.dtype, device=fa.device) if fa.shape[1] == 0 \
        else _pearson(fa, fb)


def _top_mask(v: Tensor, k: int, seed: int) -> Tensor:
    """(B, n) bool: the k largest entries per row, ties broken by a seeded permutation shared by all maps."""
    B, n = v.shape
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(v.device)
    top = perm[v[:, perm].argsort(dim=1, descending=True, stable=True)[:, :k]]   # (B, k) original positions
    return torch.zeros_like(v, dtype=torch.bool).scatter_(1, top, True)


def top_k_overlap(a: Tensor, b: Tensor, *, fraction: float = 0.1, seed: int = 0) -> Tensor:
    """|top_k(a) & top_k(b)| / k per row (Ghorbani et al. 2019), k = max(1, round(fraction * n)).

    Ties are decided by one seeded random permutation of the positions, the same for both maps.
    """
    B = a.shape[0]
    a, b = a.reshape(B, -1), b.reshape(B, -1)
    k = _top_k_count(fraction, a.shape[1])
    return _overlap(_top_mask(a, k, seed), _top_mask(b, k, seed), k, a.dtype)


def _top_k_count(fraction: float, n: int) -> int:
    """k = max(1, round(fraction * n)) after checking that fraction lies in (0, 1]."""
    if not 0 < fraction <= 1:
        raise ValueError(f"top_k fraction must be in (0, 1], got {fraction}")
    return max(1, round(fraction * n))


def _overlap(top_a: Tensor, top_b: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """|top_a & top_b| / k per row of (B, n) bool masks."""
    return (top_a & top_b).sum(dim=1).to(dtype) / k


def _minmax(m: Tensor) -> Tensor:
    """Per-sample min-max normalisation of (B, H, W) maps to [0, 1]; a constant map becomes zeros."""
    low = m.amin(dim=(1, 2), keepdim=True)
    span = m.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (m - low) / torch.where(span > 0, span, 1), 0)


def similarities(
    a: Tensor,                    # (B, H, W) original map
    b: Tensor,                    # (B, H, W) map under the change
    *,
    measures: Sequence[str] = SIMILARITIES,
    absolute: bool = True,
    top_k: float = 0.1,
    constant: Constant = "zero",
    seed: int = 0,
    reference: dict | None = None,
) -> dict[str, Tensor]:
    """Similarity of two maps per sample under each measure, all from the same pair of maps.

    spearman: Spearman of |a| and |b| (Adebayo et al. 2018's main measure); spearman_signed:
    of a and b. ssim, hog and top_k compare |a|, |b| (`absolute`, default) or the signed maps,
    first min-max normalised to [0, 1] per sample (as the paper does for SSIM): SSIM with a
    7x7 window, Pearson of HOG features (8x8 cells, 3x3 blocks), top-k intersection
    (`top_k` = fraction of pixels). Constant maps carry no structure and leave every measure
    undefined: where exactly one of a, b is constant every measure scores 0 ("no structure in
    common"; `constant="nan"` gives NaN instead), where both are, NaN. Nothing is dropped:
    NaN stays NaN and is counted by the report. `reference`: a dict passed with the same `a` to
    every call that compares it with other maps (MPRT's stages); a's side of each measure (its
    ranks, local means, HOG features, top-k set) is computed on the first call and kept there.
    """
    if a.ndim != 3 or a.shape != b.shape:
        raise ValueError(f"maps must both have shape (B, H, W), got {tuple(a.shape)} and {tuple(b.shape)}")
    unknown = [m for m in measures if m not in SIMILARITIES]
    if unknown or not measures:
        raise ValueError(f"measures {unknown or list(measures)} unknown; choose among {list(SIMILARITIES)}")
    if constant not in ("zero", "nan"):
        raise ValueError(f"constant must be 'zero' or 'nan', got {constant!r}")
    B, H, W = a.shape
    k = _top_k_count(top_k, H * W)
    memo = {} if reference is None else reference

    def side(name: str, of_a: Callable[[], Tensor], of_b: Callable[[], Tensor]) -> tuple[Any, Any]:
        """(a's value, kept in memo under the options it depends on; b's value)."""
        key = (name, absolute, top_k, seed)
        if key not in memo:
            memo[key] = of_a()
        return memo[key], of_b()

    ca, cb = side("constant", lambda: a.amax(dim=(1, 2)) == a.amin(dim=(1, 2)),
                  lambda: b.amax(dim=(1, 2)) == b.amin(dim=(1, 2)))                  # (B,) constant map
    na, nb = side("minmax", lambda: _minmax(a.abs() if absolute else a), lambda: _minmax(b.abs() if absolute else b))
    rank = lambda t: _average_rank(t.reshape(B, -1))                                 # noqa: E731
    top = lambda t: _top_mask(t.reshape(B, -1), k, seed)                             # noqa: E731

    def ssim_() -> Tensor:                                                           # 7x7 windows, data range 1
        if min(H, W) < 7:
            return torch.full((B,), torch.nan, dtype=torch.float64, device=a.device)
        return _ssim(*side("ssim", lambda: _ssim_side(na, 7), lambda: _ssim_side(nb, 7)), 7, 1.0)

    fns = {
        "spearman": lambda: _pearson(*side("rank_abs", lambda: rank(a.abs()), lambda: rank(b.abs()))),
        "spearman_signed": lambda: _pearson(*side("rank", lambda: rank(a), lambda: rank(b))),
        "ssim": ssim_,
        "hog": lambda: _feature_correlation(*side("hog", lambda: hog(na), lambda: hog(nb))),
        "top_k": lambda: _overlap(*side("top_k", lambda: top(na), lambda: top(nb)), k, a.dtype),
    }
    one = (ca ^ cb) if constant == "zero" else torch.zeros_like(ca)
    undefined = (ca & cb) if constant == "zero" else (ca | cb)
    nonnegative = a.numel() > 0 and bool(a.amin() >= 0) and bool(b.amin() >= 0)
    raw: dict[str, Tensor] = {}
    for m in measures:
        source = "spearman" if m == "spearman_signed" and nonnegative else m   # |a| = a: one Spearman for both
        if source not in raw:
            raw[source] = fns[source]()
        raw[m] = raw[source]
    return {m: torch.where(undefined, torch.nan, torch.where(one, 0.0, raw[m])).to(a.dtype) for m in measures}


# ---------------------------------------------------------------- model parameter randomization

def randomization_layers(model: nn.Module) -> list[str]:
    """Names of the layers MPRT randomizes, from input to output.

    A model may declare them as `mprt_layers` (e.g. one entry per residual block);
    otherwise every module that owns parameters directly, in registration order.
    """
    declared = getattr(model, "mprt_layers", None)
    if declared is not None:
        return list(declared)
    return [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def _randomize(layer: nn.Module, seed: int, init: Literal["default", "normal"], std: float) -> None:
    """Re-draw a layer's parameters (default initialisation, or N(0, std^2)) without touching the global RNG."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for m in layer.modules():
            if init == "default" and hasattr(m, "reset_parameters"):
                m.reset_parameters()                          # batch norm: also its running statistics
            elif init == "normal":
                for p in m.parameters(recurse=False):
                    p.normal_(0.0, std)


def _stages(model: nn.Module, layers: Sequence[str] | None, exclude: Sequence[str],
            order: str) -> list[tuple[int, str]]:
    """(input-to-output index, name) of each layer in the order the stages randomize them."""
    names = [n for n in (list(layers) if layers is not None else randomization_layers(model)) if n not in exclude]
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing or not names:
        raise ValueError(f"layers {missing or names} are not modules of {type(model).__name__}; "
                         f"choose among {[n for n in modules if n]}")
    if order not in ("cascading_top_down", "cascading_bottom_up", "independent", "cascading"):
        raise ValueError("order must be 'cascading_top_down' (alias 'cascading'), 'cascading_bottom_up' "
                         f"or 'independent', got {order!r}")
    indexed = list(enumerate(names))
    return indexed if order == "cascading_bottom_up" else indexed[::-1]


def _original_map(model: nn.Module, x: Tensor, target: Tensor, method: Method, attribution: Tensor | None,
                  reduce: Reduce) -> Tensor:
    B, C, H, W = x.shape
    original = to_map(method(model, x, target), reduce) if attribution is None else attribution
    if original.shape != (B, H, W):
        raise ValueError(f"attribution must have shape {(B, H, W)}, got {tuple(original.shape)}")
    return original


def _result(per_stage: list[dict[str, Tensor]], labels: Sequence[str], x: Tensor,
            higher_is_better: bool = False) -> MetricResult:
    """Scores `<measure>@<label>` per stage and `<measure>` for the last stage; one curve per measure."""
    scores, curves = {}, {}
    for m in per_stage[0]:
        for label, stage in zip(labels, per_stage):
            scores[f"{m}@{label}"] = stage[m]
        scores[m] = per_stage[-1][m]
        y = torch.stack([stage[m] for stage in per_stage], dim=1)                     # (B, L)
        curves[m] = Curve(torch.arange(1, len(labels) + 1, device=x.device, dtype=x.dtype), y, tuple(labels))
    return MetricResult(scores=scores, curves=curves, higher_is_better={s: higher_is_better for s in scores})


def mprt(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W)
    target: Tensor,               # (B,)
    method: Method,
    *,
    attribution: Tensor | None = None,   # (B, H, W) map of the unchanged model, recomputed if None
    reduce: Reduce = "sum",
    order: Order = "cascading_top_down",
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    seed: int = 0,
    layer_seed: Literal["offset", "shared"] = "offset",
    init: Literal["default", "normal"] = "default",
    init_std: float = 0.01,
    measures: Sequence[str] = SIMILARITIES,
    absolute: bool = True,
    top_k: float = 0.1,
    constant: Constant = "zero",
) -> MetricResult:
    """Model parameter randomization test (Adebayo et al. 2018).

    Layers (`layers`, default `randomization_layers`, minus `exclude`) are re-drawn from their
    default initialisation (or N(0, init_std^2)): layer i, counted from the input, from seed + i
    (`layer_seed="shared"`: every layer from `seed`, as Quantus 0.6 does with seed + 1).
    `cascading_top_down` (alias `cascading`) randomizes from the output layer towards the input,
    keeping earlier stages; `cascading_bottom_up` from the input; `independent` one layer at a
    time (output first). After each stage the map is recomputed and compared with the original
    by `similarities` (conventions and constant maps there). Scores: `<measure>@<layer>` per
    stage, `<measure>` after the last stage (full randomization in cascading orders; the input
    layer alone for `independent`); one curve per measure over stages. Lower is better.
    `model` is never modified, nor the global RNG. Cost: one method call per layer.
    """
    stages = mprt_stages(model, order=order, layers=layers, exclude=exclude, seed=seed, layer_seed=layer_seed,
                         init=init, init_std=init_std)                      # arguments checked before any map
    original = _original_map(model, x, target, method, attribution, reduce)
    names, per_stage, reference = [], [], {}                                       # original's side, kept
    for name, randomized in stages:
        stage_map = to_map(method(randomized, x, target), reduce)                     # (B, H, W)
        names.append(name)
        per_stage.append(similarities(original, stage_map, measures=measures, absolute=absolute,
                                      top_k=top_k, constant=constant, seed=seed, reference=reference))
    return _result(per_stage, names, x)


def mprt_stages(
    model: nn.Module,
    *,
    order: Order = "cascading_top_down",
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    seed: int = 0,
    layer_seed: Literal["offset", "shared"] = "offset",
    init: Literal["default", "normal"] = "default",
    init_std: float = 0.01,
) -> Iterator[tuple[str, nn.Module]]:
    """The randomized models of `mprt`'s stages, in its order and with its seeds: yields (layer, model).

    Same arguments and conventions as `mprt`: one deep copy of `model` is changed stage by
    stage (`independent`: the layer is restored when the next stage is asked for), so code
    that recomputes maps at each yield sees exactly the models `mprt` compares (the report's
    MPRT grid of maps does). `model` is never modified, nor the global RNG.
    """
    stages = _stages(model, layers, exclude, order)                  # arguments checked now, not at first next()
    if layer_seed not in ("offset", "shared") or init not in ("default", "normal"):
        raise ValueError(f"layer_seed must be 'offset' or 'shared' and init 'default' or 'normal', "
                         f"got {layer_seed!r} and {init!r}")

    def stage_models() -> Iterator[tuple[str, nn.Module]]:
        randomized = copy.deepcopy(model)
        modules = dict(randomized.named_modules())
        for i, name in stages:
            saved = {k: v.clone() for k, v in modules[name].state_dict().items()} if order == "independent" else None
            _randomize(modules[name], seed + i if layer_seed == "offset" else seed, init, init_std)
            yield name, randomized
            if saved is not None:
                modules[name].load_state_dict(saved)
    return stage_models()


def _fully_randomized(model: nn.Module, layers: Sequence[str] | None, exclude: Sequence[str], seed: int) -> nn.Module:
    """A copy of `model` with every MPRT layer re-drawn as at mprt's last cascading stage."""
    *_, (_, randomized) = mprt_stages(model, order="cascading_bottom_up", layers=layers, exclude=exclude, seed=seed)
    return randomized


def _entropy(m: Tensor, bins: int) -> Tensor:
    """Discrete entropy (nats) of the histogram of each (B, ...) map, `bins` equal bins over its own range."""
    B = m.shape[0]
    v = m.reshape(B, -1).double()
    low, high = v.amin(dim=1, keepdim=True), v.amax(dim=1, keepdim=True)
    span = torch.where(high > low, high - low, 1.0)
    idx = ((v - low) / span * bins).floor().long().clamp(0, bins - 1)              # constant map: all in bin 0
    counts = torch.zeros(B, bins, dtype=torch.float64, device=m.device).scatter_add_(1, idx, torch.ones_like(v))
    p = counts / v.shape[1]
    return -(p * p.clamp(min=1e-300).log()).sum(dim=1)


def emprt(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W)
    target: Tensor,               # (B,)
    method: Method,
    *,
    attribution: Tensor | None = None,
    reduce: Reduce = "sum",
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    seed: int = 0,
    bins: int = 100,
    absolute: bool = False,
) -> MetricResult:
    """Efficient MPRT (Hedström et al. 2023): relative rise in map complexity after full randomization.

    emprt = (H(e_rand) - H(e)) / H(e), H = discrete entropy (nats) of the histogram of the map's
    values in `bins` equal bins over its own range (Quantus' default complexity; its map is
    not made absolute by default, nor here), e_rand = the map on the model with every layer
    randomized as at mprt's last stage (same seeds). A map that explains the model turns to
    noise: higher is better. A constant original map has H = 0 and scores NaN; a constant
    randomized map scores -1. One method call, whatever the number of layers.
    """
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    original = _original_map(model, x, target, method, attribution, reduce)
    randomized = to_map(method(_fully_randomized(model, layers, exclude, seed), x, target), reduce)
    h0 = _entropy(original.abs() if absolute else original, bins)
    h1 = _entropy(randomized.abs() if absolute else randomized, bins)
    rise = torch.where(h0 > 0, (h1 - h0) / h0.clamp(min=1e-300), torch.nan)
    return MetricResult(scores={"emprt": rise.to(x.dtype)}, higher_is_better={"emprt": True})


def _smoothed(method: Method, *, samples: int, noise: float, seed: int, chunk_size: int) -> Method:
    """`method` averaged over `samples` noisy copies of x, N(0, (noise * (max - min of each x))^2), fixed noise."""
    def smooth(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        B = x.shape[0]
        g = torch.Generator(device=x.device).manual_seed(seed)
        std = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))                  # (B,)
        eps = torch.randn((samples, *x.shape), generator=g, device=x.device, dtype=x.dtype) * std[:, None, None, None]

        def attribute(i: Tensor) -> Tensor:                                           # i: (N,) into (S*B)
            s, b = i.div(B, rounding_mode="floor"), i % B
            return method(model, x[b] + eps[s, b], target[b])
        out = chunked(attribute, samples * B, chunk_size, device=x.device)            # (S*B, C, H, W)
        return out.view(samples, *x.shape).mean(dim=0)
    return smooth


def smprt(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W)
    target: Tensor,               # (B,)
    method: Method,
    *,
    reduce: Reduce = "sum",
    order: Order = "cascading_bottom_up",
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    seed: int = 0,
    samples: int = 16,
    noise: float = 0.1,
    measures: Sequence[str] = SIMILARITIES,
    absolute: bool = True,
    top_k: float = 0.1,
    constant: Constant = "zero",
    chunk_size: int = 256,
) -> MetricResult:
    """Smooth MPRT (Hedström et al. 2023): MPRT on maps denoised by averaging over noisy inputs.

    Every map, of the original and of each randomized model, is the mean attribution over
    `samples` copies x + N(0, sigma^2), sigma = noise * (max(x) - min(x)) per sample (Quantus'
    convention; it uses 50 copies), the same noise draws (from `seed`) for every model, then
    reduced to a map; stages, scores and measures as `mprt` (default order bottom-up, as the
    paper recommends). Lower is better. Cost: samples x (layers + 1) method calls, in chunks
    of `chunk_size` inputs.
    """
    if samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples}")
    smooth = _smoothed(method, samples=samples, noise=noise, seed=seed, chunk_size=chunk_size)
    return mprt(model, x, target, smooth, reduce=reduce, order=order, layers=layers, exclude=exclude, seed=seed,
                measures=measures, absolute=absolute, top_k=top_k, constant=constant)


# ---------------------------------------------------------------- class, data and input checks

def random_logit(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W)
    target: Tensor,               # (B,)
    method: Method,
    *,
    attribution: Tensor | None = None,
    reduce: Reduce = "sum",
    seed: int = 0,
    measures: Sequence[str] = SIMILARITIES,
    absolute: bool = True,
    top_k: float = 0.1,
    constant: Constant = "zero",
) -> MetricResult:
    """Random logit test (Sixt et al. 2020): the map for another class should differ.

    The other class is target + u mod K, u uniform in 1..K-1 (K = the model's outputs), drawn
    per sample in batch order from a generator seeded with `seed`; the map for it is compared
    with the map for the target by `similarities`. Scores: one per measure, lower is better.
    A map that ignores the class (edge, random) scores 1. One extra method call.
    """
    original = _original_map(model, x, target, method, attribution, reduce)
    with torch.inference_mode():
        K = model(x[:1]).shape[1]
    if K < 2:
        raise ValueError(f"random_logit needs a model with at least 2 outputs, got {K}")
    g = torch.Generator().manual_seed(seed)
    other = (target + torch.randint(1, K, target.shape, generator=g).to(target.device)) % K
    other_map = to_map(method(model, x, other), reduce)
    scores = similarities(original, other_map, measures=measures, absolute=absolute, top_k=top_k,
                          constant=constant, seed=seed)
    return MetricResult(scores=scores, higher_is_better={s: False for s in scores})


def data_randomization(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W)
    target: Tensor,               # (B,)
    method: Method,
    label_randomized_model: nn.Module,
    *,
    attribution: Tensor | None = None,
    reduce: Reduce = "sum",
    measures: Sequence[str] = SIMILARITIES,
    absolute: bool = True,
    top_k: float = 0.1,
    constant: Constant = "zero",
    seed: int = 0,
    retrain: Mapping[str, Any] | None = None,
) -> MetricResult:
    """Data randomization test (Adebayo et al. 2018): the model trained on permuted labels.

    `label_randomized_model` has the same architecture, trained on the same images with their
    labels permuted (it can only memorise); the runner loads it from the zoo with train option
    `permute_labels: true` and the overrides of the model's `train` config in `retrain` (e.g.
    fewer images, more epochs, so that it memorises them). `retrain` is read by the runner only;
    being part of the metric's config, it is part of the cell key. Its map for the same target
    class is compared with the original map by `similarities`. Scores: one per measure, lower
    is better (maps that depend on what the model learnt from the labels must change).
    """
    if retrain is not None and not isinstance(retrain, Mapping):
        raise ValueError(f"retrain must be a mapping of train-config overrides (e.g. {{'epochs': 40}}), got {retrain!r}")
    original = _original_map(model, x, target, method, attribution, reduce)
    other = to_map(method(label_randomized_model, x, target), reduce)
    scores = similarities(original, other, measures=measures, absolute=absolute, top_k=top_k,
                          constant=constant, seed=seed)
    return MetricResult(scores=scores, higher_is_better={s: False for s in scores})


def _first_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())
              and any(True for _ in m.parameters(recurse=False))]
    modules = dict(model.named_modules())
    name, module = (layer, modules.get(layer)) if layer is not None else (leaves or [(None, None)])[0]
    if not isinstance(module, (nn.Conv2d, nn.Linear)) or (isinstance(module, nn.Conv2d) and module.padding_mode != "zeros"):
        raise ValueError(f"input_invariance needs `layer` to name the first layer, a Linear or zero-padded Conv2d "
                         f"that reads the input; got {name!r} ({type(module).__name__}) in {type(model).__name__}")
    return name, module


def input_invariance(
    model: nn.Module,
    x: Tensor,                    # (B, C, H, W)
    target: Tensor,               # (B,)
    method: Method,
    *,
    attribution: Tensor | None = None,
    reduce: Reduce = "sum",
    shift: float = 1.0,
    layer: str | None = None,
    measures: Sequence[str] = SIMILARITIES,
    absolute: bool = True,
    top_k: float = 0.1,
    constant: Constant = "zero",
    seed: int = 0,
) -> MetricResult:
    """Input invariance (Kindermans et al. 2017): a compensated constant input shift must not change the map.

    The input becomes x + shift; a copy of the model subtracts, right after its first layer
    (`layer`, default the first parameterised leaf module, a Linear or zero-padded Conv2d), the
    layer's bias-free response to the constant image `shift` (a spatial bias map for a padded
    convolution), so the copy computes exactly model(x) on x + shift. The map on (copy, x + shift)
    is compared with the original by `similarities` and by rel_l1 = sum |a' - a| / sum |a|
    (0 when invariant; NaN for an all-zero map). Higher similarity is better, rel_l1 lower.
    """
    name, _ = _first_layer(model, layer)
    original = _original_map(model, x, target, method, attribution, reduce)
    shifted = copy.deepcopy(model)
    first = dict(shifted.named_modules())[name]
    with torch.no_grad():
        if isinstance(first, nn.Conv2d):
            offset = first._conv_forward(torch.full_like(x[:1], shift), first.weight, None)   # (1, C', h, w)
        else:
            offset = shift * first.weight.sum(dim=1)                                      # (C',)
    first.register_forward_hook(lambda _m, _i, out: out - offset)                        # the copy is discarded
    other = to_map(method(shifted, x + shift, target), reduce)
    scores = similarities(original, other, measures=measures, absolute=absolute, top_k=top_k,
                          constant=constant, seed=seed)
    B = x.shape[0]
    norm = original.reshape(B, -1).abs().sum(dim=1)
    diff = (other - original).reshape(B, -1).abs().sum(dim=1)
    scores["rel_l1"] = torch.where(norm > 0, diff / norm.clamp(min=torch.finfo(x.dtype).tiny), torch.nan)
    return MetricResult(scores=scores, higher_is_better={s: s != "rel_l1" for s in scores})
