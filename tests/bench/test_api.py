"""bench.api: names to objects through the YAMLs and the runner's checks, called as the runner calls them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import methods
import metrics
from bench import api, tuning
from bench.config import CONF
from bench.data import Shapes

PLUGIN = Path(__file__).resolve().parents[1] / "plugin_example"
TINY_MODEL = {"net.width": 4, "train.epochs": 1, "train.n_train": 24, "train.n_test": 8}


def _yaml(group: str, name: str) -> dict:
    node = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml")[name])
    return {k: v for k, v in node.items() if not k.startswith("_")}


def test_a_method_has_its_yamls_defaults_not_its_functions(batch, tiny_cnn):
    x, target = batch
    ig = api.method("integrated_gradients")
    assert ig.func is methods.integrated_gradients and ig.keywords == _yaml("method", "integrated_gradients")
    assert ig.keywords["steps"] == 16                                     # the function's own default is 32
    with tuning.tuned(tiny_cnn, x) as sizes:                              # the api's pass sizes: IG's
        want = methods.integrated_gradients(tiny_cnn, x, target, **ig.keywords)   # sums in the same batches
    torch.testing.assert_close(ig(tiny_cnn, x, target), want, rtol=0, atol=0)
    assert tuning.tune(tiny_cnn, x.shape[1:], x.device)[1]["source"] == "memory"  # probed once, then kept
    assert sizes.shape == tuple(x.shape[1:]) and sizes.forward >= 1 and sizes.backward >= 1
    assert api.method("integrated_gradients", steps=4).keywords["steps"] == 4


def test_a_metric_gets_the_form_it_consumes_under_the_runs_reduce(batch, tiny_cnn):
    x, target = batch
    a = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))  # signed: the reductions differ
    pf = api.metric("pixel_flipping", steps=4)
    options = {**_yaml("metric", "pixel_flipping"), "steps": 4, "seed": pf.fn.keywords["seed"]}  # seed: derived
    assert pf.reduce == OmegaConf.load(CONF / "config.yaml").reduce == "abs_sum"
    with tuning.tuned(tiny_cnn, x):                                       # the api's pass sizes
        want = metrics.pixel_flipping(tiny_cnn, x, target, metrics.to_map(a, "abs_sum"), **options)
    got = pf(tiny_cnn, x, target, a)
    for k in want.scores:
        torch.testing.assert_close(got.scores[k], want.scores[k], rtol=0, atol=0)
    signed = api.metric("pixel_flipping", steps=4, reduce="sum")(tiny_cnn, x, target, a)
    with tuning.tuned(tiny_cnn, x):
        want = metrics.pixel_flipping(tiny_cnn, x, target, a.sum(dim=1), **options)
    torch.testing.assert_close(signed.scores["auc"], want.scores["auc"], rtol=0, atol=0)


def test_a_localization_metric_on_a_hand_made_map():
    """Pointing game: the map's maximum inside the mask or not; the map is what the run's reduce makes of it."""
    x, target = torch.zeros(2, 3, 4, 4), torch.tensor([0, 1])
    a = torch.zeros(2, 3, 4, 4)
    a[0, 1, 0, 0], a[1, 2, 3, 3] = -5.0, 1.0                                # abs_sum: |-5| is the maximum
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 0, 0] = True
    result = api.metric("pointing_game")(None, x, target, a, mask=mask)
    assert result.scores["hit"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"^metric pointing_game needs \['mask'\]: pass mask=\.\.\.$"):
        api.metric("pointing_game")(None, x, target, a)
    with pytest.raises(ValueError, match=r"attribution must be the method's raw output, shaped like x"):
        api.metric("pointing_game")(None, x, target, a.sum(dim=1), mask=mask)


def test_bad_names_options_and_targets_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"^method=nope: no conf/method/nope.yaml; available: .*integrated_gradients"):
        api.method("nope")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['stpes'\] for integrated_gradients"):
        api.method("integrated_gradients", stpes=64)
    with pytest.raises(ValueError, match=r"^method.saliency._target_='methods.cam.torch.load' is not an allowed "
                                         r"target: methods.cam.torch is the module torch"):
        api.method("saliency", _target_="methods.cam.torch.load")
    with pytest.raises(ValueError, match=r"^metric name '\.\./x' cannot be used in a file name"):
        api.metric("../x")
    with pytest.raises(ValueError, match=r"^reduce must be one of"):
        api.metric("pointing_game", reduce="mean")
    with pytest.raises(ValueError, match=r"^search_path: .* is not a folder"):
        api.method("saliency", search_path=["/no/such/folder"])


def test_a_dataset_and_its_batch_as_the_runner_collates_it():
    ds = api.dataset("shapes", n_samples=6, size=32)
    assert isinstance(ds, Shapes) and len(ds) == 6
    full = Shapes(n_samples=6, size=32).tensors()
    b = api.batch(ds, 4)
    assert set(b) == {"x", "target", "sample_id", "mask"} and b["x"].shape == (4, 3, 32, 32)
    for k in b:
        assert torch.equal(b[k], full[k][:4].to(b[k].dtype))
    with pytest.raises(ValueError, match=r"^n must be an integer in 1\.\.6"):
        api.batch(ds, 7)


def test_a_zoo_model_is_trained_once_then_loaded_from_the_cache(tmp_path):
    net, info = api.model("small_cnn", cache_dir=tmp_path, info=True, overrides=["dataset.size=32"], **TINY_MODEL)
    assert info["source"] == "train" and not net.training
    again, info = api.model("small_cnn", cache_dir=tmp_path, info=True, overrides=["dataset.size=32"], **TINY_MODEL)
    assert info["source"] == "cache"
    for (k, v), (k2, v2) in zip(net.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_a_users_method_from_their_own_yaml_folder(pixel_sum, monkeypatch):
    """tests/plugin_example: squared gradient of f_c = (c + 1) sum(x) is (c + 1)^2 everywhere, times scale."""
    monkeypatch.syspath_prepend(str(PLUGIN))
    own = {"search_path": [PLUGIN / "conf"], "allowed_targets": ["my_saliency."]}
    x, target = torch.randn(2, 3, 4, 4), torch.tensor([0, 1])
    got = api.method("gradient_squared", scale=0.5, **own)(pixel_sum, x, target)
    torch.testing.assert_close(got, 0.5 * torch.tensor([1.0, 4.0]).view(2, 1, 1, 1).expand(2, 3, 4, 4))
    top = api.metric("top_mass", **own)(pixel_sum, x, target, got)
    torch.testing.assert_close(top.scores["top_mass"], torch.full((2,), 0.125))   # round(0.1 * 16) = 2 of 16 px
    with pytest.raises(ValueError, match=r"^method.gradient_squared._target_='my_saliency.gradient_squared' is not "
                                         r"an allowed target"):
        api.method("gradient_squared", search_path=[PLUGIN / "conf"])
    with pytest.raises(ValueError, match=r"^method=gradient_squared: no conf/method/gradient_squared.yaml; "
                                         r"available: .*add its folder to the search path"):
        api.method("gradient_squared", allowed_targets=["my_saliency."])
