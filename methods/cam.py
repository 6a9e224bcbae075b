"""Class activation maps: Grad-CAM and its successors, on a layer found automatically or named.

Every map is computed at the layer's (h, w), upsampled bilinearly to the input and
repeated over the input's channels.
"""
from __future__ import annotations

from typing import Literal

import captum.attr
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods._common import attribution_method, cannot_run
from methods.gradient import guided_backprop
from metrics.baselines import target_output
from metrics.batching import chunked


def last_spatial_layer(model: nn.Module, x: Tensor, *, method: str = "grad_cam") -> str:
    """Name of the last leaf module, in execution order, whose output is a (B, C, h, w) map with h, w > 1."""
    found: list[str] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=name: found.append(name)
                                if isinstance(out, Tensor) and out.ndim == 4 and min(out.shape[2:]) > 1 else None)
        for name, m in model.named_modules() if not any(True for _ in m.children())
    ]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    if not found:
        raise cannot_run(method, model, "it needs a spatial layer, but no module has a (B, C, h, w) output")
    return found[-1]


def _layer_name(method: str, model: nn.Module, x: Tensor, layer: str | None) -> str:
    """`layer`, checked, or the last spatial layer's name; the error names `method`."""
    name = layer or last_spatial_layer(model, x, method=method)
    if name not in dict(model.named_modules()):
        raise cannot_run(method, model, f"layer {name!r} is not a module of it; name one of its modules or pass null")
    return name


def _layer(method: str, model: nn.Module, x: Tensor, layer: str | None) -> nn.Module:
    return dict(model.named_modules())[_layer_name(method, model, x, layer)]


def _activations(model: nn.Module, module: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The layer's output A (B, K, h, w) and d f_target / d A, with the hook removed on exit."""
    store: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: store.append(out))
    try:
        f = target_output(model, x, target)
    finally:
        handle.remove()
    if len(store) != 1 or not isinstance(store[0], Tensor) or store[0].ndim != 4:
        raise ValueError(f"the CAM layer {type(module).__name__} must run once per forward and return (B, K, h, w)")
    A = store[0]
    return A.detach(), torch.autograd.grad(f.sum(), A)[0]


def _upsample(cam: Tensor, x: Tensor) -> Tensor:
    """(B, 1, h, w) -> (B, 1, H, W), bilinear."""
    return F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)


@attribution_method
def grad_cam(model: nn.Module, x: Tensor, target: Tensor, *, layer: str | None = None) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ReLU(sum_k alpha_k A_k), alpha_k = mean over (h, w) of d f_target / d A_k.

    `layer` names the module whose output A is used; by default the last spatial
    layer in execution order.
    """
    module = _layer("grad_cam", model, x, layer)
    cam = captum.attr.LayerGradCam(model, module).attribute(
        x.requires_grad_(), target=target, relu_attributions=True)                # (B, 1, h, w)
    return _upsample(cam.detach(), x)


@attribution_method
def guided_grad_cam(model: nn.Module, x: Tensor, target: Tensor, *, layer: str | None = None) -> Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backpropagation times the upsampled Grad-CAM, per channel."""
    name = _layer_name("guided_grad_cam", model, x, layer)
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
    module = _layer("score_cam", model, x, layer)
    store: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: store.append(out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    B, K = x.shape[0], store[0].shape[1]
    U = F.interpolate(store[0].detach(), size=x.shape[2:], mode="bilinear", align_corners=False)   # (B, K, H, W)
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
