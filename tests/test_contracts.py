"""Registry-wide contracts: every YAML in conf/ is covered the moment it is added."""
from __future__ import annotations

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bench.config import CONF, derive_seeds
from bench.calls import METRIC_INPUTS, call_metric, missing_inputs
from bench.checks import check_targets
from bench.data.contract import BenchDataset, FileDataset, members
from bench.provenance import metric_meta, without_meta
from metrics import FAMILIES, consumed, family, metric_input, randomization_layers, ranked


def _compose(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return derive_seeds(compose("config", overrides=list(overrides)))      # seed: null -> as a run derives it


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("name", _names("method"))
def test_method_contract(name, tiny_cnn, batch):
    cfg = _compose(f"method=[{name}]")
    assert list(cfg.method) == [name]                     # the top key is the file stem
    check_targets(cfg)
    method = instantiate(cfg.method[name])
    x, target = batch
    x0, state = x.clone(), copy.deepcopy(tiny_cnn.state_dict())
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in tiny_cnn.modules())
    a = method(tiny_cnn, x, target)
    assert a.shape == x.shape and a.dtype == torch.float32 and a.device == x.device
    assert not a.requires_grad and a.grad_fn is None
    assert torch.isfinite(a).all()
    torch.testing.assert_close(method(tiny_cnn, x, target), a)                 # deterministic
    torch.testing.assert_close(method(tiny_cnn, x[1:3], target[1:3]), a[1:3], atol=1e-5, rtol=1e-4)   # batch-invariant
    assert torch.equal(x, x0) and not tiny_cnn.training
    assert all(torch.equal(v, state[k]) for k, v in tiny_cnn.state_dict().items())
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in tiny_cnn.modules()) == hooks


@pytest.mark.parametrize("name", _names("metric"))
def test_metric_contract(name, tiny_cnn, batch):
    cfg = _compose(f"metric=[{name}]")
    assert list(cfg.metric) == [name]
    check_targets(cfg)
    meta = metric_meta(name, cfg.metric[name])               # _sanity_, _staged_, _headline_, where given, well formed
    metric = instantiate(without_meta(cfg.metric[name]))
    x, target = batch
    method = instantiate(_compose("method=[saliency]").method.saliency)
    mask = torch.zeros(5, 8, 8, dtype=torch.bool)
    mask[:, :4, :4] = True                                   # a whole quadrant: focus scores 2x2 mosaics
    attribution = metric_input(method(tiny_cnn, x, target), consumed(metric), "abs_sum")   # what the runner hands it
    inputs = {"model": tiny_cnn, "x": x, "target": target, "attribution": attribution, "mask": mask,
              "method": method, "reduce": "abs_sum", "label_randomized_model": copy.deepcopy(tiny_cnn)}
    assert set(inputs) == set(METRIC_INPUTS)                 # every input the runner may hand a metric, no other
    assert missing_inputs(metric, METRIC_INPUTS) == []       # the metric needs nothing the runner lacks
    state = copy.deepcopy(tiny_cnn.state_dict())
    result = call_metric(metric, inputs)
    assert result.scores and set(result.higher_is_better) == set(result.scores)
    for score in result.scores.values():
        assert score.shape == (5,) and score.dtype == x.dtype
    for curve in result.curves.values():
        assert curve.y.shape == (5, len(curve.x)) and len(curve.labels) in (0, len(curve.x))
    assert all(torch.equal(v, state[k]) for k, v in tiny_cnn.state_dict().items())
    assert family(metric) in FAMILIES                        # every metric carries its family (its module)
    ranked_scores = [s for s in result.scores if ranked(s)]
    if meta["headline"] is None:                             # the rank aggregates need one score per metric
        assert len(ranked_scores) == 1, f"{name} returns {ranked_scores}: declare `_headline_` in its YAML"
    else:
        assert meta["headline"] in ranked_scores, f"{name}'s _headline_ is not among its ranked scores {ranked_scores}"


@pytest.mark.parametrize("name", _names("model"))
def test_model_contract(name, tmp_path):
    if name == "timm":
        pytest.importorskip("timm", reason="the timm entry needs timm, an optional extra (pip install timm)")
    cfg = _compose(f"model={name}")
    assert cfg.model.name == name
    if OmegaConf.is_missing(cfg.model.net, "checkpoint"):              # an entry that needs the user's file
        path = tmp_path / "state.pt"
        torch.save(instantiate(cfg.model.net.module).state_dict(), path)
        cfg.model.net.checkpoint = str(path)
    net = instantiate(cfg.model.net, num_classes=6).eval()
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 6)
    modules = dict(net.named_modules())
    assert all(layer in modules for layer in randomization_layers(net))
    assert not any(getattr(m, "inplace", False) for m in net.modules())        # captum hooks need this
    relus = [m for m in net.modules() if isinstance(m, torch.nn.ReLU)]
    assert len(relus) == len({id(m) for m in relus})


@pytest.mark.parametrize("name", _names("dataset"))
def test_dataset_contract(name, tmp_path):
    from bench.data import write_example

    cfg = _compose(f"dataset={name}")
    assert cfg.dataset.name == name
    extra = {}
    if "root" in OmegaConf.to_container(cfg.dataset) and OmegaConf.is_missing(cfg.dataset, "root"):
        kinds = {"folder": "masks", "voc": "voc", "imagenet_val": "imagenet_val"}   # a tiny root in its format
        assert name in kinds, f"dataset {name} needs a root: add a generated tiny root for it here"
        extra = {"root": str(write_example(tmp_path, kinds[name])), "size": 32}
    dataset = instantiate(cfg.dataset, n_samples=4, **extra)
    assert isinstance(dataset, BenchDataset), f"{name} lacks {[m for m in members() if not hasattr(dataset, m)]}"
    assert isinstance(dataset.name, str) and dataset.split == cfg.dataset.split and dataset.n_samples == 4
    assert isinstance(dataset.num_classes, int) and dataset.num_classes >= 2
    assert len(dataset.mean) == len(dataset.std) == 3 and all(s > 0 for s in dataset.std)
    if "root" in extra:                                                            # read from files: keyed by bytes
        assert isinstance(dataset, FileDataset) and dataset.content_digest() == dataset.content_digest()
    data = dataset.tensors()
    B, C, H, W = data["x"].shape
    assert B == 4 and data["target"].shape == (4,) and data["sample_id"].shape == (4,)
    assert data["mask"].shape == (4, H, W) and data["mask"].dtype == torch.bool
    assert data["x"].dtype == torch.float32 and ((0 <= data["target"]) & (data["target"] < dataset.num_classes)).all()
    assert len(dataset) == 4 and torch.equal(dataset[3]["x"], data["x"][3])        # item access = batch
    assert len(set(data["sample_id"].tolist())) == 4                               # ids identify samples
    again = instantiate(cfg.dataset, n_samples=4, **extra).tensors()               # deterministic
    assert all(torch.equal(again[k], v) for k, v in data.items())
    # bench.zoo.load_model instantiates with these overrides
    assert instantiate(cfg.dataset, n_samples=1, **extra).num_classes == dataset.num_classes


def test_unknown_target_is_refused():
    cfg = _compose("method=[saliency]", "method.saliency._target_=os.system")
    with pytest.raises(ValueError, match=r"method.saliency._target_='os.system' .* add yours to `allowed_targets`"):
        check_targets(cfg)
    # os.system is defined in posix and re-exported by os: allowing os. alone is not enough (tests/bench/test_security.py)
    check_targets(_compose("method=[saliency]", "method.saliency._target_=os.system", "allowed_targets=[os.,posix.]"))
