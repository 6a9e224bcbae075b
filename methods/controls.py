"""Control methods: they show where chance lies in every table.

`random` is drawn afresh for every (image, class, model), so every test that compares two maps
of different classes or models sees two independent draws; `edge`, `centre` and `constant`
ignore the model and the class. Expected scores (tested in tests/methods/test_controls.py;
n = pixels per map, m = mask pixels; "similarity" is every measure of metrics.similarities):

| metric                               | random                   | edge        | centre      | constant       |
|--------------------------------------|--------------------------|-------------|-------------|----------------|
| mprt, random_logit, data_randomization (similarity, lower = sensitive)                                  |
|   spearman, spearman_signed          | 0 (sd 1/sqrt(n - 1))     | 1           | 1           | NaN (both flat)|
|   top_k                              | top_k (the chance level) | 1 (a)       | 1 (a)       | NaN            |
| input_invariance: spearman           | 0                        | 1           | 1           | NaN            |
|   rel_l1                             | 2/3 (E|U - U'| / E|U|)   | 0 (float)   | 0           | 0              |
| pointing_game hit (tolerance 0)      | m / n in expectation     | image       | TorchRay's  | m / n exactly  |
| relevance_mass_accuracy              | m / n in expectation     | image       | image       | m / n exactly  |
| localization_auc                     | 1/2 in expectation       | image       | image       | 1/2 exactly    |

(a) the map's overlap with itself: 1 less the share of ties at the k-th value, which top_k_overlap
takes in expectation (centre's symmetric ties: 0.991 at 32 px). "image": depends on the data only, not on any model (for centre, the pointing game of
TorchRay's centre baseline: a hit when the object covers pixel (H/2, W/2)).
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods._common import attribution_method
from metrics.checks import check_float


def _model_free(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Declare a control's map a function of x alone, neither of the model nor of the class (read by
    metrics.model_free: MPRT and the report's MPRT grid compute it once for all stages)."""
    fn.model_free = True
    return fn


def _fingerprint(model: nn.Module | None) -> bytes:
    """Bytes that change whenever any parameter tensor is re-drawn: up to 16 evenly spaced values of each
    parameter (a re-drawn, retrained or compensated layer changes them), read exactly on any device."""
    if model is None:
        return b""
    probes = [p.detach().flatten()[:: max(1, p.numel() // 16)][:16] for p in model.parameters()]
    if not probes:
        return b""
    return torch.cat([q.to(torch.float64) for q in probes]).cpu().numpy().tobytes()


@attribution_method
def random_map(model: nn.Module, x: Tensor, target: Tensor, *, seed: int = 0) -> Tensor:
    """Random control: a uniform noise map U(0, 1), the same for every channel, drawn per
    (image, class, model).

    Each sample draws from its own generator, seeded by a hash of `seed`, the sample's pixels,
    its target class and a fingerprint of the model's parameters: reproducible, independent of
    the batch, and a new draw for another class or another model, so in MPRT, the random logit
    test and data randomization it scores chance (similarity ~0, as Adebayo et al. 2018's
    calibration expects), not 1 as a map that ignores the model does (edge, centre).
    """
    B, C, H, W = x.shape
    model_bytes = _fingerprint(model)
    classes = target.detach().cpu().tolist()
    noise = torch.empty(B, 1, H, W, dtype=x.dtype)
    for i, sample in enumerate(x.detach().cpu().numpy()):                # a hash per sample, no model work
        h = hashlib.blake2b(sample.tobytes(), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
        h.update(int(classes[i]).to_bytes(8, "little", signed=True))
        h.update(model_bytes)
        g = torch.Generator().manual_seed(int.from_bytes(h.digest(), "little") >> 1)
        noise[i] = torch.rand(1, H, W, generator=g, dtype=x.dtype)
    return noise.to(x.device).expand(B, C, H, W).contiguous()


@_model_free
@attribution_method
def edge(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Sobel edge magnitude of the channel-mean image, the model-free control of Adebayo et al. 2018."""
    B, C, H, W = x.shape
    gray = x.detach().mean(dim=1, keepdim=True)                                   # (B, 1, H, W)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
    kernels = torch.stack([sobel, sobel.T])[:, None]                              # (2, 1, 3, 3): d/dx, d/dy
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)             # (B, 2, H, W)
    return g.norm(dim=1, keepdim=True).expand(B, C, H, W).contiguous()


@_model_free
@attribution_method
def centre(model: nn.Module, x: Tensor, target: Tensor, *, sigma: float = 0.25) -> Tensor:
    """Centre prior (Judd et al. 2009) peaking where TorchRay's centre baseline points (Zhang et al. 2018).

    exp(-d^2 / (2 sigma^2)), d the distance of pixel (i, j) from (H/2, W/2) with each axis in units
    of the image size: d^2 = ((i - H/2) / H)^2 + ((j - W/2) / W)^2. Pixel indices are coordinates,
    as in TorchRay's pointing game, whose centre baseline is the point (u, v) = (W/2, H/2): at even
    sizes the single maximum is pixel (H/2, W/2), the point itself; at an odd size the point lies
    between two pixels on that axis and both tie. Model-free.
    """
    check_float("sigma", sigma, 0, low_open=True, meaning=" (a fraction of the image size)")
    B, C, H, W = x.shape
    ys = (torch.arange(H, dtype=torch.float64, device=x.device) - H / 2) / H
    xs = (torch.arange(W, dtype=torch.float64, device=x.device) - W / 2) / W
    d2 = ys[:, None].square() + xs[None, :].square()                              # (H, W), exact ties
    return torch.exp(-d2 / (2 * sigma ** 2)).to(x.dtype).expand(B, C, H, W)


@_model_free
@attribution_method
def constant(model: nn.Module, x: Tensor, target: Tensor, *, value: float = 1.0) -> Tensor:
    """Constant map: every pixel equal, so every ranking is one big tie (tests each metric's tie rule)."""
    check_float("value", value)
    return torch.full_like(x, value)
