"""The embedded `shapes` benchmark: six shape classes on textured backgrounds, exact masks.

Every item is a pure function of (seed, split, index): it draws from its own
torch.Generator, seeded from numpy's SeedSequence over those three integers, so any
item can be regenerated alone, in any order, in any process. Nothing is downloaded,
and nothing is kept: items are rendered when they are read, so memory does not grow
with n_samples.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from bench.data._index import item_index
# _AREA and _WATERMARKS are read from here by tests (tests/bench/test_shapes.py, tests/test_published.py)
from bench.data._shapes_draw import _AREA, _SPLIT_CODES, _WATERMARKS, CLASSES, Split, _render  # noqa: F401

_CHUNK = 64                    # items rendered per batch (and the most kept): small enough to stay in cache


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded, then restore: the batches are small and the per-item Python
    dominates, while intra-op threads stall when cores are shared (~50x slower, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check(*, split: str, size: int, seed: int, distractors: int, decoys: int = 0, watermark: bool = False,
           object_class: str = "label") -> None:
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    if not _is_int(size) or size < 16:
        raise ValueError(f"size must be an integer >= 16 (pixels per side), got {size!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not _is_int(distractors) or distractors < 0:
        raise ValueError(f"distractors must be an integer >= 0, got {distractors!r}")
    if not _is_int(decoys) or decoys < 0:
        raise ValueError(f"decoys must be an integer >= 0, got {decoys!r}")
    if not isinstance(watermark, bool):
        raise ValueError(f"watermark must be true or false, got {watermark!r}")
    if object_class not in ("label", "random"):
        raise ValueError(f"object_class must be 'label' (the object shows the class) or 'random' (independent of "
                         f"it), got {object_class!r}")


def render_shapes_item(
    *, seed: int, split: Split, index: int, size: int = 64, distractors: int = 1, decoys: int = 0,
    watermark: bool = False, object_class: Literal["label", "random"] = "label",
) -> tuple[Tensor, Tensor, int]:
    """One `shapes` item, regenerated alone: (image uint8 (3, H, W), mask bool (H, W), label).

    label = index % 6, naming CLASSES[label]. The mask is exactly the object's pixels: the
    object is painted last, in one flat colour, so all of it is visible. The item draws only
    from its own generator, seeded from (seed, split, index); global RNG state is untouched.
    With a watermark the mask is the watermark's pixels (see Shapes).
    """
    _check(split=split, size=size, seed=seed, distractors=distractors, decoys=decoys, watermark=watermark,
           object_class=object_class)
    if not _is_int(index) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    item = _render(int(seed), split, [int(index)], int(size), int(distractors), int(decoys), watermark, object_class)
    mask = item["watermark_mask"] if watermark else item["mask"]
    return item["image"][0], mask[0], int(item["label"][0])


class Shapes(Dataset[dict[str, Tensor]]):
    """The embedded benchmark: six shape classes on textured backgrounds, with exact masks.

    Each image holds one class object (CLASSES[index % 6], so splits are balanced), bounding
    radius 9-16 px at 64 px, random position, rotation and colour, plus `distractors`
    elongated ellipses that carry no class information and are never in the mask. The
    background is a tinted field of low-frequency sinusoids and noise; object and
    distractors are 0.4 brighter or darker than its mean. Items stream: reading item i
    renders the _CHUNK items around it (one batch, bit-identical to rendering each alone)
    and keeps only that chunk, so a pass in order renders each item once and memory stays
    flat in n_samples (`tensors()` alone holds the whole split). Inputs are normalised with
    mean 0.5 and std 0.25 per channel, so 0.0 in the normalised space is mid-grey.

    `decoys` > 0 (the `shapes_multi` config) adds that many non-class objects (hexagons,
    half-height ellipses) of the same size range and contrast, placed apart from the class
    object and painted under it: several objects, of which only one decides the class and
    only that one is in the mask. decoys=0 leaves every item bit-identical.

    `watermark` (the `shapes_spurious` config, a "Clever Hans" benchmark after Lapuschkin et
    al. 2019) stamps a 6x6 px (at 64 px) black-and-white 3x3-cell mark, one pattern per class,
    into a random corner; the mask is then the mark's pixels. With `object_class="random"` the
    object's shape is drawn independently of the label, so the mark is the only evidence of the
    class: a model that learns the task must use the mark, and its reasoning is known by
    construction (its accuracy without the mark is chance, which the tests check). The
    watermark and the random shape draw from their own generators: everything else is
    bit-identical to plain `shapes`. `mean` and `std` set the normalisation, e.g. to the one
    pretrained weights expect (load_model names it when they differ).
    """

    num_classes: int = len(CLASSES)
    classes: tuple[str, ...] = CLASSES
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    def __init__(
        self,
        *,
        name: str = "shapes",
        split: Split = "test",
        n_samples: int = 128,
        size: int = 64,
        seed: int = 0,
        distractors: int = 1,
        decoys: int = 0,
        watermark: bool = False,
        object_class: Literal["label", "random"] = "label",
        mean: tuple[float, float, float] | list[float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] | list[float] = (0.25, 0.25, 0.25),
    ) -> None:
        _check(split=split, size=size, seed=seed, distractors=distractors, decoys=decoys, watermark=watermark,
               object_class=object_class)
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != 3 or len(std) != 3 or not all(v > 0 for v in std):
            raise ValueError(f"mean and std must be 3 numbers each (R, G, B), std > 0; got mean={mean}, std={std}")
        self.mean, self.std = mean, std
        self.watermark, self.object_class = watermark, object_class
        if not _is_int(n_samples) or n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        self.name = name
        self.split = split
        self.n_samples = int(n_samples)
        self.size = int(size)
        self.seed = int(seed)
        self.distractors = int(distractors)
        self.decoys = int(decoys)
        self.image_shape = (3, self.size, self.size)
        self._chunk: tuple[int, Tensor, Tensor] | None = None     # (first index, images, masks): the last rendered

    def _rendered(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Items start..stop-1 rendered in one batch: images (n, 3, H, W) uint8, masks (n, H, W) bool."""
        with _one_thread():
            item = _render(self.seed, self.split, range(start, stop), self.size, self.distractors, self.decoys,
                           self.watermark, self.object_class)
        return item["image"], item["watermark_mask"] if self.watermark else item["mask"]

    def _item(self, i: int) -> tuple[Tensor, Tensor]:
        """Item i's image (3, H, W) uint8 and mask (H, W), from the chunk of _CHUNK items that holds it."""
        start = i - i % _CHUNK
        if self._chunk is None or self._chunk[0] != start:
            self._chunk = (start, *self._rendered(start, min(start + _CHUNK, self.n_samples)))
        return self._chunk[1][i - start], self._chunk[2][i - start]

    def _normalise(self, image: Tensor) -> Tensor:
        """uint8 (..., 3, H, W) -> float32, (image / 255 - mean) / std."""
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (image.to(torch.float32) / 255.0 - mean) / std

    def __len__(self) -> int:
        return self.n_samples

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        i = item_index(i, self.n_samples)
        image, mask = self._item(i)
        return {
            "x": self._normalise(image),                   # (3, H, W) float32
            "target": torch.tensor(i % self.num_classes),  # () int64
            "mask": mask.clone(),                          # (H, W) bool, not a view of the chunk
            "sample_id": torch.tensor(i),                  # () int64, the index within the split
        }

    def tensors(self) -> dict[str, Tensor]:
        """The whole split at once, for batching by slicing (the zoo trains on it): x (N, 3, H, W) float32
        normalised, target (N,) int64, mask (N, H, W) bool, sample_id (N,) int64; rendered now, not kept."""
        images = torch.empty(self.n_samples, *self.image_shape, dtype=torch.uint8)    # (N, 3, H, W)
        masks = torch.empty(self.n_samples, self.size, self.size, dtype=torch.bool)    # (N, H, W)
        for start in range(0, self.n_samples, _CHUNK):
            stop = min(start + _CHUNK, self.n_samples)
            images[start:stop], masks[start:stop] = self._rendered(start, stop)
        ids = torch.arange(self.n_samples, dtype=torch.int64)                          # (N,)
        return {"x": self._normalise(images), "target": ids % self.num_classes, "mask": masks, "sample_id": ids}

    def __repr__(self) -> str:
        return (
            f"Shapes(split={self.split!r}, n_samples={self.n_samples}, size={self.size}, "
            f"seed={self.seed}, distractors={self.distractors}"
            + (f", decoys={self.decoys}" if self.decoys else "")
            + (f", watermark=True, object_class={self.object_class!r}" if self.watermark else "")
            + (f", object_class={self.object_class!r}" if not self.watermark and self.object_class != "label" else "")
            + ")"
        )
