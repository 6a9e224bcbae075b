"""Control methods that ignore the model: they show where chance lies in every table."""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def edge(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Sobel edge magnitude of the channel-mean image, the model-free control of Adebayo et al. 2018."""
    B, C, H, W = x.shape
    gray = x.detach().mean(dim=1, keepdim=True)                                   # (B, 1, H, W)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
    kernels = torch.stack([sobel, sobel.T])[:, None]                              # (2, 1, 3, 3): d/dx, d/dy
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)             # (B, 2, H, W)
    return g.norm(dim=1, keepdim=True).expand(B, C, H, W).contiguous()
