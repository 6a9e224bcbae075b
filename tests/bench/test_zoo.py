"""The model zoo: embedded architectures, torchvision / timm / checkpoint entries, load_model's info."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

from bench.config import CONF
from bench.zoo import VGG, SmallCNN, ViT, load_model
from bench.zoo.nets import TokenGrid
from bench.zoo.sources import load_weights, read_state_dict
from bench.zoo.train import cache_key, fit
from methods import grad_cam, saliency
from methods.cam import last_spatial_layer
from metrics import randomization_layers

EMBEDDED = ["small_cnn", "resnet", "vgg", "vgg_silu", "vit"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _build(name: str) -> nn.Module:
    from hydra.utils import instantiate
    torch.manual_seed(0)
    return instantiate(_cfg(f"model={name}").model.net, num_classes=6).eval()


# ---- embedded architectures ----------------------------------------------------------------------
@pytest.mark.parametrize("name", EMBEDDED)
def test_mprt_layers_run_in_the_declared_order(name):
    """mprt_layers go from input to output: their forward hooks fire in exactly that order."""
    net = _build(name)
    layers = randomization_layers(net)
    modules = dict(net.named_modules())
    fired: list[str] = []
    handles = [modules[n].register_forward_hook(lambda *_, n=n: fired.append(n)) for n in layers]
    net(torch.zeros(1, 3, 64, 64))
    for h in handles:
        h.remove()
    assert fired == layers
    owned = {id(p) for n in layers for p in modules[n].parameters()}
    assert owned == {id(p) for p in net.parameters()}                  # every parameter is randomized once


def test_vgg_is_plain_and_its_activation_is_chosen():
    relu, silu = VGG(), VGG(activation="silu")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in relu.modules())
    assert sum(isinstance(m, nn.ReLU) for m in relu.modules()) == 6 and not any(
        isinstance(m, nn.ReLU) for m in silu.modules())
    assert sum(isinstance(m, nn.SiLU) for m in silu.modules()) == 6
    silu.load_state_dict(relu.state_dict())                            # the same parameters
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    h = silu.features.conv1(x)
    torch.testing.assert_close(silu.features.act1(h), h * torch.sigmoid(h))
    with pytest.raises(ValueError, match=r"activation must be one of \['gelu', 'relu', 'silu'\], got 'tanh'"):
        VGG(activation="tanh")


def test_token_grid_puts_token_i_w_plus_j_at_row_i_column_j():
    t = torch.randn(2, 16, 5, generator=torch.Generator().manual_seed(3))   # (B, N = 4 x 4, D)
    g = TokenGrid()(t)
    assert g.shape == (2, 5, 4, 4)
    for i, j in [(0, 0), (1, 2), (3, 3), (2, 1)]:
        assert torch.equal(g[:, :, i, j], t[:, 4 * i + j, :])


def test_vit_token_grid_and_errors():
    net = ViT(depth=1).eval()
    assert net.stem(torch.zeros(1, 3, 64, 64)).shape == (1, 64, 8, 8)   # patch size 8: an 8x8 token grid
    with pytest.raises(ValueError, match=r"makes a 4x4 token grid from a \(32, 32\) input, .* set tokens=16"):
        net(torch.zeros(1, 3, 32, 32))
    assert ViT(depth=1, tokens=16).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 6)
    with pytest.raises(ValueError, match=r"dim \(64\) must be divisible by heads \(5\)"):
        ViT(heads=5)


def test_grad_cam_on_the_vit_uses_its_token_grid():
    """Grad-CAM finds `grid` (the final tokens as an 8x8 map) and equals the formula computed by hand."""
    torch.manual_seed(0)
    net = ViT(depth=2).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([0, 3, 5])
    assert last_spatial_layer(net, x) == "grid"
    store: list[torch.Tensor] = []
    handle = net.grid.register_forward_hook(lambda _m, _i, out: store.append(out))
    out = net(x.requires_grad_())
    handle.remove()
    A = store[0]                                                          # (B, D, 8, 8)
    g = torch.autograd.grad(out.gather(1, target[:, None]).sum(), A)[0]
    cam = (g.mean(dim=(2, 3), keepdim=True) * A).sum(dim=1, keepdim=True).clamp_min(0)
    expected = F.interpolate(cam.detach(), size=(64, 64), mode="bilinear", align_corners=False)
    a = grad_cam(net, x.detach(), target)
    assert a.shape == x.shape
    torch.testing.assert_close(a, expected.expand_as(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["vgg", "vgg_silu", "vit"])
def test_embedded_models_train_a_little_and_explain(name):
    """Two epochs on 32 images lower the training loss; saliency and Grad-CAM run on the result."""
    from bench.data import Shapes
    data = Shapes(split="train", n_samples=32).tensors()
    net = _build(name)
    loss_before = F.cross_entropy(net(data["x"]), data["target"]).item()
    fit(net, data["x"], data["target"], epochs=2, lr=1e-3, batch_size=16, weight_decay=0.0, seed=0)
    loss_after = F.cross_entropy(net(data["x"]), data["target"]).item()
    assert loss_after < loss_before and not net.training
    x, target = data["x"][:2], data["target"][:2]
    for method in (saliency, grad_cam):
        a = method(net, x, target)
        assert a.shape == x.shape and torch.isfinite(a).all() and a.abs().sum() > 0


# ---- load_model: where the weights came from -----------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_trained_then_cached_info(tmp_path):
    cfg = _cfg("model=small_cnn", "model.train.n_train=12", "model.train.n_test=6", "model.train.epochs=1",
               "model.net.width=4")
    model, info = load_model(cfg.model, cfg.dataset, cache_dir=tmp_path)
    path = Path(info["checkpoint"])
    assert info["source"] == "train" and info["cached"] is False and path.parent == tmp_path
    assert info["sha256"] == _sha(path) and info["n_parameters"] == sum(p.numel() for p in model.parameters())
    assert info["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3, "from": "dataset"}
    again, cached = load_model(cfg.model, cfg.dataset, cache_dir=tmp_path)
    assert cached["source"] == "cache" and cached["sha256"] == info["sha256"]
    assert cached["test_accuracy"] == info["test_accuracy"]
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def _torchvision(tmp_path, *overrides: str):
    cfg = _cfg("model=torchvision", *overrides)
    return load_model(cfg.model, cfg.dataset, cache_dir=tmp_path)


# arch -> the layer Grad-CAM finds by itself (the last leaf with a (B, C, h, w) output, h, w > 1)
TORCHVISION = {"resnet18": "layer4.1.relu", "vgg11": "avgpool", "densenet121": "features.norm5",
               "mobilenet_v3_small": "features.12.2"}
_BIG = pytest.mark.slow   # vgg11 (133M parameters) and vit_b_16 (86M): seconds just to initialise


@pytest.mark.parametrize("arch", [pytest.param(a, marks=_BIG) if a == "vgg11" else a for a in sorted(TORCHVISION)])
def test_torchvision_families_build_adapt_and_explain(tmp_path, arch):
    model, info = _torchvision(tmp_path, f"model.net.arch={arch}")
    assert info["source"] == "torchvision" and info["init"]["weights"] is None and info["sha256"] is None
    assert info["init"]["head"].endswith(": 1000 -> 6 outputs (new, randomly initialised)")
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert not model.training and info["n_parameters"] == sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([1, 4])
    assert model(x).shape == (2, 6)
    assert last_spatial_layer(model, x) == TORCHVISION[arch]
    for method in (saliency, grad_cam):
        a = method(model, x, target)
        assert a.shape == x.shape and torch.isfinite(a).all()


@_BIG
def test_torchvision_vit_at_small_input(tmp_path):
    model, info = _torchvision(tmp_path, "model.net.arch=vit_b_16", "+model.net.options.image_size=32",
                               "dataset.size=32")
    assert info["init"]["head"].startswith("heads.head: 1000 -> 6")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert saliency(model, x, torch.tensor([2])).shape == x.shape
    assert last_spatial_layer(model, x) == "encoder.layers.encoder_layer_11.ln_1"   # the last block's input tokens


def test_torchvision_weights_need_their_normalisation(tmp_path, monkeypatch):
    """The weights' normalisation is checked against the dataset's before anything is downloaded; with
    the right one, weights found in torch's hub cache are loaded (offline) and hashed."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=r"expect inputs normalised with mean=\[0.485, 0.456, 0.406\], std=\[0.229, "
                                         r"0.224, 0.225\], but dataset shapes normalises with mean=\[0.5, 0.5, 0.5\].*"
                                         r"run with dataset.mean=\[0.485,0.456,0.406\] dataset.std=\[0.229,0.224,0.225\]"):
        _torchvision(tmp_path, "model.net.weights=DEFAULT")
    assert not (tmp_path / "hub").exists()                               # refused before any download
    import torchvision
    torch.manual_seed(1)
    reference = torchvision.models.squeezenet1_1()                       # small; its head is a 1x1 conv
    weights = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
    file = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
    file.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), file)
    imagenet = ("+dataset.mean=[0.485,0.456,0.406]", "+dataset.std=[0.229,0.224,0.225]")
    squeezenet = "model.net.arch=squeezenet1_1"
    model, info = _torchvision(tmp_path, squeezenet, "model.net.weights=IMAGENET1K_V1", *imagenet)
    assert info["source"] == "torchvision" and info["init"]["weights"] == "SqueezeNet1_1_Weights.IMAGENET1K_V1"
    assert info["sha256"] == _sha(file) and info["normalization"]["from"].startswith("weights")
    assert info["init"]["head"].startswith("classifier.1: 1000 -> 6")
    assert torch.equal(model.features[0].weight, reference.features[0].weight)
    assert model.classifier[1].out_channels == 6 and model(torch.zeros(1, 3, 64, 64)).shape == (1, 6)
    with pytest.raises(ValueError, match=r"outputs shape \(1, 1000\) for one input, but the dataset has 6 classes: "
                                         r"adapt the head \(adapt_head: true\)"):
        _torchvision(tmp_path, squeezenet, "model.net.weights=DEFAULT", "model.net.adapt_head=false", *imagenet)
    with pytest.raises(ValueError, match=r"weights 'IMAGENET2K' are not weights of torchvision's resnet18: pick "
                                         r"one of \['DEFAULT', 'IMAGENET1K_V1'\]"):
        _torchvision(tmp_path, "model.net.weights=IMAGENET2K")
    with pytest.raises(ValueError, match=r"'resnet7' is not a torchvision classification model"):
        _torchvision(tmp_path, "model.net.arch=resnet7")


def test_timm_entry(tmp_path):
    pytest.importorskip("timm", reason="timm is an optional extra (pip install timm)")
    cfg = _cfg("model=timm", "model.net.arch=resnet18")
    model, info = load_model(cfg.model, cfg.dataset, cache_dir=tmp_path)
    assert info["source"] == "timm" and model(torch.zeros(1, 3, 64, 64)).shape == (1, 6)


# ---- a user's checkpoint -------------------------------------------------------------------------
def _checkpoint(tmp_path, path: Path, *overrides: str):
    cfg = _cfg("model=checkpoint", f"model.net.checkpoint={path}", *overrides)
    return cfg, load_model(cfg.model, cfg.dataset, cache_dir=tmp_path)


def test_checkpoint_entry_loads_a_state_dict(tmp_path):
    torch.manual_seed(3)
    net = SmallCNN(width=16)
    path = tmp_path / "net.pt"
    torch.save(net.state_dict(), path)
    cfg, (model, info) = _checkpoint(tmp_path, path)
    assert info["source"] == "checkpoint" and info["sha256"] == _sha(path) and info["checkpoint"] == str(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in net.state_dict().items())
    key = cache_key(cfg.model, cfg.dataset)
    torch.save({"state_dict": SmallCNN(width=16).state_dict()}, path)   # new content, same path: a new key
    cfg2, (_, info2) = _checkpoint(tmp_path, path)
    assert cache_key(cfg2.model, cfg2.dataset) != key and info2["sha256"] == _sha(path)


def test_checkpoint_errors_say_what_to_do(tmp_path):
    net = SmallCNN(width=4)
    good, pickled, corrupt, text, listed = (tmp_path / f for f in ("good.pt", "obj.pt", "cut.pt", "t.pt", "l.pt"))
    torch.save(net.state_dict(), good)
    torch.save(net, pickled)
    corrupt.write_bytes(good.read_bytes()[:500])
    text.write_text("not a checkpoint")
    torch.save([1, 2, 3], listed)
    cases = [
        (tmp_path / "missing.pt", r"missing.pt' does not exist .* torch.save\(model.state_dict\(\), path\)"),
        (pickled, r"holds a pickled Python object \(bench.zoo.nets.SmallCNN, .*save model.state_dict\(\) instead"),
        (corrupt, r"cut.pt' is corrupt or not a PyTorch file"),
        (text, r"t.pt' is corrupt or not a PyTorch file"),
        (listed, r"l.pt' is not a state dict .* got list"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=r"^checkpoint '.*" + message):
            read_state_dict(path)
    with pytest.raises(ValueError, match=r"^model checkpoint: checkpoint '.*obj.pt' holds a pickled Python object"):
        _checkpoint(tmp_path, pickled)                                    # load_model unwraps Hydra's error
    with pytest.raises(ValueError, match=r"does not fit SmallCNN \(wrong architecture .*shape mismatch: "
                                         r"features.block1.conv.weight: checkpoint \(4, 3, 3, 3\) vs model \(8, 3, 3, 3\)"):
        load_weights(SmallCNN(width=8), torch.load(good, weights_only=True), good)
    with pytest.raises(ValueError, match=r"does not fit SmallCNN .*missing in checkpoint: features.block1.conv.weight"):
        load_weights(SmallCNN(width=4), VGG(width=4).state_dict(), good)
    torch.save(SmallCNN(num_classes=10).state_dict(), good)
    with pytest.raises(ValueError, match=r"model checkpoint outputs shape \(1, 10\) for one input, but the dataset "
                                         r"has 6 classes"):
        _checkpoint(tmp_path, good, "model.net.module.num_classes=10")


# ---- the cache's integrity -----------------------------------------------------------------------
_TINY_TRAIN = ("model=small_cnn", "model.train.n_train=12", "model.train.n_test=6", "model.train.epochs=1",
               "model.net.width=4")


def _flip_inside_a_tensor(path: Path, tensor: torch.Tensor) -> None:
    """Invert 4 bytes in the middle of `tensor`'s stored data (found by its exact bytes in the file)."""
    raw = bytearray(path.read_bytes())
    at = raw.find(tensor.detach().contiguous().numpy().tobytes())
    assert at > 0
    at += tensor.numel() * tensor.element_size() // 2
    raw[at:at + 4] = bytes(b ^ 0xFF for b in raw[at:at + 4])
    path.write_bytes(bytes(raw))


def test_the_cache_records_its_sha256_beside_each_file(tmp_path):
    cfg = _cfg(*_TINY_TRAIN)
    _, info = load_model(cfg.model, cfg.dataset, cache_dir=tmp_path)
    path = Path(info["checkpoint"])
    digest, name = (tmp_path / f"{path.name}.sha256").read_text().split()
    assert name == path.name and digest == _sha(path) == info["sha256"]      # sha256sum -c reads it
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, f"{path.name}.sha256"]   # no temporary left
    _, cached = load_model(cfg.model, cfg.dataset, cache_dir=tmp_path)
    assert cached["source"] == "cache" and cached["sha256_verified"] is True and cached["sha256"] == digest


def test_a_cached_file_with_flipped_bytes_is_retrained_with_a_warning(tmp_path):
    """The bytes of one weight change on disk: the file is not loaded, it is retrained (the same seeded
    training, so the same weights come back) and the accuracy reported is the retrained model's."""
    from bench.zoo.train import CacheIntegrityWarning
    cfg = _cfg(*_TINY_TRAIN)
    model, info = load_model(cfg.model, cfg.dataset, cache_dir=tmp_path)
    path = Path(info["checkpoint"])
    weight = model.features.block1.conv.weight
    _flip_inside_a_tensor(path, weight)
    tampered = torch.load(path, weights_only=True)["state_dict"]["features.block1.conv.weight"]
    assert not torch.equal(tampered, weight)                                # the flip hit the tensor's data
    with pytest.warns(CacheIntegrityWarning, match=rf"cached model {path} does not match the sha256 recorded when "
                                                   rf"it was written .*its bytes changed on disk; retraining it"):
        again, retrained = load_model(cfg.model, cfg.dataset, cache_dir=tmp_path)
    assert retrained["source"] == "train" and retrained["cached"] is False
    assert retrained["test_accuracy"] == info["test_accuracy"] and retrained["sha256"] == _sha(path)
    assert torch.equal(again.features.block1.conv.weight, weight)
    assert load_model(cfg.model, cfg.dataset, cache_dir=tmp_path)[1]["source"] == "cache"   # whole again


def test_a_cached_file_without_its_digest_is_retrained_or_refused(tmp_path):
    from bench.zoo.train import CacheIntegrityWarning
    cfg = _cfg(*_TINY_TRAIN)
    model, info = load_model(cfg.model, cfg.dataset, cache_dir=tmp_path)
    path = Path(info["checkpoint"])
    _flip_inside_a_tensor(path, torch.load(path, weights_only=True)["state_dict"]["classifier.fc1.weight"])
    with pytest.raises(ValueError, match=rf"^cached model {path} does not match the sha256 .*: it cannot be trusted "
                                         r"and is not retrained here; re-run the experiment"):
        load_model(cfg.model, cfg.dataset, cache_dir=tmp_path, retrain=False)   # a report reloading a run
    (tmp_path / f"{path.name}.sha256").unlink()                              # e.g. cached by an older suite
    with pytest.warns(CacheIntegrityWarning, match=rf"cached model {path} has no recorded sha256 "
                                                   rf"\({path.name}.sha256 is missing or unreadable\); retraining it"):
        again, retrained = load_model(cfg.model, cfg.dataset, cache_dir=tmp_path)
    assert retrained["source"] == "train" and retrained["sha256"] == _sha(path)   # (train_seconds differ)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"^model small_cnn is not in the cache .* and is not trained here"):
        load_model(cfg.model, cfg.dataset, cache_dir=tmp_path / "elsewhere", retrain=False)


def test_a_run_on_a_tampered_cache_retrains_and_reports_what_it_measured(tmp_path):
    """The issue's case: flipped bytes in a cached model's weight once gave accuracy 0.17 in the log, the
    cached 0.986 in the manifest and a pixel-flipping AUC of -8279, with exit 0. Now the run retrains
    (same seeded recipe: the same weights), and its manifest and scores are those of a whole model."""
    from bench.report import load
    from bench.run import run
    from bench.zoo.train import CacheIntegrityWarning
    cfg = _cfg(*_TINY_TRAIN, "model.train.n_train=48", "dataset.n_samples=6", "batch_size=6", "method=[saliency]",
               "metric=[pixel_flipping]", "metric.pixel_flipping.steps=4", f"cache_dir={tmp_path / 'cache'}")
    first = run(cfg, out_dir=tmp_path / "first")
    path = Path(first["model_info"]["checkpoint"])
    state = torch.load(path, weights_only=True)["state_dict"]
    _flip_inside_a_tensor(path, state["features.block1.conv.weight"])
    with pytest.warns(CacheIntegrityWarning, match=rf"cached model {path} does not match the sha256"):
        second = run(cfg, out_dir=tmp_path / "second")
    info = second["model_info"]
    assert first["model_info"]["source"] == "train" and info["source"] == "train"
    assert info["sha256"] == _sha(path) and info["sha256"][:16] == second["keys"]["checkpoint"]
    assert info["test_accuracy"] == first["model_info"]["test_accuracy"]
    assert info["evaluated_accuracy"] == first["model_info"]["evaluated_accuracy"]
    scores = [load(tmp_path / d).scores.sort_values(["score", "sample_id"]).value.to_numpy()
              for d in ("first", "second")]
    assert len(scores[0]) == 2 * 6 and (scores[0] == scores[1]).all()
