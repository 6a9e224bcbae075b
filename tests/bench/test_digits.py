"""`digits`: scikit-learn's bundled 8x8 digits, upsampled; splits, ids, values and masks by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="digits reads scikit-learn's bundled copy")
from bench.config import CONF
from bench.data import Digits  # noqa: E402


def test_splits_are_a_stratified_disjoint_cover_with_sklearn_ids():
    target = sklearn_datasets.load_digits().target
    data = {s: Digits(split=s, n_samples=None, size=8).tensors() for s in ("train", "val", "test")}
    ids = {s: d["sample_id"] for s, d in data.items()}
    together = torch.cat(list(ids.values()))
    assert len(together) == len(target) == 1797 and len(set(together.tolist())) == 1797
    for split, fraction in (("train", 0.6), ("val", 0.1), ("test", 0.3)):
        counts = np.bincount(target[ids[split].numpy()], minlength=10)
        assert np.abs(counts - fraction * np.bincount(target)).max() <= 1          # per class, rounded
        assert torch.equal(data[split]["target"], torch.from_numpy(target[ids[split].numpy()]))
    assert not torch.equal(Digits(seed=1, n_samples=None, size=8).tensors()["sample_id"], ids["test"])


def test_values_and_mask_match_the_8x8_images():
    images = sklearn_datasets.load_digits().images                                 # (1797, 8, 8), 0..16
    d = Digits(size=8, n_samples=20).tensors()                                     # size 8: no resampling
    raw = torch.from_numpy(images[d["sample_id"].numpy()]).float()
    torch.testing.assert_close(d["x"], ((raw / 16 - 0.3) / 0.375)[:, None].expand(-1, 3, -1, -1))
    big = Digits(size=16, n_samples=20).tensors()
    expected = np.kron(images[big["sample_id"].numpy()] >= 4, np.ones((1, 2, 2), dtype=bool))
    assert torch.equal(big["mask"], torch.from_numpy(expected))
    ds = Digits(n_samples=5)
    assert ds.num_classes == 10 and len(ds) == 5 and ds[4]["x"].shape == (3, 64, 64)
    assert torch.equal(ds[4]["x"], ds.tensors()["x"][4]) and int(ds[-1]["sample_id"]) == int(ds.tensors()["sample_id"][4])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"split": "validation"}, r"split must be one of \['test', 'train', 'val'\], got 'validation'"),
    # per class n - round(0.7 n) over the class counts 178, 182, 177, 183, 181, 182, 181, 179, 174, 180
    ({"n_samples": 1000}, r"n_samples must be an integer in 1..539 \(the test split's size\) or null, got 1000"),
    ({"size": 4}, "size must be an integer >= 8"),
    ({"std": (1, 1, 0)}, "mean and std must be 3 numbers each"),
])
def test_bad_arguments_say_what_to_pass(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Digits(**kwargs)


def test_hydra_config_instantiates():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    ds = instantiate(OmegaConf.load(CONF / "dataset" / "digits.yaml"), n_samples=3)
    assert isinstance(ds, Digits) and ds.name == "digits" and ds.split == "test" and len(ds) == 3
