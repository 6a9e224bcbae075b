"""Datasets read from local files, with object masks or boxes: `folder`, `voc`, `imagenet_val`.

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

from bench.data._images import Box, file_hashes, load_image, open_file, resolve_roots, rgb_resized, xml_objects
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


class Folder(_Files):
    """Your own data: root/images/<class>/<file>.(png|jpg) with ground truth next to it.

    Ground truth (`ground_truth`, "auto" picks the one present): "masks" =
    root/masks/<class>/<stem>.png, nonzero = object; "voc" = root/annotations/<class>/<stem>.xml,
    Pascal VOC boxes (1-based inclusive corners), every box of the file in the mask; "coco" =
    root/annotations.json with COCO `images` (file_name relative to images/) and `annotations`
    (bbox [x, y, w, h]), every box of the image in the mask. Class = index of the sub-folder in
    `classes` (default: the sorted sub-folder names of every split). Splits: root/<split>/images/...
    when root has split folders; a root with images/ directly is the single split "test".
    Order: classes interleaved (1st file of every class, then the 2nd, ...; files sorted by
    name), so the first n are balanced; sample_id = position in this order.
    """

    def __init__(
        self, *, root: str, name: str = "folder", split: str = "test", n_samples: int | None = None,
        size: int = 224, ground_truth: Literal["auto", "masks", "voc", "coco"] = "auto",
        classes: Sequence[str] | None = None, resize: Resize = "stretch",
        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(name=name, split=split, n_samples=n_samples, size=size, resize=resize, mean=mean, std=std)
        self.root = _root(root, name)
        self._roots = resolve_roots(self.root)
        split_dirs = [self.root / s for s in SPLITS if (self.root / s / "images").is_dir()]
        if split_dirs:
            base = self.root / split
            if not (base / "images").is_dir():
                raise ValueError(f"{self.root} has no {split}/images folder (found {[p.name for p in split_dirs]}); "
                                 f"choose one with dataset.split=...")
        elif (self.root / "images").is_dir():
            if split != "test":
                raise ValueError(f"{self.root} has a single split (images/ directly), served as split 'test', not "
                                 f"{split!r}; to train a zoo model on your data lay it out as root/train/images/..., "
                                 f"root/test/images/..., or evaluate a pretrained model")
            base = self.root
        else:
            raise ValueError(f"no images/ folder under root {str(self.root)!r}; expected root/images/<class>/<file>.png "
                             f"(or root/<split>/images/...); set dataset.root=...")
        found = sorted({p.name for d in (split_dirs or [self.root]) for p in (d / "images").iterdir() if p.is_dir()})
        self.classes = tuple(classes) if classes is not None else tuple(found)
        if not self.classes:
            raise ValueError(f"{base / 'images'} has no class sub-folders; put each image in images/<class>/")
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise ValueError(f"image folders {unknown} are not in classes={list(self.classes)}; add them or remove classes=")

        per_class = [sorted(p for p in (base / "images" / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                     if (base / "images" / c).is_dir() else [] for c in self.classes]
        order = [(c, files[k]) for k in range(max(map(len, per_class), default=0))
                 for c, files in enumerate(per_class) if k < len(files)]          # interleaved classes
        self.ground_truth = self._kind(base, ground_truth)
        if self.ground_truth == "coco":
            boxes = self._coco(base / "annotations.json", self._roots)
        items, missing = [], []
        for i, (c, path) in enumerate(order[:n_samples]):
            rel = path.relative_to(base / "images").as_posix()
            if self.ground_truth == "masks":
                mask = base / "masks" / self.classes[c] / f"{path.stem}.png"
                items.append(_Item(path, c, i, mask=mask))
                ok = mask.is_file()
            elif self.ground_truth == "voc":
                xml = base / "annotations" / self.classes[c] / f"{path.stem}.xml"
                ok = xml.is_file()
                items.append(_Item(path, c, i, boxes=tuple(b for _, b in xml_objects(xml, 1, self._roots)) if ok else ()))
                ok = ok and bool(items[-1].boxes)
            else:
                items.append(_Item(path, c, i, boxes=tuple(boxes.get(rel, ()))))
                ok = bool(items[-1].boxes)
            if not ok:
                missing.append(rel)
        if missing:
            raise _missing(f"{self.ground_truth} ground truth", missing)
        self._take(items)

    @staticmethod
    def _kind(base: Path, ground_truth: str) -> str:
        present = {"masks": (base / "masks").is_dir(), "voc": (base / "annotations").is_dir(),
                   "coco": (base / "annotations.json").is_file()}
        if ground_truth != "auto":
            if ground_truth not in present:
                raise ValueError(f"ground_truth must be one of auto, masks, voc, coco; got {ground_truth!r}")
            return ground_truth
        found = [k for k, ok in present.items() if ok]
        if len(found) != 1:
            raise ValueError(f"{base} has {'no' if not found else 'several kinds of'} ground truth ({found}): expected "
                             "one of masks/<class>/<stem>.png, annotations/<class>/<stem>.xml, annotations.json; "
                             "set dataset.ground_truth=masks|voc|coco")
        return found[0]

    @staticmethod
    def _coco(path: Path, roots: Sequence[Path]) -> dict[str, list[Box]]:
        """file_name -> boxes as edges, from a COCO-style JSON (bbox = [x, y, width, height], 0-based)."""
        with open_file(path, roots) as f:
            text = f.read()
        try:
            data = json.loads(text)
            names = {im["id"]: im["file_name"] for im in data["images"]}
            out: dict[str, list[Box]] = {}
            for ann in data["annotations"]:
                x, y, w, h = (float(v) for v in ann["bbox"])
                out.setdefault(names[ann["image_id"]], []).append((x, y, x + w, y + h))
        except Exception as e:                               # noqa: BLE001 - any malformed file
            raise ValueError(f"cannot read COCO boxes from {path} ({type(e).__name__}: {e}); expected "
                             '{"images": [{"id", "file_name"}], "annotations": [{"image_id", "bbox"}]}') from e
        return out


class VOC(_Files):
    """Pascal VOC from a local root (the folder holding VOCdevkit/), read through torchvision's lists.

    task="segmentation" (VOCSegmentation, SegmentationClass PNGs): the image's class is the
    class with the most labelled pixels, the mask all pixels of that class (void 255 excluded).
    task="detection" (VOCDetection, Annotations XML): the class of the largest box, the mask
    the union of all boxes of that class (difficult ones included). Ties: the lower class index
    (segmentation) or the first object in the file (detection). Classes: VOC's 20, target
    0..19. Splits: train, val; test = val (VOC2012's test annotations are not public),
    VOC2007's own test set when year="2007". sample_id: the file name's digits (2007_000032 ->
    2007000032). Order: torchvision's (the ImageSets list).
    """

    classes = VOC_CLASSES

    def __init__(
        self, *, root: str, name: str = "voc", split: str = "test", n_samples: int | None = None, size: int = 224,
        year: str = "2012", task: Literal["segmentation", "detection"] = "segmentation",
        resize: Resize = "stretch", mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        from torchvision.datasets import VOCDetection, VOCSegmentation

        super().__init__(name=name, split=split, n_samples=n_samples, size=size, resize=resize, mean=mean, std=std)
        self.root = _root(root, name)
        self._roots = resolve_roots(self.root)
        if task not in ("segmentation", "detection"):
            raise ValueError(f"task must be 'segmentation' or 'detection', got {task!r}")
        self.year, self.task = str(year), task
        image_set = {"train": "train", "val": "val", "test": "test" if self.year == "2007" else "val"}[split]
        cls = VOCSegmentation if task == "segmentation" else VOCDetection
        try:
            voc = cls(str(self.root), year=self.year, image_set=image_set, download=False)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"no Pascal VOC {self.year} {task} {image_set} set under root {str(self.root)!r} ({e}); "
                             f"root must hold VOCdevkit/VOC{self.year}/ as extracted from the VOC tar; "
                             "set dataset.root=...") from e
        except ValueError as e:                              # torchvision's check of year / image_set
            raise ValueError(f"{name}: {e}") from e
        stems = [Path(p).stem for p in voc.images]
        ids = _digits_ids(stems, r"^(\d+)_?(\d*)$")
        items, missing = [], []
        for image, target, sample_id in list(zip(voc.images, voc.targets, ids))[:n_samples]:
            if not (Path(image).is_file() and Path(target).is_file()):
                missing.append(Path(image).name)
                continue
            if task == "segmentation":
                f = load_image(Path(target), self._roots, "mask")
                if f.mode not in ("P", "L"):
                    raise ValueError(f"{target} is a {f.mode} image; VOC masks are palette PNGs of class indices")
                counts = np.bincount(np.asarray(f).ravel(), minlength=256)[1:len(VOC_CLASSES) + 1]
                if not counts.any():
                    raise ValueError(f"{target} labels no object pixel; cannot choose the image's class")
                c = int(counts.argmax())                                     # first maximum: lower index wins ties
                items.append(_Item(Path(image), c, sample_id, mask=Path(target), value=c + 1))
            else:
                objects = [(n, b) for n, b in xml_objects(Path(target), 1, self._roots) if n in VOC_CLASSES]
                if not objects:
                    raise ValueError(f"{target} has no object of VOC's 20 classes; cannot choose the image's class")
                areas = [(b[2] - b[0]) * (b[3] - b[1]) for _, b in objects]
                label = objects[areas.index(max(areas))][0]                  # first largest box
                items.append(_Item(Path(image), VOC_CLASSES.index(label), sample_id,
                                   boxes=tuple(b for n, b in objects if n == label)))
        if missing:
            raise _missing("file (image or annotation) on disk", missing)
        self._take(items)


class ImageNetVal(_Files):
    """ImageNet (ILSVRC2012) validation images with their bounding-box XML files, from a local root.

    root/<annotations>/**/<stem>.xml (ILSVRC2012_bbox_val_v3) pairs with root/<images>/**/<stem>.JPEG
    (flat or in synset folders). The class is the synset of the file's first object; the mask
    is the union of that synset's boxes (ImageNet's corners: 0-based inclusive pixels). The
    class index is the synset's line in `synsets` (default LOC_synset_mapping.txt in root: the
    1000 synsets sorted, the order of torchvision's ImageNet weights; a line is a wnid, then
    anything). Only split "val" ("test" reads the same images: they are the evaluation set).
    Order: XML files sorted by name; sample_id: the number in the name (..._00000042 -> 42).
    """

    splits = ("val", "test")

    def __init__(
        self, *, root: str, name: str = "imagenet_val", split: str = "val", n_samples: int | None = None,
        size: int = 224, images: str = "images", annotations: str = "annotations",
        synsets: str = "LOC_synset_mapping.txt", resize: Resize = "stretch",
        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if split == "train":
            raise ValueError("imagenet_val holds only validation images: a zoo model cannot be trained on it; "
                             "evaluate a pretrained model (e.g. torchvision weights) with split=val")
        super().__init__(name=name, split=split, n_samples=n_samples, size=size, resize=resize, mean=mean, std=std)
        self.root = _root(root, name)
        image_dir, xml_dir, synset_file = self.root / images, self.root / annotations, self.root / synsets
        self._roots = resolve_roots(self.root, image_dir, xml_dir)      # images=/annotations= may lie elsewhere
        for path, key in ((image_dir, "images"), (xml_dir, "annotations")):
            if not path.is_dir():
                raise ValueError(f"no folder {str(path)!r}; set dataset.{key}= to its path relative to root")
        if not synset_file.is_file():
            raise ValueError(f"no synset list {str(synset_file)!r}: the class index of a synset is its line there "
                             "(LOC_synset_mapping.txt: the 1000 sorted wnids); set dataset.synsets=PATH")
        self.classes = tuple(line.split()[0] for line in synset_file.read_text().splitlines() if line.strip())
        index = {s: i for i, s in enumerate(self.classes)}
        xmls = sorted(xml_dir.rglob("*.xml"), key=lambda p: p.name)
        files = {p.stem: p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
        ids = _digits_ids([p.stem for p in xmls], r"(\d+)$")
        items, missing = [], []
        for xml, sample_id in list(zip(xmls, ids))[:n_samples]:
            if xml.stem not in files:
                missing.append(xml.stem)
                continue
            objects = xml_objects(xml, 0, self._roots)
            if not objects:
                raise ValueError(f"{xml} has no <object>; cannot tell the image's class")
            synset = objects[0][0]
            if synset not in index:
                raise ValueError(f"{xml}: synset {synset!r} is not in {synset_file}")
            items.append(_Item(files[xml.stem], index[synset], sample_id,
                               boxes=tuple(b for n, b in objects if n == synset)))
        if missing:
            raise _missing(f"image in {image_dir}", missing)
        self._take(items)


def write_example(
    root: str | Path, kind: Literal["masks", "voc_xml", "coco", "voc", "imagenet_val"], *, per_class: int = 3,
    width: int = 48, height: int = 36, seed: int = 0,
) -> Path:
    """Write a tiny dataset in one of the formats read here, for tests and first tries; returns root.

    Two classes (three for "voc" and "imagenet_val"), `per_class` images each: noise with one
    flat rectangle, the class object; its ground truth is that rectangle ("masks": folder
    PNG masks; "voc_xml" / "coco": folder boxes; "voc": VOCdevkit/VOC2012 with segmentation
    PNGs, XML and train/val lists; "imagenet_val": images/, annotations/, synset list).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = {"voc": ("cat", "dog", "person"), "imagenet_val": ("n01440764", "n01443537", "n01484850")}.get(
        kind, ("apple", "pear"))
    if kind not in ("masks", "voc_xml", "coco", "voc", "imagenet_val"):
        raise ValueError(f"kind must be one of masks, voc_xml, coco, voc, imagenet_val; got {kind!r}")
    voc = root / "VOCdevkit" / "VOC2012"
    coco: dict[str, list] = {"images": [], "annotations": []}
    stems = []
    for k in range(per_class * len(names)):
        c, name = k % len(names), names[k % len(names)]
        w, h = int(rng.integers(width // 4, width // 2)), int(rng.integers(height // 4, height // 2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))   # object: pixels x..x+w-1, y..y+h-1
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image[y:y + h, x:x + w] = (60 + 80 * c, 200, 255 - 80 * c)
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[y:y + h, x:x + w] = 255
        stem = f"2012_{k:06d}" if kind == "voc" else f"ILSVRC2012_val_{k + 1:08d}" if kind == "imagenet_val" else f"{k:03d}"
        origin = 0 if kind == "imagenet_val" else 1                                 # inclusive corners
        xml = (f"<annotation><filename>{stem}</filename><size><width>{width}</width><height>{height}</height>"
               f"<depth>3</depth></size><object><name>{name}</name><difficult>0</difficult><bndbox>"
               f"<xmin>{x + origin}</xmin><ymin>{y + origin}</ymin><xmax>{x + w - 1 + origin}</xmax>"
               f"<ymax>{y + h - 1 + origin}</ymax></bndbox></object></annotation>")
        files: dict[Path, object] = {}
        if kind in ("masks", "voc_xml", "coco"):
            files[root / "images" / name / f"{stem}.png"] = Image.fromarray(image)
            if kind == "masks":
                files[root / "masks" / name / f"{stem}.png"] = Image.fromarray(mask)
            elif kind == "voc_xml":
                files[root / "annotations" / name / f"{stem}.xml"] = xml
            coco["images"].append({"id": k, "file_name": f"{name}/{stem}.png", "width": width, "height": height})
            coco["annotations"].append({"id": k, "image_id": k, "bbox": [x, y, w, h], "category_id": c})
        elif kind == "voc":
            segmentation = Image.fromarray(np.where(mask > 0, VOC_CLASSES.index(name) + 1, 0).astype(np.uint8), "P")
            segmentation.putpalette([0, 0, 0] + [128, 0, 0] * 255)
            files[voc / "JPEGImages" / f"{stem}.jpg"] = Image.fromarray(image)
            files[voc / "SegmentationClass" / f"{stem}.png"] = segmentation
            files[voc / "Annotations" / f"{stem}.xml"] = xml
        else:
            files[root / "images" / f"{stem}.JPEG"] = Image.fromarray(image)
            files[root / "annotations" / f"{stem}.xml"] = xml
        for path, content in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content) if isinstance(content, str) else content.save(path)
        stems.append(stem)
    if kind == "coco":
        (root / "annotations.json").write_text(json.dumps(coco))
    if kind == "voc":
        for task in ("Segmentation", "Main"):
            (voc / "ImageSets" / task).mkdir(parents=True, exist_ok=True)
            for split, part in (("train", stems[: len(stems) // 2]), ("val", stems[len(stems) // 2:])):
                (voc / "ImageSets" / task / f"{split}.txt").write_text("\n".join(part) + "\n")
    if kind == "imagenet_val":
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{s} class {i}\n" for i, s in enumerate(names)))
    return root
