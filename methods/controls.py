"""Control methods that ignore the model: they show where chance lies in every table."""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods._common import attribution_method


@attribution_method
def random_map(model: nn.Module, x: Tensor, target: Tensor, *, seed: int = 0) -> Tensor:
    """Uniform noise map U(0, 1), the same for every channel.

    Each sample draws from its own generator, seeded from `seed` and a hash of the
    sample's pixels: the map is reproducible and does not depend on the batch.
    """
    B, C, H, W = x.shape
    noise = torch.empty(B, 1, H, W, dtype=x.dtype)
    for i, sample in enumerate(x.detach().cpu().numpy()):                # a hash per sample, no model work
        digest = hashlib.blake2b(sample.tobytes(), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
        g = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
        noise[i] = torch.rand(1, H, W, generator=g, dtype=x.dtype)
    return noise.to(x.device).expand(B, C, H, W).contiguous()


@attribution_method
def edge(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Sobel edge magnitude of the channel-mean image, the model-free control of Adebayo et al. 2018."""
    B, C, H, W = x.shape
    gray = x.detach().mean(dim=1, keepdim=True)                                   # (B, 1, H, W)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
    kernels = torch.stack([sobel, sobel.T])[:, None]                              # (2, 1, 3, 3): d/dx, d/dy
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)             # (B, 2, H, W)
    return g.norm(dim=1, keepdim=True).expand(B, C, H, W).contiguous()


@attribution_method
def centre(model: nn.Module, x: Tensor, target: Tensor, *, sigma: float = 0.25) -> Tensor:
    """Centre prior (Judd et al. 2009): exp(-d^2 / (2 sigma^2)), d the distance of a pixel from the
    image centre in units of the image size (height and width each scaled to [-0.5, 0.5]). Model-free."""
    if not sigma > 0:
        raise ValueError(f"sigma must be positive (a fraction of the image size), got {sigma}")
    B, C, H, W = x.shape
    ys = (torch.arange(H, dtype=x.dtype, device=x.device) + 0.5) / H - 0.5
    xs = (torch.arange(W, dtype=x.dtype, device=x.device) + 0.5) / W - 0.5
    d2 = ys[:, None].square() + xs[None, :].square()                              # (H, W)
    return torch.exp(-d2 / (2 * sigma ** 2)).expand(B, C, H, W)


@attribution_method
def constant(model: nn.Module, x: Tensor, target: Tensor, *, value: float = 1.0) -> Tensor:
    """Constant map: every pixel equal, so every ranking is one big tie (tests each metric's tie rule)."""
    return torch.full_like(x, value)
