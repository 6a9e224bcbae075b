"""`voc` and `imagenet_val`: Pascal VOC and ImageNet validation images with their own annotation files, from a
local root (bench/data/_files.py says how files are read)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from bench.data._files import (IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, VOC_CLASSES, Resize, _digits_ids, _Files,
                               _Item, _missing, _root)
from bench.data._images import load_image, resolve_roots, xml_objects

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
