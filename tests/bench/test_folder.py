"""Datasets read from files (bench/data/folder.py): tiny files written here in each format, masks and
classes checked against values worked out by hand from the box / mask geometry."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from bench.config import CONF
from bench.data import VOC, Folder, ImageNetVal, write_example
from bench.report import load
from bench.run import run
from bench.zoo import load_model

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def _xml(path: Path, objects: list[tuple[str, int, int, int, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
                   f"<ymax>{d}</ymax></bndbox></object>" for n, a, b, c, d in objects)
    path.write_text(f"<annotation><size><width>40</width><height>20</height></size>{body}</annotation>")


def _image(value: int = 0) -> np.ndarray:
    """A 40 x 20 (w x h) RGB image whose column j holds j (red), row i holds i (green), blue = value."""
    out = np.zeros((20, 40, 3), dtype=np.uint8)
    out[..., 0], out[..., 1], out[..., 2] = np.arange(40)[None, :], np.arange(20)[:, None], value
    return out


# One object, 40 x 20 original: columns 4..11, rows 2..7 (0-based, inclusive). Resized to 20 x 20 ("stretch"),
# x scales by 1/2: edges x 4..12 -> 2..6, so columns 2..5 (centres 2.5..5.5); rows stay 2..7.
EXPECTED = torch.zeros(20, 20, dtype=torch.bool)
EXPECTED[2:8, 2:6] = True


def _folder(root: Path, kind: str) -> Path:
    for c, cls in enumerate(["b_class", "a_class"]):              # sorted: a_class = 0, b_class = 1
        for k in range(2):
            _png(root / "images" / cls / f"{k}.png", _image(10 * c + k))
            if kind == "masks":
                m = np.zeros((20, 40), dtype=np.uint8)
                m[2:8, 4:12] = 7                                    # any nonzero value is object
                _png(root / "masks" / cls / f"{k}.png", m)
            elif kind == "voc":
                _xml(root / "annotations" / cls / f"{k}.xml", [("x", 5, 3, 12, 8)])   # 1-based inclusive corners
    if kind == "coco":
        images = [{"id": i, "file_name": f"{cls}/{k}.png"} for i, (cls, k) in
                  enumerate((cls, k) for cls in ["a_class", "b_class"] for k in range(2))]
        annotations = [{"id": i, "image_id": i, "bbox": [4, 2, 8, 6]} for i in range(4)]   # x, y, w, h; edges 4..12
        (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


@pytest.mark.parametrize("kind", ["masks", "voc", "coco"])
def test_folder_masks_classes_and_order(tmp_path, kind):
    ds = Folder(root=str(_folder(tmp_path, kind)), size=20)
    t = ds.tensors()
    assert ds.classes == ("a_class", "b_class") and ds.num_classes == 2 and ds.ground_truth == kind
    assert t["target"].tolist() == [0, 1, 0, 1] and t["sample_id"].tolist() == [0, 1, 2, 3]   # classes interleaved
    assert all(torch.equal(m, EXPECTED) for m in t["mask"])
    # blue channel = 10 * (folder index before sorting: b_class = 0) + file index; a flat channel survives resizing
    blue = t["x"][:, 2] * STD[2] + MEAN[2]
    torch.testing.assert_close(blue, torch.tensor([10.0, 0.0, 11.0, 1.0])[:, None, None].expand(4, 20, 20) / 255)
    assert torch.equal(ds[1]["mask"], EXPECTED) and ds[1]["target"] == 1 and len(Folder(root=str(tmp_path), n_samples=3)) == 3


@pytest.mark.parametrize("mode", ["1", "L", "P", "I;16", "RGB", "RGBA", "LA"])
def test_folder_mask_png_modes(tmp_path, mode):
    # nonzero in any colour channel is object; an opaque alpha channel everywhere is not
    root = _folder(tmp_path, "masks")
    m = np.zeros((20, 40), dtype=np.uint8)
    m[2:8, 4:12] = 1
    channels = {"RGB": [m, 0 * m, 0 * m], "RGBA": [0 * m, 0 * m, m, 255 + 0 * m], "LA": [m, 255 + 0 * m]}
    image = (Image.fromarray(np.stack(channels[mode], axis=2), mode) if mode in channels else
             Image.fromarray(m * 255).convert("1") if mode == "1" else
             Image.fromarray(m.astype(np.uint16) * 300) if mode == "I;16" else Image.fromarray(m, mode))
    assert image.mode == mode
    for path in (root / "masks").rglob("*.png"):
        image.save(path)
    assert all(torch.equal(mask, EXPECTED) for mask in Folder(root=str(root), size=20).tensors()["mask"])


def test_folder_centre_crop_is_torchvisions_eval_geometry(tmp_path):
    # shorter side 20 -> scale 1, so the crop keeps columns 10..29 untouched: the box (cols 4..11) keeps cols 10, 11
    ds = Folder(root=str(_folder(tmp_path, "voc")), size=20, resize="centre_crop", mean=[0, 0, 0], std=[1, 1, 1])
    t = ds.tensors()
    expected = torch.zeros(20, 20, dtype=torch.bool)
    expected[2:8, 0:2] = True
    assert torch.equal(t["mask"][0], expected)
    original = torch.from_numpy(_image(10)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(t["x"][0], original[:, :, 10:30])       # a_class/0: blue 10, pixels not resampled


def test_folder_png_masks_match_boxes_at_any_scale(tmp_path):
    # one object written as a PNG mask, VOC XML and COCO boxes gives one mask, at any size and geometry
    roots = {kind: write_example(tmp_path / kind, kind, per_class=4) for kind in ("masks", "voc_xml", "coco")}
    for size, resize in ((24, "stretch"), (17, "stretch"), (30, "centre_crop")):
        masks = {k: Folder(root=str(r), size=size, resize=resize).tensors()["mask"] for k, r in roots.items()}
        assert masks["masks"].any() and torch.equal(masks["masks"], masks["voc_xml"])
        assert torch.equal(masks["masks"], masks["coco"])


def test_folder_splits_classes_and_errors(tmp_path):
    write_example(tmp_path / "train", "masks")
    write_example(tmp_path / "test", "masks", seed=1)
    (tmp_path / "test" / "images" / "plum").mkdir()                      # a class only one split has
    default = Folder(root=str(tmp_path), split="train")
    assert default.classes == ("apple", "pear", "plum") and default.tensors()["target"].tolist() == [0, 1] * 3
    ds = Folder(root=str(tmp_path), split="train", classes=["pear", "apple", "plum", "fig"])
    assert ds.num_classes == 4 and ds.tensors()["target"].tolist() == [0, 1] * 3     # interleaved in `classes` order
    assert torch.equal(ds[0]["x"], default[1]["x"])                                  # pear/001.png either way
    with pytest.raises(ValueError, match=r"has no val/images folder .* dataset.split="):
        Folder(root=str(tmp_path), split="val")
    with pytest.raises(ValueError, match=r"image folders \['plum'\] are not in classes"):
        Folder(root=str(tmp_path), classes=["apple", "pear"])
    single = write_example(tmp_path / "single", "masks")
    with pytest.raises(ValueError, match="single split .* served as split 'test', not 'train'"):
        Folder(root=str(single), split="train")
    with pytest.raises(ValueError, match="root '.*nowhere' does not exist .* set dataset.root="):
        Folder(root=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="needs a root folder; set dataset.root="):
        Folder(root="???")
    with pytest.raises(ValueError, match="no images/ folder under root"):
        Folder(root=str(tmp_path / "test" / "images"))
    (single / "annotations.json").write_text("{}")
    with pytest.raises(ValueError, match=r"several kinds of ground truth \(\['masks', 'coco'\]\).*ground_truth=masks"):
        Folder(root=str(single))
    with pytest.raises(ValueError, match=r"cannot read COCO boxes .*annotations.json \(KeyError: .images.\)"):
        Folder(root=str(single), ground_truth="coco")
    (single / "masks" / "pear" / "001.png").unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) have no masks ground truth: pear/001.png"):
        Folder(root=str(single), ground_truth="masks")
    for bad, message in (({"size": 8}, "size must be an integer >= 16"), ({"n_samples": 0}, "n_samples must be"),
                         ({"resize": "crop"}, "resize must be 'stretch' or 'centre_crop'"),
                         ({"std": [1, 0, 1]}, "std > 0"), ({"split": "dev"}, "split must be one of")):
        with pytest.raises(ValueError, match=message):
            Folder(root=str(tmp_path), **bad)


def test_folder_bad_files_are_named(tmp_path):
    root = _folder(tmp_path, "masks")
    _png(root / "masks" / "a_class" / "0.png", np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"mask .*a_class/0.png is 10x10 but its image .* is 40x20"):
        Folder(root=str(root), n_samples=1).tensors()
    xml = tmp_path / "x"
    _folder(xml, "voc")
    (xml / "annotations" / "a_class" / "0.xml").write_text("<annotation><object><name>x</name></object>")
    with pytest.raises(ValueError, match=r"cannot read boxes from .*a_class/0.xml .* Pascal VOC XML"):
        Folder(root=str(xml))


def _voc(root: Path, masks: dict[str, np.ndarray], boxes: dict[str, list]) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for stem, m in masks.items():
        _png(voc / "JPEGImages" / f"{stem}.jpg", _image())
        seg = Image.fromarray(m, "P")                                    # a palette PNG of class indices, as VOC's
        seg.putpalette([0, 0, 0, 128, 0, 0] * 128)
        (voc / "SegmentationClass").mkdir(exist_ok=True)
        seg.save(voc / "SegmentationClass" / f"{stem}.png")
        _xml(voc / "Annotations" / f"{stem}.xml", boxes[stem])
    for task in ("Segmentation", "Main"):
        (voc / "ImageSets" / task).mkdir(parents=True, exist_ok=True)
        (voc / "ImageSets" / task / "val.txt").write_text("\n".join(masks) + "\n")
        (voc / "ImageSets" / task / "train.txt").write_text("")
    return root


def test_voc_one_class_per_image(tmp_path):
    # image 1: cat (8) 30 px, person (15) 50 px in two parts, void (255) 100 px -> person, 0-based 14
    m1 = np.zeros((20, 40), dtype=np.uint8)
    m1[0:5, 0:6], m1[10:14, 30:35], m1[15:20, 0:20] = 15, 15, 255
    m1[6:11, 10:16] = 8
    # image 2: a tie, bird (3) and dog (12) 12 px each -> bird, the lower index
    m2 = np.zeros((20, 40), dtype=np.uint8)
    m2[0:3, 0:4], m2[10:13, 10:14] = 12, 3
    # detection (1-based inclusive corners): person boxes 6 x 5 and 2 x 2, cat 10 x 4 = 40 -> cat, 0-based 7;
    # image 2: bird 4 x 3 and dog 4 x 3 tie -> the first in the file, bird
    boxes = {"2008_000123": [("person", 1, 1, 6, 5), ("cat", 11, 7, 20, 10), ("person", 31, 11, 32, 12)],
             "2008_000007": [("bird", 11, 11, 14, 13), ("dog", 1, 1, 4, 3)]}
    root = _voc(tmp_path, {"2008_000123": m1, "2008_000007": m2}, boxes)
    seg = VOC(root=str(root), size=20, resize="centre_crop")            # scale 1, crop columns 10..29
    t = seg.tensors()
    assert t["target"].tolist() == [14, 2] and t["sample_id"].tolist() == [2008000123, 2008000007]
    assert seg.classes[14] == "person" and seg.num_classes == 20
    assert torch.equal(t["mask"][0], torch.from_numpy(m1[:, 10:30] == 15))   # person only, void excluded
    assert torch.equal(t["mask"][1], torch.from_numpy(m2[:, 10:30] == 3))
    det = VOC(root=str(root), size=20, resize="centre_crop", task="detection").tensors()
    assert det["target"].tolist() == [7, 2]
    expected = torch.zeros(20, 20, dtype=torch.bool)
    expected[6:10, 0:10] = True                                          # cat: cols 10..19 -> 0..9 after the crop
    assert torch.equal(det["mask"][0], expected)
    with pytest.raises(ValueError, match=r"no Pascal VOC 2012 segmentation val set under root .* VOCdevkit/VOC2012"):
        VOC(root=str(tmp_path / "VOCdevkit"))
    with pytest.raises(ValueError, match="no images found for split 'train'"):
        VOC(root=str(root), split="train")


def test_imagenet_val_boxes_synsets_and_ids(tmp_path):
    images, xmls = tmp_path / "val", tmp_path / "bbox"
    (tmp_path / "synsets.txt").write_text("n01440764 tench\nn01443537 goldfish\nn02012849 crane\n")
    for k, (synset, box) in enumerate([("n02012849", (4, 2, 11, 7)), ("n01440764", (0, 0, 1, 19))], start=41):
        _png(images / synset / f"ILSVRC2012_val_{k:08d}.png", _image())
        _xml(xmls / f"ILSVRC2012_val_{k:08d}.xml", [(synset, *box), ("n01443537", 30, 0, 39, 19)][: 1 + (k == 42)])
    ds = ImageNetVal(root=str(tmp_path), images="val", annotations="bbox", synsets="synsets.txt", size=20)
    t = ds.tensors()
    assert t["target"].tolist() == [2, 0] and t["sample_id"].tolist() == [41, 42] and ds.num_classes == 3
    assert torch.equal(t["mask"][0], EXPECTED)                          # 0-based corners 4..11 x 2..7
    expected = torch.zeros(20, 20, dtype=torch.bool)
    expected[:, 0] = True                                                # cols 0..1 -> edge 2 -> col 0; other synset out
    assert torch.equal(t["mask"][1], expected)
    with pytest.raises(ValueError, match="holds only validation images"):
        ImageNetVal(root=str(tmp_path), split="train")
    with pytest.raises(ValueError, match=r"no synset list .*LOC_synset_mapping.txt.* dataset.synsets="):
        ImageNetVal(root=str(tmp_path), images="val", annotations="bbox")
    with pytest.raises(ValueError, match=r"no folder .*images'; set dataset.images="):
        ImageNetVal(root=str(tmp_path), synsets="synsets.txt")
    (tmp_path / "synsets.txt").write_text("n01440764\n")
    with pytest.raises(ValueError, match="synset 'n02012849' is not in"):
        ImageNetVal(root=str(tmp_path), images="val", annotations="bbox", synsets="synsets.txt")
    (tmp_path / "synsets.txt").write_text("n01440764\nn01443537\nn02012849\n")
    _xml(xmls / "ILSVRC2012_val_00000001.xml", [("n01440764", 0, 0, 3, 3)])
    with pytest.raises(ValueError, match=r"1 image\(s\) have no image in .*val: ILSVRC2012_val_00000001"):
        ImageNetVal(root=str(tmp_path), images="val", annotations="bbox", synsets="synsets.txt")


def test_zoo_trains_and_evaluates_on_a_folder(tmp_path):
    """bench.zoo.load_model instantiates the dataset with split and n_samples overrides (n_train > files)."""
    write_example(tmp_path / "data" / "train", "masks", per_class=4)
    write_example(tmp_path / "data" / "test", "masks", seed=1)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.size=32",
                                           "model=small_cnn", "model.train.epochs=1", "model.train.n_train=100"])
    model, info = load_model(cfg.model, cfg.dataset, cache_dir=tmp_path / "cache")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2) and not info["cached"]


# ---- bad files and 16-bit images (bench/data/_images.py) -------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])                       # header and part of the pixel data


def _escape(path: Path) -> None:
    outside = path.parents[3] / "elsewhere.png"                    # next to the dataset root, not inside it
    _png(outside, _image(99))
    path.unlink()
    path.symlink_to(outside)


BAD_FILES = {   # case: (what to do to images/a_class/0.png or its mask, PIL pixel limit, the message)
    "truncated": (_truncate, None, r"cannot read image .*a_class/0.png: PNG data is truncated or corrupt .* "
                                   r"replace or remove the file"),
    "not_an_image": (lambda p: p.write_bytes(b"%!PS-Adobe-3.0 EPSF\n" + bytes(200)), None,
                     r"cannot read image .*a_class/0.png: not a PNG or JPEG image"),
    "directory": (lambda p: (p.unlink(), p.mkdir()), None, r"a_class/0.png is a directory, not a regular file; remove"),
    "symlink_outside": (_escape, None, r"a_class/0.png resolves \(through a symlink\) to .*elsewhere.png, which lies "
                                       r"outside the dataset root .*copy the file into the root"),
    "fifo": (lambda p: (p.unlink(), os.mkfifo(p)), None, r"a_class/0.png is a FIFO, not a regular file"),  # blocked
    "broken_symlink": (lambda p: (p.unlink(), p.symlink_to(p.parent / "gone.png")), None,
                       r"a_class/0.png does not exist \(a broken symlink\)"),
    "bomb_pil_refuses": (lambda p: None, 100, r"image .*a_class/0.png is too large to decode safely \(.*"
                                              r"decompression bomb.*\); downscale it"),
    "bomb_over_limit": (lambda p: None, 500, r"image .*a_class/0.png is 40x20 = 800 pixels, more than "
                                             r"PIL.Image.MAX_IMAGE_PIXELS = 500 .*downscale it"),
    "mask_truncated": (lambda p: _truncate(p.parents[2] / "masks" / "a_class" / "0.png"), None,
                       r"cannot read mask .*masks/a_class/0.png: PNG data is truncated"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_folder_bad_image_files_are_refused_by_name(tmp_path, monkeypatch, case):
    # each ended in a raw traceback (struct.error, UnidentifiedImageError, IsADirectoryError,
    # DecompressionBombError) or, for the symlink, read a file outside the root
    spoil, limit, message = BAD_FILES[case]
    root = _folder(tmp_path / "data", "masks")
    spoil(root / "images" / "a_class" / "0.png")
    if limit is not None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    ds = Folder(root=str(root), size=20)
    with pytest.raises(ValueError, match=message):
        ds.tensors()
    with pytest.raises(ValueError, match=message):
        ds[0]                                                       # the runner's path: one item at a time
    if limit is None:
        assert ds[1]["target"] == 1                                 # the other files are fine


def test_folder_follows_a_symlink_inside_the_root(tmp_path):
    root = _folder(tmp_path, "masks")
    _png(root / "shared" / "x.png", _image(77))
    link = root / "images" / "a_class" / "0.png"
    link.unlink()
    link.symlink_to(Path("..") / ".." / "shared" / "x.png")        # relative, stays inside the root
    x = Folder(root=str(root), size=20, mean=[0, 0, 0], std=[1, 1, 1])[0]["x"]
    torch.testing.assert_close(x[2], torch.full((20, 20), 77 / 255))


def test_folder_16_bit_images_are_scaled_by_their_bit_depth(tmp_path):
    # row i holds 3000 i + 7 (up to 57007): the image is stretched only across, so each row keeps its value;
    # read as 8-bit, 99.6 % of such a file's pixels were clipped to 255
    root = _folder(tmp_path, "masks")
    rows = (3000 * np.arange(20) + 7).astype(np.uint16)
    Image.fromarray(np.repeat(rows[:, None], 40, axis=1)).save(root / "images" / "a_class" / "0.png")
    assert Image.open(root / "images" / "a_class" / "0.png").mode == "I;16"
    ds = Folder(root=str(root), size=20, mean=[0, 0, 0], std=[1, 1, 1])
    expected = torch.from_numpy(rows / 65535).float()[None, :, None].expand(3, 20, 20)
    torch.testing.assert_close(ds.tensors()["x"][0], expected)
    torch.testing.assert_close(ds[0]["x"], expected)
    torch.testing.assert_close(ds.tensors()["x"][2, 2], torch.full((20, 20), 11 / 255))   # 8-bit a_class/1 as before


def test_16_bit_mode_i_is_scaled_and_checked():
    # older Pillow reads 16-bit grey PNGs as mode "I" (int32); values beyond 16 bits cannot come from a PNG
    from bench.data._images import rgb_resized

    v = np.array([[0, 65535], [32768, 1]], dtype=np.int32)
    out = rgb_resized(Image.fromarray(v, "I"), (2, 2), (0, 0, 2, 2), Path("x.png"))
    np.testing.assert_allclose(out[..., 0], v / 65535, rtol=1e-6)
    with pytest.raises(ValueError, match=r"x.png has I values in 0..70000, outside the 16-bit range"):
        rgb_resized(Image.fromarray(np.array([[0, 70000]], dtype=np.int32), "I"), (2, 1), (0, 0, 2, 1), Path("x.png"))


# ---- the content digest: cells keyed by the files' bytes -------------------------------------------
def test_content_digest_follows_the_bytes_and_caches_file_hashes(tmp_path, monkeypatch):
    import bench.data._images as images

    root, cache = write_example(tmp_path / "data", "masks"), tmp_path / "cache"
    monkeypatch.setattr(images, "RACY_NS", 50_000_000)              # files older than 50 ms are cached
    time.sleep(0.1)
    read = []
    sha = images._sha256
    monkeypatch.setattr(images, "_sha256", lambda f: read.append(f.name) or sha(f))
    first = Folder(root=str(root)).content_digest(cache_dir=cache)
    assert len(read) == 12                                          # 6 images, 6 masks
    assert Folder(root=str(root)).content_digest(cache_dir=cache) == first and len(read) == 12   # none re-read
    assert Folder(root=str(root)).content_digest() == first and len(read) == 24                  # no cache: all
    assert Folder(root=str(root), n_samples=3).content_digest(cache_dir=cache) != first         # other samples

    # a mask rewritten with other bytes of the same size, its mtime put back (as `cp -p` does): the ctime changed
    mask = root / "masks" / "apple" / "000.png"
    before, st = mask.read_bytes(), mask.stat()
    mask.write_bytes(before[:40] + bytes([before[40] ^ 1]) + before[41:])
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (mask.stat().st_size, mask.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    changed = Folder(root=str(root)).content_digest(cache_dir=cache)
    assert changed != first and len(read) == 25                     # that one file read again
    mask.write_bytes(before)
    assert Folder(root=str(root)).content_digest(cache_dir=cache) == first   # same bytes, same digest

    (cache / "content").mkdir(exist_ok=True)
    for f in (cache / "content").iterdir():
        f.write_text("{not json")                                   # a damaged cache is ignored, then rewritten
    assert Folder(root=str(root)).content_digest(cache_dir=cache) == first


def _cells(out: Path) -> dict[str, float]:
    """sample_id, method -> pointing-game hit, from whatever run folders the runner made below `out`."""
    s = load(out).scores
    return {(int(r.sample_id), r.method): float(r.value) for r in s[s.score == "hit"].itertuples()}


def test_run_recomputes_cells_when_folder_files_change(tmp_path, caplog):
    # the hostile probe: files replaced under the same names gave the old cells (pointing game 0.333, fresh 1.0)
    write_example(tmp_path / "data" / "train", "masks", per_class=4)
    test = write_example(tmp_path / "data" / "test", "masks", seed=1)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[
            "dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.size=32", "dataset.n_samples=null",
            "model=small_cnn", "model.net.width=4", "model.train.epochs=1", "model.train.n_train=8",
            "model.train.n_test=6", "method=[random,edge]", "metric=[pointing_game]", "batch_size=4",
            f"cache_dir={tmp_path / 'cache'}"])
    torch.set_num_threads(1)
    first = run(cfg, out_dir=tmp_path / "out")
    old = _cells(tmp_path / "out")

    mask = test / "masks" / "apple" / "000.png"
    Image.fromarray(255 - np.asarray(Image.open(mask))).save(mask)        # sample 0: object and background swap
    image = np.asarray(Image.open(test / "images" / "pear" / "001.png"))
    inside = np.asarray(Image.open(test / "masks" / "pear" / "001.png")) > 0
    Image.fromarray(np.where(inside[..., None], image, 128).astype(np.uint8)).save(test / "images" / "pear" / "001.png")
    with caplog.at_level(logging.INFO, logger="bench.run"):
        again = run(cfg, out_dir=tmp_path / "out")
    fresh = run(cfg, out_dir=tmp_path / "fresh")
    assert _cells(tmp_path / "out") == _cells(tmp_path / "fresh")          # the fresh scores, not the old ones
    assert _cells(tmp_path / "fresh")[0, "random"] == 1.0 - old[0, "random"]    # its one maximum: in or out
    assert _cells(tmp_path / "fresh")[1, "edge"] != old[1, "edge"]          # the edges now lie in the object
    assert first["skipped"] == again["skipped"] == 0 and "data changed since the previous run" in caplog.text
    manifest = json.loads(next((tmp_path / "out").rglob("manifest.json")).read_text())
    assert manifest["keys"]["content"] == again["keys"]["content"] == fresh["keys"]["content"]
    assert first["keys"]["content"] != again["keys"]["content"]
    assert run(cfg, out_dir=tmp_path / "out")["skipped"] == 2              # unchanged data: cells reused


def test_run_refuses_a_truncated_image_by_name(tmp_path):
    root = write_example(tmp_path / "data", "masks")
    _truncate(root / "images" / "pear" / "003.png")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["dataset=folder", f"dataset.root={root}", "dataset.size=32",
                                           "method=[random]", "metric=[pointing_game]", f"cache_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"cannot read image .*pear/003.png: PNG data is truncated"):
        run(cfg, out_dir=tmp_path / "out")


@pytest.mark.parametrize("kind", ["voc", "imagenet_val"])
def test_content_digest_of_voc_and_imagenet_follows_image_bytes(tmp_path, kind):
    root = write_example(tmp_path / "data", kind)
    make = (lambda **kw: VOC(root=str(root), split="val", **kw)) if kind == "voc" else \
        (lambda **kw: ImageNetVal(root=str(root), **kw))
    first = make().content_digest()
    image = sorted(p for p in root.rglob("*") if p.suffix in (".jpg", ".JPEG"))[-1]
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image, format="JPEG")
    assert make().content_digest() != first
    if kind == "imagenet_val":                                      # a configured folder may lie outside the root
        outside = tmp_path / "elsewhere"
        (root / "images").rename(outside)
        assert make(images=str(outside)).tensors()["x"].shape == (9, 3, 224, 224)
