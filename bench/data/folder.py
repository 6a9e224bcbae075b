"""`folder`: your own images with masks or boxes (bench/data/_files.py says how files are read)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from bench.data._files import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, SPLITS, Resize, _Files, _Item, _missing, _root
from bench.data._images import Box, open_file, resolve_roots, xml_objects

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
