"""What the datasets read from local files share (`folder`, `voc`, `imagenet_val`: bench/data/folder.py,
bench/data/voc.py): options, items, loading, normalisation.

Each behaves like `Shapes` for the runner: `tensors()` gives x (N, 3, S, S) float32
normalised, target (N,) int64, mask (N, S, S) bool and a stable sample_id (N,) int64;
`n_samples` takes the first n items of a fixed order (all of them when fewer exist).
Nothing is downloaded. Geometry (`resize`): "stretch" resizes the whole image to S x S,
so every object pixel stays in view; "centre_crop" resizes the shorter side to S and
crops the centre (torchvision's evaluation transform; a cropped-out object gives an
empty mask, scored NaN). Images are resized bilinearly with antialiasing (PIL), masks
by nearest neighbour (PIL); a box becomes the pixels of the original image whose centres
lie inside it, and is then resized as a mask, so boxes and PNG masks of one object agree.
Files are read as bench/data/_images.py says: PNG or JPEG, inside the dataset's root (symlinks
followed only there), under PIL's pixel limit, decoded in full; a bad file is a ValueError naming
it, never skipped (a silently smaller sample set would change every mean). 16-bit grey images are
scaled by 65535. `content_digest()` hashes the files' bytes for the runner's cell keys.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from bench.data._images import Box, file_hashes, load_image, rgb_resized
from bench.data._index import item_index

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)                     # the normalisation of torchvision's ImageNet weights
IMAGENET_STD = (0.229, 0.224, 0.225)
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)                                                        # VOC's class indices 1..20, in order
SPLITS = ("train", "val", "test")
Resize = Literal["stretch", "centre_crop"]


@dataclass(frozen=True)
class _Item:
    image: Path
    target: int
    sample_id: int
    mask: Path | None = None                              # PNG: object = pixels != 0, or == value
    value: int | None = None
    boxes: tuple[Box, ...] = ()


def _root(root: object, name: str) -> Path:
    if root is None or str(root) in ("", "???"):
        raise ValueError(f"{name} needs a root folder; set dataset.root=/path/to/data")
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise ValueError(f"root {str(path)!r} does not exist or is not a folder; set dataset.root=/path/to/data")
    return path


def _geometry(w: int, h: int, size: int, resize: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized width, height), (left, top) of the S x S crop, as torchvision's Resize + CenterCrop."""
    if resize == "stretch":
        return (size, size), (0, 0)
    s = size / min(w, h)
    W, H = max(size, round(w * s)), max(size, round(h * s))
    return (W, H), (round((W - size) / 2), round((H - size) / 2))


def _box_mask(boxes: Sequence[Box], w: int, h: int) -> np.ndarray:
    """Union of boxes (edges in pixels) as the (h, w) pixels whose centres they contain."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)                      # (K, 4)
    cx, cy = np.arange(w) + 0.5, np.arange(h) + 0.5                             # pixel centres
    inx = (cx >= b[:, 0:1]) & (cx < b[:, 2:3])                                  # (K, w)
    iny = (cy >= b[:, 1:2]) & (cy < b[:, 3:4])                                  # (K, h)
    return (iny[:, :, None] & inx[:, None, :]).any(axis=0)                      # (h, w)


def _digits_ids(stems: Sequence[str], pattern: str) -> list[int]:
    """Stable ids: the integer `pattern` captures in each file stem when all parse and are unique, else positions."""
    found = [re.search(pattern, s) for s in stems]
    ids = [int("".join(m.groups())) if m else -1 for m in found]
    return ids if all(m for m in found) and len(set(ids)) == len(ids) else list(range(len(stems)))


def _missing(what: str, paths: list[str]) -> ValueError:
    shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return ValueError(f"{len(paths)} image(s) have no {what}: {shown}")


class _Files(Dataset[dict[str, Tensor]]):
    """Common part: check options, load an item (image + mask at S x S), normalise, batch."""

    classes: tuple[str, ...]
    has_masks: bool = True
    splits: tuple[str, ...] = SPLITS

    def __init__(self, *, name: str, split: str, n_samples: int | None, size: int, resize: str,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        if split not in self.splits:
            raise ValueError(f"split must be one of {list(self.splits)} for {name}, got {split!r}")
        if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
            raise ValueError(f"n_samples must be an integer >= 1 (or null for all), got {n_samples!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 16:
            raise ValueError(f"size must be an integer >= 16 (pixels per side), got {size!r}")
        if resize not in ("stretch", "centre_crop"):
            raise ValueError(f"resize must be 'stretch' or 'centre_crop', got {resize!r}")
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            raise ValueError(f"mean and std must be 3 numbers each (RGB), std > 0; got mean={mean}, std={std}")
        self.name, self.split, self.size, self.resize = name, split, size, resize
        self.mean, self.std = mean, std
        self.image_shape = (3, size, size)
        self._limit = n_samples
        self._items: list[_Item] = []
        self._roots: tuple[Path, ...] = ()                # what may be read: see bench/data/_images.py
        self._store: dict[str, Tensor] | None = None

    def _take(self, items: list[_Item]) -> None:
        if not items:
            raise ValueError(f"{self.name}: no images found for split {self.split!r}")
        self._items = items[: self._limit]
        self.n_samples = len(self._items)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def content_digest(self, *, cache_dir: str | Path | None = None) -> str:
        """sha256 over every item's image and mask bytes, target, sample_id and boxes: the runner puts it in
        every cell key, so replacing a file under the same name recomputes its cells. File hashes are cached
        under cache_dir/content/ by (size, mtime_ns, ctime_ns, inode): a second run reads no unchanged file."""
        paths = sorted({p for it in self._items for p in (it.image, it.mask) if p is not None})
        hashes = file_hashes(paths, self._roots, cache_dir)
        h = hashlib.sha256()
        for it in self._items:
            h.update(json.dumps([hashes[it.image], hashes.get(it.mask), it.target, it.sample_id, it.value,
                                 it.boxes]).encode())
        return h.hexdigest()[:16]

    def _load(self, item: _Item) -> tuple[Tensor, Tensor]:
        """One item: image (3, S, S) uint8 (float32 in [0, 1] from a 16-bit file), mask bool (S, S)."""
        image = load_image(item.image, self._roots)
        w, h = image.size
        (W, H), (left, top) = _geometry(w, h, self.size, self.resize)
        crop = (left, top, left + self.size, top + self.size)
        pixels = rgb_resized(image, (W, H), crop, item.image)                                   # (S, S, 3)
        if item.mask is not None:
            f = load_image(item.mask, self._roots, "mask")
            if f.size != (w, h):
                raise ValueError(f"mask {item.mask} is {f.size[0]}x{f.size[1]} but its image {item.image} "
                                 f"is {w}x{h}; a mask must have its image's size")
            m = np.asarray(f)
            m = m[..., :-1] if f.mode in ("LA", "RGBA", "La", "RGBa") else m                      # drop alpha
            m = (m != 0) if item.value is None else (m == item.value)
            m = m.any(axis=2) if m.ndim == 3 else m                                              # (h, w)
        else:
            m = _box_mask(item.boxes, w, h)
        m = np.asarray(Image.fromarray(m.astype(np.uint8)).resize((W, H), Image.NEAREST).crop(crop)) > 0
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1), torch.from_numpy(m)

    def _normalise(self, image: Tensor) -> Tensor:
        """uint8 (..., 3, H, W) or float32 in [0, 1] -> float32, (image in [0, 1] - mean) / std."""
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        return ((image.to(torch.float32) / 255.0 if image.dtype == torch.uint8 else image) - mean) / std

    def _all(self) -> dict[str, Tensor]:
        if self._store is None:
            loaded = [self._load(item) for item in self._items]        # file reads: one item at a time
            images = [image for image, _ in loaded]
            if len({image.dtype for image in images}) > 1:             # some 16-bit files: all as float in [0, 1]
                images = [image.to(torch.float32) / 255.0 if image.dtype == torch.uint8 else image for image in images]
            self._store = {
                "image": torch.stack(images),                           # (N, 3, S, S) uint8 (float32: 16-bit files)
                "mask": torch.stack([mask for _, mask in loaded]),                        # (N, S, S) bool
                "target": torch.tensor([it.target for it in self._items], dtype=torch.int64),
                "sample_id": torch.tensor([it.sample_id for it in self._items], dtype=torch.int64),
            }
        return self._store

    def __len__(self) -> int:
        return self.n_samples

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        i = item_index(i, self.n_samples)
        item = self._items[i]
        image, mask = self._load(item) if self._store is None else (self._store["image"][i], self._store["mask"][i])
        return {"x": self._normalise(image), "target": torch.tensor(item.target), "mask": mask.clone(),
                "sample_id": torch.tensor(item.sample_id)}

    def tensors(self) -> dict[str, Tensor]:
        """The whole split at once: x (N, 3, S, S) float32 normalised, target (N,) int64,
        mask (N, S, S) bool, sample_id (N,) int64. Files are read once and kept as uint8."""
        store = self._all()
        return {"x": self._normalise(store["image"]), "target": store["target"].clone(),
                "mask": store["mask"].clone(), "sample_id": store["sample_id"].clone()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n_samples={self.n_samples}, "
                f"size={self.size}, resize={self.resize!r})")
