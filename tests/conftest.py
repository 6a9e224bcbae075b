"""Shared fixtures: tiny analytic models and seeded data."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.config import CONF, derive_seeds


class PixelSum(nn.Module):
    """f_c(x) = (c + 1) * sum of all input values: every pixel's exact contribution is known."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.scale = nn.Parameter(torch.arange(1.0, classes + 1.0), requires_grad=False)

    def forward(self, x):
        return x.flatten(1).sum(dim=1, keepdim=True) * self.scale


class TinyCNN(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> global mean -> linear: small, spatial, deterministic."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1))


class Linear(nn.Module):
    """f(x) = W x + b on the flattened input: gradients are the weights, exactly."""

    def __init__(self, shape=(3, 4, 4), classes=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(classes, *shape, generator=g))
        self.bias = nn.Parameter(torch.randn(classes, generator=g))

    def forward(self, x):
        return torch.einsum("bchw,kchw->bk", x, self.weight) + self.bias


@pytest.fixture
def linear_batch():
    """A Linear model, 4 seeded inputs (3, 4, 4) and their targets."""
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    return Linear().eval(), x, torch.tensor([0, 1, 1, 0])


@pytest.fixture(autouse=True)
def _threads_restored():
    """Every test leaves torch's intra-op thread count as it found it: a test that sets one thread would
    otherwise slow every later test (the zoo's training ran on one of two cores)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def batch_norms_drawn():
    """f(model): give every BatchNorm2d non-trivial statistics and affine terms (running mean in
    [-0.2, 0.2], variance and weight in [0.5, 1.5], bias in [-0.1, 0.1], from torch's global generator: seed it
    first), so canonizers have something to merge."""
    def draw(model: nn.Module) -> nn.Module:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.1, 0.1)
        return model
    return draw


@pytest.fixture
def one_thread():
    """One intra-op thread: small tensors gain nothing from more (and stall on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pixel_sum():
    return PixelSum().eval()


@pytest.fixture
def tiny_cnn():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TinyCNN().eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0xDEADBEEF)
    x = torch.randn(5, 3, 8, 8, generator=g)
    target = torch.tensor([0, 1, 2, 0, 1])
    return x, target


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """small_cnn trained on `shapes` with the default config (once per session, ~1 minute), with the
    default experiment's 128 test images. Fields: cfg (composed default config, cache_dir set),
    cache_dir, model (eval mode), info, x, target, mask, sample_id."""
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from bench.zoo import load_model

    cache = tmp_path_factory.mktemp("zoo")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = derive_seeds(compose("config", overrides=["model=small_cnn", f"cache_dir={cache}"]))   # seeds as a run's
    model, info = load_model(cfg.model, cfg.dataset, cache_dir=cache)
    data = instantiate(cfg.dataset).tensors()
    return SimpleNamespace(cfg=cfg, cache_dir=cache, model=model, info=info, **data)


@pytest.fixture(scope="session")
def zoo(trained):
    """zoo(name) -> (model, info): the embedded model `name` with its shipped recipe on `shapes`, trained once
    per session into `trained`'s cache (small_cnn is `trained`'s own model; each other one costs minutes)."""
    from hydra import compose, initialize_config_dir

    from bench.zoo import load_model

    loaded: dict = {}

    def get(name: str):
        if name not in loaded:
            with initialize_config_dir(str(CONF), version_base="1.3"):
                cfg = compose("config", overrides=[f"model={name}", f"cache_dir={trained.cache_dir}"])
            loaded[name] = load_model(cfg.model, cfg.dataset, cache_dir=trained.cache_dir)
        return loaded[name]
    return get
