"""Datasets with ground truth beyond the plain `shapes`: the `shapes_multi` variant (decoy objects)."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bench.config import CONF
from bench.data import Shapes, render_shapes_item
from bench.data.shapes import _render


pytestmark = pytest.mark.usefixtures("one_thread")


def test_decoys_only_add_their_own_pixels():
    plain, multi = _render(0, "test", range(24), 64, 1), _render(0, "test", range(24), 64, 1, 2)
    assert torch.equal(plain["mask"], multi["mask"]) and torch.equal(plain["label"], multi["label"])
    decoy = multi["decoy_mask"]                                              # (N, H, W)
    assert not (decoy & multi["mask"]).any() and plain["decoy_mask"].sum() == 0
    outside = ~decoy[:, None].expand_as(plain["image"])
    assert torch.equal(plain["image"][outside], multi["image"][outside])    # background, bar, object unchanged
    # two object-sized decoys per image, mostly visible: at least one class object's worth of pixels
    assert (decoy.sum(dim=(1, 2)) >= 0.8 * multi["mask"].sum(dim=(1, 2))).float().mean() >= 0.9


def test_shapes_multi_config_and_items():
    cfg = OmegaConf.load(CONF / "dataset" / "shapes_multi.yaml")
    ds = instantiate(cfg, n_samples=12)
    assert isinstance(ds, Shapes) and ds.name == "shapes_multi" and ds.decoys == 2 and len(ds) == 12
    t = ds.tensors()
    plain = Shapes(n_samples=12).tensors()
    assert torch.equal(t["mask"], plain["mask"]) and torch.equal(t["target"], plain["target"])
    assert not torch.equal(t["x"], plain["x"])
    image, mask, label = render_shapes_item(seed=0, split="test", index=5, decoys=2)   # alone == batched
    assert torch.equal(ds[5]["x"], (image.float() / 255 - 0.5) / 0.25) and torch.equal(ds[5]["mask"], mask)
    with pytest.raises(ValueError, match="decoys must be an integer >= 0, got -1"):
        Shapes(decoys=-1)
    with pytest.raises(ValueError, match="split must be one of"):
        Shapes(decoys=2, split="validation")
