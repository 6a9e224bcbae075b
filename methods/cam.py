"""Class activation maps."""
from __future__ import annotations

import captum.attr
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def last_spatial_layer(model: nn.Module, x: Tensor) -> str:
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
        raise ValueError(f"grad_cam needs a spatial layer, but {type(model).__name__} has no module with a (B, C, h, w) output")
    return found[-1]


def grad_cam(model: nn.Module, x: Tensor, target: Tensor, *, layer: str | None = None) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ReLU(sum_c alpha_c A_c), alpha_c = mean over (h, w) of d f_target / d A_c.

    `layer` names the module whose output A is used; by default the last spatial
    layer in execution order. The (h, w) map is upsampled bilinearly to the input
    and repeated over the input's channels.
    """
    name = layer or last_spatial_layer(model, x)
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"grad_cam layer {name!r} is not a module of {type(model).__name__}")
    cam = captum.attr.LayerGradCam(model, modules[name]).attribute(
        x.detach().requires_grad_(), target=target, relu_attributions=True
    ).detach()                                                                   # (B, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)
    return cam.expand(-1, x.shape[1], -1, -1).contiguous()                       # (B, C, H, W)
