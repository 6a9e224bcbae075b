"""shapes_mosaic: deterministic 2x2 mosaics of `shapes` items, target quadrants in the mask, streamed per item,
classified by the zoo models trained on `shapes`."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.config import CONF
from bench.data import CLASSES, Shapes, ShapesMosaic
from bench.zoo import load_model
from bench.zoo.train import cache_key
from metrics import focus


def _quadrants(x: torch.Tensor, S: int) -> list[torch.Tensor]:
    """(..., 2S, 2S) -> the four quadrants, top-left, top-right, bottom-left, bottom-right."""
    return [x[..., r * S:(r + 1) * S, c * S:(c + 1) * S] for r in (0, 1) for c in (0, 1)]


def test_items_are_shapes_tiles_with_target_quadrants_in_the_mask():
    S, n = 16, 9
    ds = ShapesMosaic(n_samples=n, size=S, seed=3, split="val")
    plans = [ds.plan(i) for i in range(n)]
    tiles = torch.stack([p["tiles"] for p in plans])                      # (n, 4)
    shapes = Shapes(n_samples=int(tiles.max()) + 1, size=S, seed=3, split="val").tensors()
    for i, plan in enumerate(plans):
        item = ds[i]
        assert item["x"].shape == (3, 2 * S, 2 * S) and item["x"].dtype == torch.float32
        assert item["target"].item() == i % len(CLASSES) and item["sample_id"].item() == i
        classes, targets = plan["classes"], plan["targets"]
        # two quadrants of the target class, the other two of two distinct other classes
        assert targets.sum() == 2 and (classes[targets] == i % 6).all()
        others = classes[~targets].tolist()
        assert len(set(others)) == 2 and i % 6 not in others
        assert torch.equal(shapes["target"][plan["tiles"]], classes)     # each tile is a shapes item of that class
        for q, (img, m) in enumerate(zip(_quadrants(item["x"], S), _quadrants(item["mask"], S))):
            assert torch.equal(img, shapes["x"][plan["tiles"][q]])       # pixel for pixel, same normalisation
            assert bool(m.all()) if targets[q] else not bool(m.any())    # the mask marks whole target quadrants
    assert len(set(tiles.flatten().tolist())) == 4 * n                    # no image used twice
    layouts = {tuple(p["targets"].tolist()) for p in plans}
    assert len(layouts) > 3                                               # the layout varies (6 possible)


def test_deterministic_streamed_and_focus_ready():
    ds = ShapesMosaic(n_samples=6, size=16)
    item = ds[4]
    assert not any(isinstance(v, (dict, torch.Tensor)) for v in vars(ds).values())   # rendered on access, not kept
    again = ShapesMosaic(n_samples=50, size=16)[4]                        # n_samples does not change an item
    assert all(torch.equal(item[k], again[k]) for k in item)
    data = ds.tensors()
    assert torch.equal(data["x"][4], item["x"]) and data["mask"].shape == (6, 32, 32)
    assert not torch.equal(ShapesMosaic(n_samples=6, size=16, seed=1)[4]["x"], item["x"])
    # focus reads the mask: a map on the target quadrants scores 1, a constant one chance (2 of 4)
    assert focus(data["mask"].float(), data["mask"]).scores["focus"].eq(1).all()
    assert focus(torch.ones(6, 32, 32), data["mask"]).scores["focus"].eq(0.5).all()


@pytest.mark.parametrize("bad, match", [
    ({"split": "dev"}, "split must be one of"), ({"n_samples": 0}, "n_samples must be an integer >= 1"),
    ({"size": 8}, "size must be an integer >= 16"), ({"seed": -1}, "seed must be an integer >= 0"),
    ({"distractors": 1.5}, "distractors must be an integer"), ({"std": [1, 0, 1]}, "std > 0"),
])
def test_bad_arguments_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        ShapesMosaic(**bad)
    with pytest.raises(IndexError):
        ShapesMosaic(n_samples=2)[2]


def test_zoo_models_are_the_ones_trained_on_shapes(tmp_path):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        shapes = compose("config", overrides=["dataset=shapes", "model=small_cnn"])
        mosaic = compose("config", overrides=["dataset=shapes_mosaic", "model=small_cnn"])
    redirect = OmegaConf.create(ShapesMosaic(n_samples=1).train_on)
    assert cache_key(shapes.model, redirect) == cache_key(shapes.model, shapes.dataset)   # the same cached model
    # load_model follows it: a tiny recipe trained through the mosaic config lands under shapes' key
    model_cfg = OmegaConf.merge(mosaic.model, {"net": {"width": 2}, "train": {"epochs": 1, "n_train": 12, "n_test": 6}})
    dataset_cfg = OmegaConf.merge(mosaic.dataset, {"size": 16})
    model, info = load_model(model_cfg, dataset_cfg, cache_dir=tmp_path)
    shapes_cfg = OmegaConf.merge(shapes.dataset, {"size": 16})
    assert info["key"] == cache_key(model_cfg, shapes_cfg) and info["n_test"] == 6
    assert (tmp_path / f"small_cnn-{info['key']}.pt").exists()
    with torch.inference_mode():
        assert model(ShapesMosaic(n_samples=2, size=16).tensors()["x"]).shape == (2, 6)   # 32 px mosaics
