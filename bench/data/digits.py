"""`digits`: scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set, 1797 images of
43 writers), upsampled: a small real-image dataset that ships inside a package, nothing downloaded."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from bench.data._index import item_index

_FRACTIONS = {"train": 0.6, "val": 0.1, "test": 0.3}      # of each class, in a seeded per-class shuffle
_INK = 4.0                                                # mask: 8x8 cells with intensity >= 4 of 16


def _load() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ValueError("the digits dataset reads scikit-learn's bundled copy: pip install scikit-learn") from e
    d = load_digits()
    return torch.from_numpy(d.images).float(), torch.from_numpy(d.target).long()   # (1797, 8, 8) 0..16, (1797,)


class Digits(Dataset[dict[str, Tensor]]):
    """scikit-learn's 8x8 digits (Alpaydin & Kaynak 1998), ten classes, upsampled bilinearly to
    `size` px and repeated over three channels.

    Splits are stratified: each class's images are shuffled by a generator seeded with `seed`
    and cut 60 / 10 / 30 % into train / val / test, so the splits are disjoint and fixed by the
    seed. sample_id is the image's index in sklearn's array, stable across runs and sizes. The
    mask ("where the ink is") is every pixel of an 8x8 cell with intensity >= 4 of 16, upsampled
    by nearest neighbour. Inputs are normalised with the dataset's pixel mean 0.3 and std 0.375
    (so 0.0 is the average grey, not the black background).
    """

    num_classes: int = 10
    classes: tuple[str, ...] = tuple(str(d) for d in range(10))

    def __init__(self, *, name: str = "digits", split: Literal["train", "val", "test"] = "test",
                 n_samples: int | None = None, size: int = 64, seed: int = 0,
                 mean: tuple[float, float, float] | list[float] = (0.3, 0.3, 0.3),
                 std: tuple[float, float, float] | list[float] = (0.375, 0.375, 0.375)) -> None:
        if split not in _FRACTIONS:
            raise ValueError(f"split must be one of {sorted(_FRACTIONS)}, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise ValueError(f"size must be an integer >= 8 (pixels per side), got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != 3 or len(std) != 3 or not all(v > 0 for v in std):
            raise ValueError(f"mean and std must be 3 numbers each (R, G, B), std > 0; got mean={mean}, std={std}")
        images, target = _load()
        ids = self._split_ids(target, split, seed)
        if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int)
                                      or not 1 <= n_samples <= len(ids)):
            raise ValueError(f"n_samples must be an integer in 1..{len(ids)} (the {split} split's size) or null, "
                             f"got {n_samples!r}")
        ids = ids[:n_samples]
        self.name, self.split, self.size, self.seed = name, split, size, seed
        self.mean, self.std = mean, std
        self.n_samples = len(ids)
        self.image_shape = (3, size, size)
        self._images, self._target, self._ids = images[ids], target[ids], ids   # (N, 8, 8), (N,), (N,)

    @staticmethod
    def _split_ids(target: Tensor, split: str, seed: int) -> Tensor:
        """Indices of `split`: per class, a seeded shuffle cut at the split fractions; sorted."""
        g = torch.Generator().manual_seed(seed)
        names = list(_FRACTIONS)
        out = []
        for c in range(10):
            idx = (target == c).nonzero().squeeze(1)
            idx = idx[torch.randperm(len(idx), generator=g)]
            cuts = [0] + [round(len(idx) * sum(_FRACTIONS[n] for n in names[:k + 1])) for k in range(len(names))]
            k = names.index(split)
            out.append(idx[cuts[k]:cuts[k + 1]])
        return torch.cat(out).sort().values

    def tensors(self) -> dict[str, Tensor]:
        """x (N, 3, size, size) float32 normalised, target (N,), mask (N, size, size) bool, sample_id (N,)."""
        raw = self._images[:, None] / 16.0                                                    # (N, 1, 8, 8)
        image = F.interpolate(raw, size=(self.size, self.size), mode="bilinear", align_corners=False)
        mask = F.interpolate((self._images[:, None] >= _INK).float(), size=(self.size, self.size), mode="nearest")
        mean, std = torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1)
        return {"x": (image.expand(-1, 3, -1, -1) - mean) / std, "target": self._target.clone(),
                "mask": mask[:, 0].bool(), "sample_id": self._ids.clone()}

    def __len__(self) -> int:
        return self.n_samples

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        i = item_index(i, self.n_samples)
        one = Digits.__new__(Digits)
        one.__dict__.update(self.__dict__)
        one._images, one._target, one._ids = self._images[i:i + 1], self._target[i:i + 1], self._ids[i:i + 1]
        return {k: v[0] for k, v in one.tensors().items()}

    def __repr__(self) -> str:
        return f"Digits(split={self.split!r}, n_samples={self.n_samples}, size={self.size}, seed={self.seed})"
