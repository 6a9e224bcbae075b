"""Tiny datasets in each file format the suite reads, for tests and first tries."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from bench.data._files import VOC_CLASSES

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
