"""A user's own package: one method, metric, model and dataset that saliency-bench runs from the user's own
YAML folder (../conf), without editing the suite (README, "Extending"; tests/bench/test_packaging.py)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from metrics import MetricResult, consumes

__all__ = ["gradient_squared", "top_mass", "TinyNet", "Stripes"]


def gradient_squared(model: nn.Module, x: Tensor, target: Tensor, *, scale: float = 1.0) -> Tensor:
    """Squared input gradient, scale * (d f_target / d x)^2: the method signature, (B, C, H, W) out."""
    x = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)
    return (scale * grad.square()).detach()


@consumes("reduced")
def top_mass(attribution: Tensor, *, fraction: float = 0.1) -> MetricResult:
    """Share of the map's total |mass| in its top `fraction` of pixels: 1 when all of it is there, `fraction`
    for a uniform map, NaN for an all-zero map. attribution: the run's map (B, H, W)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    a = attribution.flatten(1).abs()                                            # (B, HW)
    k = max(1, round(fraction * a.shape[1]))
    share = a.topk(k, dim=1).values.sum(dim=1) / a.sum(dim=1)                   # (B,); 0 / 0 = NaN
    return MetricResult(scores={"top_mass": share}, higher_is_better={"top_mass": True})


class TinyNet(nn.Module):
    """conv 3x3 -> ReLU -> global average pool -> linear: a model the zoo trains and caches like its own."""

    def __init__(self, num_classes: int, *, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).relu().mean(dim=(2, 3)))


class Stripes(torch.utils.data.Dataset):
    """Two classes, horizontal (0) or vertical (1) stripes in a square at a seeded place on a flat background;
    the mask is the square. Normalised with mean 0.5 and std 0.5 per channel."""

    num_classes = 2
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, *, name: str = "stripes", split: str = "test", n_samples: int = 16, size: int = 16,
                 seed: int = 0) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise ValueError(f"size must be an integer >= 8, got {size!r}")
        self.name, self.split, self.n_samples, self.size, self.seed = name, split, n_samples, size, seed
        first = 0 if split == "test" else 1_000_000                             # disjoint sample ids per split
        self._ids = torch.arange(first, first + n_samples)

    def tensors(self) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 2 + (self.split == "train"))
        n, s, side = self.n_samples, self.size, self.size // 2
        target = torch.randint(0, 2, (n,), generator=g)
        top, left = (torch.randint(0, s - side + 1, (2, n), generator=g))
        r = torch.arange(s)
        rows = (r[None, :] >= top[:, None]) & (r[None, :] < (top + side)[:, None])       # (n, s)
        cols = (r[None, :] >= left[:, None]) & (r[None, :] < (left + side)[:, None])     # (n, s)
        mask = rows[:, :, None] & cols[:, None, :]                                       # (n, s, s)
        stripe = torch.where(target[:, None, None] == 0, r[None, :, None] % 2 == 0, r[None, None, :] % 2 == 0)
        raw = torch.where(mask, stripe.float(), torch.full((n, s, s), 0.5))              # (n, s, s) in [0, 1]
        x = (raw[:, None].expand(-1, 3, -1, -1) - 0.5) / 0.5
        return {"x": x.contiguous(), "target": target, "sample_id": self._ids.clone(), "mask": mask}

    def __len__(self) -> int:
        return self.n_samples

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if not 0 <= i < self.n_samples:
            raise IndexError(i)
        return {k: v[i] for k, v in self.tensors().items()}
