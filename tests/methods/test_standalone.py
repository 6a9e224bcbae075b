"""methods/ stands alone: it imports nothing from bench/, and a model declares what LRP needs
(`lrp_canonizers`), so a user's own residual model gets the zoo's treatment without editing methods/."""
from __future__ import annotations

import ast
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import methods
from bench.zoo import ResNet
from methods.lrp import ResidualSumCanonizer

METHODS_DIR = Path(methods.__file__).parent
LRPS = ["lrp_epsilon", "lrp_gamma", "lrp_alpha1_beta0", "lrp_epsilon_plus_flat", "lrp_epsilon_gamma_box"]


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", sorted(METHODS_DIR.glob("*.py")), ids=lambda p: p.name)
def test_methods_import_nothing_from_bench_nor_private_metrics(path):
    imported = _imported_modules(path)
    assert imported, f"{path.name}: no imports parsed"
    assert not [m for m in imported if m == "bench" or m.startswith("bench.")], path.name
    assert not [m for m in imported if m.startswith("metrics._")], f"{path.name} imports a private metrics module"


class UserBlock(nn.Module):
    """A user's residual block, outside bench/: same layers as the zoo's, its addition through `add`."""

    def __init__(self, c_in: int, c_out: int, *, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU()

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b

    def forward(self, x: Tensor) -> Tensor:
        return self.relu2(self.add(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))), self.shortcut(x)))


class UserResNet(nn.Module):
    lrp_canonizers = (ResidualSumCanonizer(UserBlock),)

    def __init__(self, num_classes: int = 6, width: int = 8, *, declare: bool = True):
        super().__init__()
        w = width
        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False), bn=nn.BatchNorm2d(w), relu=nn.ReLU()))
        self.layer1, self.layer2, self.layer3 = UserBlock(w, w), UserBlock(w, 2 * w, stride=2), \
            UserBlock(2 * w, 4 * w, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)
        if not declare:
            self.lrp_canonizers = ()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layer3(self.layer2(self.layer1(self.stem(x))))).flatten(1))


@pytest.fixture(scope="module")
def pair(batch_norms_drawn):
    torch.manual_seed(0)
    zoo = ResNet(num_classes=6, width=8).eval()
    batch_norms_drawn(zoo)                                             # non-trivial batch norms to merge
    user = UserResNet().eval()
    user.load_state_dict(zoo.state_dict())
    x, target = torch.randn(3, 3, 32, 32), torch.tensor([0, 2, 5])
    return zoo, user, x, target


@pytest.mark.parametrize("name", LRPS)
def test_user_residual_model_declaring_its_canonizer_gets_the_zoo_map(pair, name):
    zoo, user, x, target = pair
    torch.testing.assert_close(user(x), zoo(x), rtol=0, atol=0)
    ours = getattr(methods, name)(user, x, target)
    assert torch.equal(ours, getattr(methods, name)(zoo, x, target))
    assert not hasattr(user.layer1, "canonizer_sum") and "add" not in vars(user.layer1)   # removed on exit


def test_the_declaration_is_what_makes_the_difference(pair):
    """With the declared canonizer LRP-epsilon (eps -> 0) is gradient x input on a ReLU net (Ancona et al.
    2018); without it each residual sum hands its whole relevance to both branches, so the map differs."""
    zoo, user, x, target = pair
    bare = UserResNet(declare=False).eval()
    bare.load_state_dict(user.state_dict())
    gxi = methods.gradient_x_input(user, x, target)
    tol = {"atol": 1e-4 * gxi.abs().max().item(), "rtol": 1e-4}
    torch.testing.assert_close(methods.lrp_epsilon(user, x, target, epsilon=1e-9), gxi, **tol)
    plain = methods.lrp_epsilon(bare, x, target, epsilon=1e-9)
    assert not torch.allclose(plain, gxi, **tol)
    assert plain.sum() > 1.2 * gxi.sum()                                # relevance duplicated at the sums


def test_bad_declarations_raise_clear_errors(pair):
    zoo, user, x, target = pair
    with pytest.raises(ValueError, match="lrp_canonizers must be zennit canonizers"):
        bad = UserResNet().eval()
        bad.lrp_canonizers = ("ResidualSumCanonizer",)
        methods.lrp_epsilon(bad, x, target)
    with pytest.raises(ValueError, match="nn.Module classes"):
        ResidualSumCanonizer("UserBlock")

    class NoAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)
        lrp_canonizers = ()

        def forward(self, x):
            return self.fc(x.flatten(1)[:, :4])

    no_add = NoAdd()
    no_add.lrp_canonizers = (ResidualSumCanonizer(nn.Linear),)
    with pytest.raises(ValueError, match="has no method add"):
        methods.lrp_epsilon(no_add, torch.randn(2, 1, 2, 2), torch.tensor([0, 1]))
