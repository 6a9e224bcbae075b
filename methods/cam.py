"""Class activation maps: Grad-CAM and its successors, on a layer found automatically or named.

Every map is computed at the layer's (h, w), upsampled bilinearly to the input and
repeated over the input's channels.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods._common import attribution_method, cannot_run
from methods.gradient import guided_backprop
from metrics.baselines import target_output
from metrics.batching import chunked


def _image_grid(out: object, x: Tensor) -> bool:
    """Whether a module's output is a (B, C, h, w) map over the image: h, w > 1 with the input's aspect within a
    factor 1.5 (so attention's (B, heads, tokens, head_dim) tensors are not taken for one)."""
    if not isinstance(out, Tensor) or out.ndim != 4 or min(out.shape[2:]) < 2:
        return False
    sh, sw = x.shape[2] / out.shape[2], x.shape[3] / out.shape[3]
    return max(sh, sw) / min(sh, sw) < 1.5


def _trace(model: nn.Module, x: Tensor) -> list[tuple[str, nn.Module, Tensor]]:
    """(name, module, output) of every leaf module's tensor outputs on x[:1], in execution order, with autograd on."""
    trace: list[tuple[str, nn.Module, Tensor]] = []
    handles = [m.register_forward_hook(lambda m, _i, out, name=name: trace.append((name, m, out))
                                       if isinstance(out, Tensor) else None)
               for name, m in model.named_modules() if not any(True for _ in m.children())]
    try:
        with torch.enable_grad():
            out = model(x[:1].detach().requires_grad_())
    finally:
        for h in handles:
            h.remove()
    return trace + [("", model, out)]


def _token_grid(trace: list[tuple[str, nn.Module, Tensor]], i: int, x: Tensor) -> tuple[int, int] | None:
    """(h, w) of the patch tokens of trace[i]'s output (1, p + h w, D): (h, w) the last image grid before it (the
    patch embedding's), p >= 0 prefix tokens (class, distillation, register tokens) fewer than h w; None if none."""
    out = trace[i][2]
    grids = [o.shape[2:] for _n, _m, o in trace[:i] if _image_grid(o, x)]
    if out.ndim != 3 or not grids:
        return None
    h, w = grids[-1]
    return (h, w) if 0 <= out.shape[1] - h * w < h * w else None


def _find_layer(trace: list[tuple[str, nn.Module, Tensor]], x: Tensor) -> int | None:
    """Index in `trace` of the automatic CAM layer (see `last_spatial_layer`), None if the model has none."""
    spatial = [i for i, (_n, _m, out) in enumerate(trace[:-1]) if _image_grid(out, x)]
    grids = {i: _token_grid(trace, i, x) for i, (_n, m, _o) in enumerate(trace[:-1])
             if isinstance(m, nn.LayerNorm) and (not spatial or i > spatial[-1])}
    tokens = [i for i, grid in grids.items() if grid is not None]
    if tokens:
        grads = torch.autograd.grad(trace[-1][2].sum(), [trace[i][2] for i in tokens], allow_unused=True)
        reached = [i for i, g in zip(tokens, grads)                              # g: (1, p + h w, D)
                   if g is not None and bool(g[:, g.shape[1] - grids[i][0] * grids[i][1]:].ne(0).any())]
        return reached[-1] if reached else tokens[-1]                            # none: the output ignores x
    return spatial[-1] if spatial else None


def _locate(method: str, model: nn.Module, x: Tensor,
            layer: str | None) -> tuple[str, nn.Module, tuple[int, int] | None]:
    """(name, module, patch grid (h, w) of a token layer or None) of `layer`, checked, or of the automatic layer."""
    modules = dict(model.named_modules())
    if layer is not None and layer not in modules:
        raise ValueError(f"{method}: layer {layer!r} is not a module of {type(model).__name__}; name one of its "
                         "modules or pass null")                        # the config's error, not the model's
    trace = _trace(model, x)
    if layer is None:
        i = _find_layer(trace, x)
        if i is None:
            raise cannot_run(method, model, "it needs a spatial layer, but no module has a (B, C, h, w) output over "
                                            "the image or a LayerNorm with token outputs (B, N, D) after a patch grid")
    else:
        i = next((j for j in reversed(range(len(trace) - 1)) if trace[j][0] == layer), None)   # its last call
    name = layer or trace[i][0]
    out = trace[i][2] if i is not None else None
    if out is None or out.ndim == 4:
        return name, modules[name], None
    grid = _token_grid(trace, i, x)
    if grid is None:
        raise cannot_run(method, model, f"layer {name!r} outputs {tuple(out.shape)}, neither a map (B, C, h, w) nor "
                                        "tokens (B, p + h w, D) after a patch grid (B, D, h, w) to reshape them to")
    return name, modules[name], grid


def last_spatial_layer(model: nn.Module, x: Tensor, *, method: str = "grad_cam") -> str:
    """Name of the automatic CAM layer, from one forward (and, for a transformer, one backward) pass on x[:1].

    A CNN's: the last leaf module, in execution order, whose output is a (B, C, h, w) map over the image
    (h, w > 1, the input's aspect within a factor 1.5). A vision transformer's (nn.LayerNorm token outputs
    (B, p + h w, D) after the last such map, (h, w) that map's grid, the patch embedding's): the last
    LayerNorm whose patch tokens the output's gradient reaches. For a class-token ViT that is the last
    block's input norm (blocks[-1].norm1, the ViT recipe of pytorch-grad-cam, Gildenblat et al. 2021):
    after it only the class token is read, so later patch tokens get no gradient (an output that ignores its
    input, as a zero-initialised head, gives the last token LayerNorm). A token layer's p prefix
    tokens (class, distillation, registers) are dropped and its h w patch tokens, row-major as the patch
    embedding flattens them, reshaped to (B, D, h, w).
    """
    return _locate(method, model, x, None)[0]


def _layer(method: str, model: nn.Module, x: Tensor,
           layer: str | None) -> tuple[nn.Module, tuple[int, int] | None]:
    """The CAM layer and, for a token layer, its patch grid (h, w) (None for a (B, C, h, w) layer)."""
    return _locate(method, model, x, layer)[1:]


def _as_map(t: Tensor, grid: tuple[int, int] | None) -> Tensor:
    """A layer output as a map (B, K, h, w): tokens (B, p + h w, D) lose their p prefix tokens and are reshaped."""
    if grid is None:
        return t
    h, w = grid
    return t[:, t.shape[1] - h * w:].transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)


def _activations(model: nn.Module, layer: tuple[nn.Module, tuple[int, int] | None], x: Tensor,
                 target: Tensor) -> tuple[Tensor, Tensor]:
    """The layer's output A (B, K, h, w) and d f_target / d A, with the hook removed on exit."""
    module, grid = layer
    store: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: store.append(out))
    try:
        with torch.enable_grad():
            f = target_output(model, x.detach().requires_grad_(), target)
    finally:
        handle.remove()
    if not store or not isinstance(store[-1], Tensor) or store[-1].ndim != (4 if grid is None else 3):
        raise cannot_run("a CAM", model, f"its CAM layer {type(module).__name__} must run in the forward and "
                                         "return (B, K, h, w) or tokens (B, N, D)")
    A = store[-1]                     # a module run several times (torchvision's shared ReLU): its last call, as captum
    g = torch.autograd.grad(f.sum(), A)[0]
    return _as_map(A.detach(), grid), _as_map(g, grid)


def _upsample(cam: Tensor, x: Tensor) -> Tensor:
    """(B, 1, h, w) -> (B, 1, H, W), bilinear."""
    return F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)


@attribution_method
def grad_cam(model: nn.Module, x: Tensor, target: Tensor, *, layer: str | None = None) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ReLU(sum_k alpha_k A_k), alpha_k = mean over (h, w) of d f_target / d A_k.

    `layer` names the module whose output A is used; by default the last spatial
    layer in execution order.
    """
    A, g = _activations(model, _layer("grad_cam", model, x, layer), x, target)      # (B, K, h, w) each
    cam = (g.mean(dim=(2, 3), keepdim=True) * A).sum(dim=1, keepdim=True).clamp_min(0)   # (B, 1, h, w)
    return _upsample(cam, x)


@attribution_method
def guided_grad_cam(model: nn.Module, x: Tensor, target: Tensor, *, layer: str | None = None) -> Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backpropagation times the upsampled Grad-CAM, per channel."""
    name = _locate("guided_grad_cam", model, x, layer)[0]
    return guided_backprop(model, x, target) * grad_cam(model, x, target, layer=name)


@attribution_method
def grad_cam_plus_plus(model: nn.Module, x: Tensor, target: Tensor, *, layer: str | None = None) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018): ReLU(sum_k w_k A_k), w_k = sum_ij a_kij ReLU(g_kij),

    a_kij = g^2 / (2 g^2 + sum_ab A_kab g^3), g = d f_target / d A, the paper's closed
    form for an exponential output (a = 0 where the denominator is 0).
    """
    A, g = _activations(model, _layer("grad_cam_plus_plus", model, x, layer), x, target)   # (B, K, h, w) each
    denominator = 2 * g.square() + A.sum(dim=(2, 3), keepdim=True) * g.pow(3)
    a = torch.where(denominator != 0, g.square() / torch.where(denominator != 0, denominator, 1.0), 0.0)
    w = (a * g.clamp_min(0)).sum(dim=(2, 3), keepdim=True)                            # (B, K, 1, 1)
    return _upsample((w * A).sum(dim=1, keepdim=True).clamp_min(0), x)


@attribution_method
def layer_cam(model: nn.Module, x: Tensor, target: Tensor, *, layer: str | None = None) -> Tensor:
    """LayerCAM (Jiang et al. 2021): ReLU(sum_k ReLU(g_kij) A_kij), g = d f_target / d A: a weight per location."""
    A, g = _activations(model, _layer("layer_cam", model, x, layer), x, target)
    return _upsample((g.clamp_min(0) * A).sum(dim=1, keepdim=True).clamp_min(0), x)


@attribution_method
def score_cam(
    model: nn.Module, x: Tensor, target: Tensor, *,
    layer: str | None = None, output: Literal["softmax", "logit"] = "softmax", baseline: float = 0.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Score-CAM (Wang et al. 2020): ReLU(sum_k s_k U_k), s_k = p_target(x * N_k + baseline * (1 - N_k)),

    U_k the layer's k-th map upsampled to the input, N_k = U_k min-max scaled to [0, 1]
    per sample (a constant map gets s_k = 0), p the softmax probability as in the
    paper's code. No gradients; B * K forward passes, `chunk_size` images at a time (None: sized
    from the memory budget of metrics.batching).
    """
    module, grid = _layer("score_cam", model, x, layer)
    store: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: store.append(out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    A = _as_map(store[-1].detach(), grid)                                          # (B, K, h, w)
    B, K = x.shape[0], A.shape[1]
    U = F.interpolate(A, size=x.shape[2:], mode="bilinear", align_corners=False)   # (B, K, H, W)
    lo, hi = U.amin(dim=(2, 3), keepdim=True), U.amax(dim=(2, 3), keepdim=True)
    N = torch.where(hi > lo, (U - lo) / torch.where(hi > lo, hi - lo, 1.0), 0.0)

    def masked_score(i: Tensor) -> Tensor:                                        # i: (N',) flat index into (B, K)
        b, k = i.div(K, rounding_mode="floor"), i % K
        n = N[b, k][:, None]                                                       # (N', 1, H, W)
        return target_output(model, x[b] * n + baseline * (1 - n), target[b], output)

    with torch.no_grad():
        s = chunked(masked_score, B * K, chunk_size, device=x.device, like=x).view(B, K, 1, 1)
    s = torch.where(hi > lo, s, 0.0)
    return (s * U).sum(dim=1, keepdim=True).clamp_min(0)                          # (B, 1, H, W)
