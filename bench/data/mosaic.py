"""`shapes_mosaic`: 2x2 mosaics of `shapes` images for Focus (Arias-Duart et al. 2022).

Every mosaic is a pure function of (seed, split, index), like a `shapes` item, and is rendered each time
it is read, never kept, so memory does not grow with n_samples.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from bench.data._index import item_index
from bench.data.shapes import CLASSES, render_shapes_item

_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
_STREAM = 7                     # mixed into each mosaic's seed: its draws never reuse a shapes item's stream
_LAYOUTS = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
                        dtype=torch.bool)   # which quadrants (top-left, top-right, bottom-left, bottom-right) hold the target


class ShapesMosaic:
    """2x2 mosaics of `shapes` test images: two of the target class, two of two other classes.

    Mosaic i has target class i % 6 (balanced splits); its two target images sit in two quadrants
    drawn uniformly from the six layouts, the other two quadrants hold one image each of two distinct
    classes drawn from the other five (the paper: "randomly chosen from the rest of classes").
    The images are `shapes` items of the same split, seed, size and distractors, pixel for pixel:
    the k-th target quadrant and the k-th other quadrant (k = 0, 1, in reading order) show shapes
    items 6 (2 i + k) + their class, so no image appears twice, in one mosaic or in two. Tiles are full-size, so a mosaic is 2 * size pixels a side
    (128 at the default 64): the zoo's convolutional models (small_cnn, resnet, vgg), trained on
    single `shapes` images, pool globally and take it as it is, as Arias-Duart et al. feed ImageNet
    mosaics to ImageNet models (the zoo's vit has a fixed 8x8 token grid and refuses it). Measured on
    small_cnn (120 mosaics): 97.7% of the quadrants are classified right alone, but the mosaic's
    argmax is its target only 35% of the time (half-size tiles in a 64 px mosaic: 19%, chance), so
    methods explain the target class's logit, as in the paper, not the prediction.
    `train_on` names that shapes dataset, so bench.zoo.load_model uses (and caches) the models
    trained on it. The mask marks the target quadrants, as metrics.focus reads it; the layout and
    the classes of all four quadrants are in `plan(i)`. Inputs are normalised as `shapes` does.
    """

    num_classes: int = len(CLASSES)
    classes: tuple[str, ...] = CLASSES

    def __init__(
        self,
        *,
        name: str = "shapes_mosaic",
        split: Literal["train", "val", "test"] = "test",
        n_samples: int = 128,
        size: int = 64,
        seed: int = 0,
        distractors: int = 1,
        mean: tuple[float, float, float] | list[float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] | list[float] = (0.25, 0.25, 0.25),
    ) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
        for key, value, low in (("n_samples", n_samples, 1), ("size", size, 16), ("seed", seed, 0),
                                ("distractors", distractors, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != 3 or len(std) != 3 or not all(v > 0 for v in std):
            raise ValueError(f"mean and std must be 3 numbers each (R, G, B), std > 0; got mean={mean}, std={std}")
        self.name, self.split, self.n_samples = name, split, int(n_samples)
        self.size, self.seed, self.distractors = int(size), int(seed), int(distractors)
        self.mean, self.std = mean, std
        self.image_shape = (3, 2 * self.size, 2 * self.size)

    @property
    def train_on(self) -> dict[str, Any]:
        """The `shapes` dataset config whose zoo models classify these mosaics (bench.zoo.load_model)."""
        cfg: dict[str, Any] = {"_target_": "bench.data.Shapes", "name": "shapes", "size": self.size,
                               "seed": self.seed, "distractors": self.distractors}
        if (self.mean, self.std) != ((0.5,) * 3, (0.25,) * 3):
            cfg.update(mean=list(self.mean), std=list(self.std))
        return cfg

    def plan(self, i: int) -> dict[str, Tensor]:
        """Mosaic i's layout: target () class, classes (4,) and shapes item indices (4,) of the quadrants in
        the order top-left, top-right, bottom-left, bottom-right, and targets (4,) bool."""
        i = item_index(i, self.n_samples)
        state = np.random.SeedSequence([self.seed, _SPLIT_CODES[self.split], i, _STREAM]).generate_state(1, np.uint64)
        g = torch.Generator().manual_seed(int(state[0]))
        target = i % self.num_classes
        others = [c for c in range(self.num_classes) if c != target]
        pick = torch.randperm(len(others), generator=g)[:2].tolist()      # two distinct other classes
        layout = _LAYOUTS[int(torch.randint(len(_LAYOUTS), (1,), generator=g))]
        classes = torch.full((4,), target, dtype=torch.int64)
        classes[~layout] = torch.tensor([others[p] for p in pick])
        k = torch.zeros(4, dtype=torch.int64)                            # k-th image of its class in this mosaic
        k[layout.nonzero()[1]] = 1
        k[(~layout).nonzero()[1]] = 1
        return {"target": torch.tensor(target), "classes": classes, "tiles": 6 * (2 * i + k) + classes,
                "targets": layout.clone()}

    def _image(self, i: int) -> Tensor:
        """Mosaic i as uint8 (3, 2S, 2S), rendered now (not kept); torch single-threaded while it
        renders (the per-tile work is small, and intra-op threads stall on shared cores)."""
        tiles = self.plan(i)["tiles"].tolist()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            images = [render_shapes_item(seed=self.seed, split=self.split, index=j, size=self.size,
                                         distractors=self.distractors)[0] for j in tiles]
        finally:
            torch.set_num_threads(threads)
        top, bottom = torch.cat(images[:2], dim=2), torch.cat(images[2:], dim=2)   # (3, S, 2S) each
        return torch.cat([top, bottom], dim=1)                                      # (3, 2S, 2S)

    def _mask(self, targets: Tensor) -> Tensor:
        """(4,) bool quadrant flags -> (2S, 2S) bool mask of the target quadrants."""
        return targets.view(2, 2).repeat_interleave(self.size, 0).repeat_interleave(self.size, 1)

    def __len__(self) -> int:
        return self.n_samples

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        i = item_index(i, self.n_samples)
        plan = self.plan(i)
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        return {
            "x": (self._image(i).to(torch.float32) / 255.0 - mean) / std,   # (3, 2S, 2S), as Shapes normalises
            "target": plan["target"],                                      # () int64
            "mask": self._mask(plan["targets"]),                           # (2S, 2S) bool: the target quadrants
            "sample_id": torch.tensor(i),                                  # () int64, the index within the split
        }

    def tensors(self) -> dict[str, Tensor]:
        """Every mosaic stacked: x (N, 3, 2S, 2S), target (N,), mask (N, 2S, 2S), sample_id (N,)."""
        items = [self[i] for i in range(self.n_samples)]
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    def __repr__(self) -> str:
        return (f"ShapesMosaic(split={self.split!r}, n_samples={self.n_samples}, size={self.size} (mosaic "
                f"{2 * self.size} px), seed={self.seed}, distractors={self.distractors})")
