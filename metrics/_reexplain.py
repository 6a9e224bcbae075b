"""Machinery of the robustness metrics: checks, seeded perturbations, and one chunked loop that
re-explains every (sample, perturbation) pair and reduces it to a per-pair statistic on the spot."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor, nn

from metrics.checks import check_choice, check_classes, check_finite, check_float, check_int, check_target
from metrics.baselines import baseline_fill
from metrics.batching import chunked

Method = Callable[[nn.Module, Tensor, Tensor], Tensor]          # (model, x, target) -> (B, C, H, W)
Noise = Literal["uniform", "gaussian"]
Changed = Literal["keep", "drop"]
Perturb = Callable[[Tensor, Tensor], Tensor]                    # (b, s) flat indices (N,) -> x' (N, C, H, W)
# (b, x', Phi(x'), f(x'), (L(x'), L(x)) or None) -> (N,) statistic of each pair
Stat = Callable[[Tensor, Tensor, Tensor, Tensor, "tuple[Tensor, Tensor] | None"], Tensor]


def original(model: nn.Module, x: Tensor, target: Tensor, method: Method, attribution: Tensor | None,
             changed: str = "keep") -> Tensor:
    """Checks shared by the re-explaining metrics; Phi(x), the given raw attribution or the method's."""
    if not isinstance(x, Tensor) or x.ndim != 4 or len(x) == 0:
        raise ValueError(f"x must be a non-empty batch of shape (B, C, H, W), got {tuple(getattr(x, 'shape', ()))}")
    B, _, H, W = x.shape
    check_target(target, B)
    check_finite("x", x, "perturbed copies of a non-finite input cannot be explained")
    if not callable(method):
        raise ValueError(f"method must be an attribution method (model, x, target) -> (B, C, H, W), got {method!r}")
    check_choice("changed", changed, ("keep", "drop"))
    if attribution is None:
        attribution = method(model, x.detach(), target)
    if not isinstance(attribution, Tensor) or attribution.ndim != 4 or attribution.shape[0] != B \
            or attribution.shape[2:] != (H, W):
        raise ValueError(f"attribution must be the method's raw attribution (B, C, H, W) = ({B}, C, {H}, {W}) (these "
                         f"metrics consume 'raw'), or None to recompute it; got {tuple(getattr(attribution, 'shape', ()))}")
    return attribution.detach()


def noise_field(x: Tensor, samples: int, radius: float, noise: str, seed: int) -> Tensor:
    """`samples` seeded fields (S, C, H, W), shared by all samples: U[-radius, radius] or N(0, radius^2)."""
    S = check_int("samples", samples, 1, meaning=" (perturbed copies per input)")
    r = check_float("radius", radius, 0, low_open=True, meaning=" (the perturbation's size in the model's input space)")
    check_choice("noise", noise, ("uniform", "gaussian"))
    g = torch.Generator().manual_seed(check_int("seed", seed, 0))
    shape = (S, *x.shape[1:])
    field = (2 * torch.rand(shape, generator=g, dtype=x.dtype) - 1) if noise == "uniform" \
        else torch.randn(shape, generator=g, dtype=x.dtype)
    return (r * field).to(x.device)


def shifted(x: Tensor, shifts: Tensor, baseline: float | str) -> Perturb:
    """x' = x translated right by shifts[s] pixels (left if negative), uncovered columns = baseline."""
    if baseline != "image_min" and (isinstance(baseline, bool) or not isinstance(baseline, (int, float))):
        raise ValueError(f"baseline must be 'image_min' (each image's minimum, Quantus' 'black') or a number in "
                         f"the model's input space, got {baseline!r}")
    fill = baseline_fill(x, baseline)                                              # (B, 1, 1, 1) or a scalar
    W = x.shape[-1]
    cols = torch.arange(W, device=x.device)

    def move(b: Tensor, s: Tensor) -> Tensor:
        src = cols[None] - shifts[s][:, None]                                      # (N, W) source column
        inside = ((src >= 0) & (src < W))[:, None, None, :]                        # (N, 1, 1, W)
        xb = x[b].gather(3, src.clamp(0, W - 1)[:, None, None, :].expand(-1, *x.shape[1:3], -1))
        return torch.where(inside, xb, fill[b] if fill.ndim == 4 else fill)
    return move


def relative(orig: Tensor, other: Tensor, eps: float) -> Tensor:
    """Elementwise (orig - other) / orig, exact zeros of orig replaced by eps (Agarwal et al.'s percent change)."""
    return (orig - other) / torch.where(orig == 0, torch.full_like(orig, eps), orig)


@contextmanager
def _recorded(model: nn.Module, layers: list[str] | None, x: Tensor, found: dict) -> Iterator[None]:
    """Inside the block, keep the output of the first forward pass of `model` on x's very memory (x or a view of it) (and the
    flattened outputs of `layers` during it, concatenated) in `found`; all hooks are removed on exit."""
    modules = dict(model.named_modules())
    missing = [n for n in layers or () if n not in modules]
    if missing:
        raise ValueError(f"layers {missing} are not modules of {type(model).__name__}; choose among "
                         f"{[n for n in modules if n]}")
    current: list[Tensor] = []

    def same(args: tuple) -> bool:                      # x itself or a view of exactly its memory (x.detach())
        t = args[0] if args else None
        return isinstance(t, Tensor) and t.data_ptr() == x.data_ptr() and t.shape == x.shape \
            and t.stride() == x.stride() and t.dtype == x.dtype and t.device == x.device

    def start(module: nn.Module, args: tuple) -> None:
        if same(args):
            current.clear()

    def finish(module: nn.Module, args: tuple, out: Tensor) -> None:
        if "out" not in found and same(args):
            found["out"] = out.detach()
            found["rep"] = torch.cat([c.detach() for c in current], dim=1) if layers else None

    hooks = [modules[n].register_forward_hook(lambda m, i, o: current.append(o.flatten(1))) for n in layers or ()]
    hooks += [model.register_forward_pre_hook(start), model.register_forward_hook(finish)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _forward(model: nn.Module, x: Tensor, layers: list[str] | None, found: dict | None = None) -> tuple[Tensor, Tensor | None]:
    """Logits (N, K) and, with `layers`, the concatenated hidden representation (N, D) of x: those `found`
    during the method's own forward pass on x where there was one, else from a forward pass here."""
    found = {} if found is None else found
    if "out" not in found:
        with torch.no_grad(), _recorded(model, layers, x, found):
            model(x)
    return found["out"], found["rep"]


def explain_perturbed(model: nn.Module, x: Tensor, target: Tensor, method: Method, perturb: Perturb, stat: Stat,
                      S: int, chunk_size: int | None, *, layers: list[str] | None = None) -> tuple[Tensor, Tensor]:
    """stat of every (sample b, perturbation s), (B, S), and whether x' changed the predicted class, (B, S).

    All B S perturbed inputs go through the method in chunks of `chunk_size`: one call per chunk. f(x') (and
    L(x')) are read from the method's own forward pass on x' when it makes one (saliency, gradient x input:
    a third less work), else computed by one more forward pass."""
    target = check_target(target, len(x))
    out0, rep0 = _forward(model, x, layers)
    check_classes(target, out0.shape[1])
    pred = out0.argmax(dim=1)

    def fn(i: Tensor) -> Tensor:                                                   # i: flat into (B, S)
        b, s = i.div(S, rounding_mode="floor"), i % S
        xp = perturb(b, s)                                                         # (N, C, H, W)
        found: dict = {}
        with _recorded(model, layers, xp, found):                                  # reuse the method's forward pass
            ap = method(model, xp, target[b]).detach()                             # (N, C', H, W)
        out, rep = _forward(model, xp, layers, found)
        value = stat(b, xp.detach(), ap, out, None if rep is None else (rep, rep0))
        return torch.stack([value.to(x.dtype), (out.argmax(dim=1) != pred[b]).to(x.dtype)], dim=1)

    y = chunked(fn, len(x) * S, chunk_size, device=x.device, like=x).view(len(x), S, 2)
    return y[..., 0], y[..., 1] > 0


def reduce_draws(ratio: Tensor, changed: Tensor, how: str, rule: str) -> Tensor:
    """Max or mean over draws (B, S) -> (B,); with rule "drop" over the unchanged draws only (NaN if none)."""
    keep = ~changed if rule == "drop" else torch.ones_like(changed)
    n = keep.sum(dim=1)
    if how == "max":
        v = ratio.masked_fill(~keep, -torch.inf).amax(dim=1)
    else:
        v = ratio.masked_fill(~keep, 0).sum(dim=1) / n.clamp_min(1)
    return torch.where(n > 0, v, torch.nan)                                        # NaN ratios propagate
