"""The catalogue, each method verified: completeness on zoo models, closed forms on linear and
analytic models, CAMs by hand, one clear error where a method cannot run, a clean model after errors.

Zoo models here are bench.zoo.SmallCNN / ResNet (width 8) with fixed random weights and randomized
batch-norm statistics (eval mode): the completeness statements tested are exact identities of the
methods for any weights, so training is not needed; only float32 rounding is tolerated.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import methods
from bench.config import CONF
from bench.zoo import ResNet, SmallCNN
from methods.reference import _rescale


def _zoo(cls, *, biases: bool = True) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = cls(num_classes=6, width=8)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)
            if not biases and isinstance(m, (nn.BatchNorm2d, nn.Conv2d, nn.Linear)) and m.bias is not None:
                nn.init.zeros_(m.bias)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.zero_()
    return model.eval()


@pytest.fixture(scope="module")
def zoo_batch():
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    return x, torch.tensor([0, 1, 2, 5])


def _f(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).gather(1, target[:, None]).squeeze(1)


ZOO = [SmallCNN, ResNet]


# ---------------------------------------------------------------- completeness on zoo models

@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
@pytest.mark.parametrize("baseline", [0.0, "mean"])
def test_deeplift_completeness_on_zoo(cls, baseline, zoo_batch):
    # summation-to-delta is exact for the Rescale rule (max pools included): only float32 rounding
    model, (x, target) = _zoo(cls), zoo_batch
    ref = torch.zeros_like(x) if baseline == 0.0 else x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    a = methods.deeplift(model, x, target, baseline=baseline)
    torch.testing.assert_close(a.sum(dim=(1, 2, 3)), _f(model, x, target) - _f(model, ref, target),
                               atol=1e-6, rtol=1e-5)
    # DeepLIFT-SHAP with one fixed reference is DeepLIFT
    torch.testing.assert_close(methods.deeplift_shap(model, x, target, samples=2, baseline="mean"), a
                               if baseline == "mean" else methods.deeplift(model, x, target, baseline="mean"))


@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
def test_integrated_gradients_completeness_on_zoo(cls, zoo_batch):
    # the quadrature error of a piecewise-linear path integral: at 128 trapezoid steps it is a few
    # percent of f(x) - f(0) on these nets (the YAML's 16 Gauss-Legendre nodes: ~10-30 %)
    model, (x, target) = _zoo(cls), zoo_batch
    gap = _f(model, x, target) - _f(model, torch.zeros_like(x), target)
    ig = methods.integrated_gradients(model, x, target, steps=128, rule="riemann_trapezoid")
    torch.testing.assert_close(ig.sum(dim=(1, 2, 3)), gap, atol=1e-5, rtol=0.05)


def _bias_share(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum over biases b of b * df/db per sample (eval batch norm's bias is beta - gamma mu / sigma)."""
    layers = [m for m in model.modules()
              if isinstance(m, (nn.BatchNorm2d, nn.Conv2d, nn.Linear)) and m.bias is not None]
    biases = [(m.bias - m.weight * m.running_mean / torch.sqrt(m.running_var + m.eps)).detach()
              if isinstance(m, nn.BatchNorm2d) else m.bias.detach() for m in layers]
    shares = []
    for i in range(len(x)):                                       # per-sample parameter gradients
        grads = torch.autograd.grad(model(x[i:i + 1])[0, target[i]], [m.bias for m in layers])
        shares.append(sum((b * g).sum() for b, g in zip(biases, grads)))
    return torch.stack(shares)


@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
def test_lrp_epsilon_completeness_on_zoo(cls, zoo_batch):
    model, (x, target) = _zoo(cls), zoo_batch
    f = _f(model, x, target)
    r = methods.lrp_epsilon(model, x, target, epsilon=1e-9)
    # eps -> 0 on a ReLU net is gradient x input (Ancona et al. 2018): batch norm merged, max pools
    # and residual sums included; eps = 1e-9 and float32 leave ~1e-7 of max |R|
    gxi = methods.gradient_x_input(model, x, target)
    torch.testing.assert_close(r, gxi, atol=1e-4 * gxi.abs().max().item(), rtol=1e-4)
    # so the relevance sums to f(x) minus what the biases absorb, counted from d f / d b
    torch.testing.assert_close(r.sum(dim=(1, 2, 3)), f - _bias_share(model, x, target), atol=1e-6, rtol=1e-4)
    # without biases nothing is absorbed: sum_i R_i = f(x), with or without zero_bias
    free = _zoo(cls, biases=False)
    assert _bias_share(free, x, target).abs().max() == 0
    for zero_bias in (False, True):
        r = methods.lrp_epsilon(free, x, target, epsilon=1e-9, zero_bias=zero_bias)
        torch.testing.assert_close(r.sum(dim=(1, 2, 3)), _f(free, x, target), atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_completeness_on_the_trained_small_cnn(trained):
    # the YAML configurations on 16 test images of the trained model (f(x) ~ 2..20, f(0) ~ -3..3)
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["method=[integrated_gradients,deeplift,lrp_epsilon]"])
    model, x, target = trained.model, trained.x[:16], trained.target[:16]
    f = _f(model, x, target)
    gap = f - _f(model, torch.zeros_like(x), target)
    # IG, 16 Gauss-Legendre nodes: quadrature error up to 8 % of the gap (median 1 %) when measured
    ig = instantiate(cfg.method.integrated_gradients)(model, x, target).sum(dim=(1, 2, 3))
    assert ((ig - gap).abs() <= 0.1 * gap.abs()).all() and ((ig - gap).abs() / gap.abs()).median() < 0.03
    # DeepLIFT: exact up to float32 rounding
    dl = instantiate(cfg.method.deeplift)(model, x, target).sum(dim=(1, 2, 3))
    torch.testing.assert_close(dl, gap, atol=1e-4, rtol=1e-5)
    # LRP-epsilon (eps = 1e-6): f(x) minus the biases' share (about 60 % of f here); eps absorbs < 0.01
    r = instantiate(cfg.method.lrp_epsilon)(model, x, target).sum(dim=(1, 2, 3))
    torch.testing.assert_close(r, f - _bias_share(model, x, target), atol=0.01, rtol=1e-3)


# ---------------------------------------------------------------- DeepLIFT's max-pool rule by hand

class _ReluPool(nn.Module):
    def __init__(self, kernel=(2, 2), stride=None, weight=(1.0,)):
        super().__init__()
        self.relu, self.pool = nn.ReLU(), nn.MaxPool2d(kernel, stride)
        self.fc = nn.Linear(len(weight), 1, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([weight]))

    def forward(self, x):
        return self.fc(self.pool(self.relu(x)).flatten(1))


@pytest.mark.parametrize("x, ref, expected", [
    # y = 5 at x's argmax, y' = 3 at the reference's: M - y' = 2 goes to x's argmax (m = 2/5)
    ([[5.0, 1.0], [0.0, 0.0]], [[0.0, 3.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 0.0]]),
    # y = 2 < y' = 4: y - M = -2 goes to the reference's argmax (m = -2 / (1 - 4))
    ([[1.0, 2.0], [0.0, 0.0]], [[4.0, 0.0], [0.0, 0.0]], [[-2.0, 0.0], [0.0, 0.0]]),
])
def test_deeplift_max_pool_rule_by_hand(x, ref, expected):
    # captum 0.9 returns [[5, 0], ...] and [[0, 2], ...] here (the pool's rule is lost behind the ReLU)
    x, ref = torch.tensor([[x]]), torch.tensor([[ref]])
    a = _rescale(_ReluPool().eval(), x, ref, torch.tensor([0]), method="deeplift")
    torch.testing.assert_close(a, torch.tensor([[expected]]))


def test_deeplift_overlapping_pools_add_up():
    # windows [0, 9] and [9, 0] share their argmax: both Delta y = 9 must reach it (18), not one
    model = _ReluPool(kernel=(1, 2), stride=1, weight=(1.0, 1.0)).eval()
    x = torch.tensor([[[[0.0, 9.0, 0.0]]]])
    a = methods.deeplift(model, x, torch.tensor([0]), baseline=0.0)
    torch.testing.assert_close(a, torch.tensor([[[[0.0, 18.0, 0.0]]]]))


# ---------------------------------------------------------------- linear and analytic models

def test_linear_model_closed_forms(linear_batch):
    model, x, target = linear_batch
    w = model.weight.detach()[target]                                           # (B, C, H, W)
    torch.testing.assert_close(methods.gradient(model, x, target), w)           # signed
    # the gradient is constant, so any noise level leaves smoothgrad at w and vargrad at 0
    torch.testing.assert_close(methods.smoothgrad(model, x, target, samples=8, noise=0.3), w)
    torch.testing.assert_close(methods.smoothgrad_squared(model, x, target, samples=8, noise=0.3), w.square())
    torch.testing.assert_close(methods.vargrad(model, x, target, samples=8, noise=0.3), torch.zeros_like(w),
                               atol=1e-6, rtol=0)
    # DeepLIFT and expected gradients: w * (x - x'), for a fixed reference
    mean = x.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(methods.deeplift(model, x, target, baseline=0.0), w * x)
    torch.testing.assert_close(methods.deeplift(model, x, target, baseline="mean"), w * (x - mean))
    torch.testing.assert_close(methods.deeplift(model, x, target, baseline=0.5), w * (x - 0.5))
    torch.testing.assert_close(methods.expected_gradients(model, x, target, samples=5, baseline=0.0), w * x)
    # GradientSHAP (noise 0.2): the reference is subtracted from the noisy input, w * (x + sigma mean_k e_k - x')
    from methods._common import generator, value_range
    g = generator(0)
    torch.rand(5, *x.shape[1:], generator=g), torch.rand(5, generator=g)              # patterns, then a
    e_mean = torch.randn(5, *x.shape[1:], generator=g).mean(dim=0)                   # then e
    torch.testing.assert_close(methods.expected_gradients(model, x, target, samples=5, baseline="mean", noise=0.2),
                               w * (x + 0.2 * value_range(x) * e_mean - mean))


def test_linear_model_uniform_references(linear_batch):
    # with uniform references EG = w * (x - r), r = min + range * u: one pattern u in [0, 1]
    # shared by all samples (batch-invariant), averaged over 64 draws (mean ~ 1/2, sd ~ 0.036)
    model, x, target = linear_batch
    w = model.weight.detach()[target]
    eg = methods.expected_gradients(model, x, target, samples=64, baseline="uniform")
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    u = (x - eg / w - lo) / (hi - lo)                                           # (B, C, H, W)
    torch.testing.assert_close(u, u[:1].expand_as(u), atol=1e-4, rtol=0)
    assert ((u > 0.3) & (u < 0.7)).all() and abs(u.mean().item() - 0.5) < 0.03


def test_noise_free_smoothgrad_family_on_a_nonlinear_model(tiny_cnn, batch):
    x, target = batch
    g = methods.gradient(tiny_cnn, x, target)
    torch.testing.assert_close(methods.smoothgrad(tiny_cnn, x, target, samples=3, noise=0.0), g)
    torch.testing.assert_close(methods.smoothgrad_squared(tiny_cnn, x, target, samples=3, noise=0.0), g.square())
    assert torch.equal(methods.vargrad(tiny_cnn, x, target, samples=3, noise=0.0), torch.zeros_like(g))


def test_occlusion_on_pixel_sum_by_hand(pixel_sum):
    # f_c = (c + 1) sum(x); x = 0..8 on a 3x3 grid, 2x2 windows at stride 1: the patch sums are
    # 8 (top-left), 12, 20, 24; each pixel gets the mean over the windows covering it
    x = torch.arange(9.0).view(1, 1, 3, 3)
    expected = torch.tensor([[8.0, 10.0, 12.0], [14.0, 16.0, 18.0], [20.0, 22.0, 24.0]])
    a = methods.occlusion(pixel_sum, x, torch.tensor([0]), window=2, stride=1)
    torch.testing.assert_close(a[0, 0], expected)
    # class 1 doubles it; a baseline of 1 removes 4 (one per occluded pixel) from every patch drop
    a = methods.occlusion(pixel_sum, x, torch.tensor([1]), window=2, stride=1, baseline=1.0)
    torch.testing.assert_close(a[0, 0], 2 * (expected - 4))


def test_feature_ablation_on_pixel_sum_by_hand(pixel_sum):
    # 2 channels of 4x4, a 2x2 grid of 2x2 superpixels spanning both channels: each pixel gets
    # (c + 1) * the sum of (x - baseline) over its superpixel
    x = torch.arange(32.0).view(1, 2, 4, 4)
    a = methods.feature_ablation(pixel_sum, x, torch.tensor([1]), cells=2, baseline=0.5)
    # top-left cell: channel 0 {0, 1, 4, 5} + channel 1 {16, 17, 20, 21} = 84, minus 8 * 0.5
    cell = torch.tensor([[84.0, 100.0], [148.0, 164.0]]) - 4.0
    expected = 2 * cell.repeat_interleave(2, 0).repeat_interleave(2, 1)
    torch.testing.assert_close(a[0], expected.expand(2, 4, 4))


def test_rise_on_pixel_sum_by_hand(pixel_sum):
    x = torch.arange(16.0).view(1, 1, 4, 4) / 4
    total = x.sum().item()                                                      # 30
    model, target = pixel_sum, torch.tensor([1])
    # p -> 1: every mask keeps everything, S = sum_k f(x) M_k / (K p) = f(x) / p at every pixel
    p = 1 - 1e-6
    s = methods.rise(model, x, target, masks=20, cells=2, p=p, output="logit")
    torch.testing.assert_close(s[0, 0], torch.full((4, 4), 2 * total / p))
    # one cell: every mask is all-ones or all-zeros, so S = f(x) n / (K p) everywhere, n the number
    # of all-ones masks (an integer), whatever the baseline (m (1 - m) = 0)
    K, p = 400, 0.5
    s = methods.rise(model, x, target, masks=K, cells=1, p=p, output="logit", seed=1)
    n = s[0, 0] * K * p / (2 * total)
    torch.testing.assert_close(n, n[0, 0].round().expand(4, 4))
    assert abs(n[0, 0].item() - K * p) < 4 * math.sqrt(K * p * (1 - p))
    s3 = methods.rise(model, x, target, masks=K, cells=1, p=p, output="logit", seed=1, baseline=3.0)
    torch.testing.assert_close(s3, s)


# ---------------------------------------------------------------- CAMs by hand

class SpatialReadout(nn.Module):
    """A = relu(conv1x1(x)) with channels relu(x), relu(-x); f_k = sum_{c,i,j} V_kcij A_cij, so
    d f_k / d A = V_k: a gradient that varies over the layer, for the location-aware CAMs."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(1, 2, 1, bias=False), nn.ReLU()
        self.flat, self.fc = nn.Flatten(), nn.Linear(8, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0, -1.0, 0.5, 0.5, 1.0, 2.0, -1.0],      # V_0: c0, c1
                                               [-1.0, 0.0, 1.0, 1.0, 1.0, -2.0, 0.0, 3.0]]))   # V_1

    def forward(self, x):
        return self.fc(self.flat(self.relu(self.conv(x))))


X = torch.tensor([[[[1.0, -2.0], [3.0, 0.5]]]])       # A_0 = [[1, 0], [3, .5]], A_1 = [[0, 2], [0, 0]]


def test_grad_cam_plus_plus_by_hand():
    # a = g^2 / (2 g^2 + sum(A_k) g^3), w_k = sum_ij a ReLU(g); class 0, g = V_0:
    # channel 0 (sum A = 4.5): a = 2/13, 1/11, (g < 0), 4/17 -> w_0 = 2/13 + 2/11 + 2/17
    # channel 1 (sum A = 2): a = 1/3, 1/4, 1/6, (0 / 0 -> 0) -> w_1 = 1/6 + 1/4 + 1/3 = 3/4
    w0 = 2 / 13 + 2 / 11 + 2 / 17
    cam = methods.grad_cam_plus_plus(SpatialReadout().eval(), X, torch.tensor([0]))
    torch.testing.assert_close(cam, torch.tensor([[[[w0, 0.75 * 2], [3 * w0, 0.5 * w0]]]]))
    # class 1, g = V_1: channel 0 g = [[-1, 0], [1, 1]]: a = 1 / (2 + 4.5) = 2/13 at (1, 0) and (1, 1)
    # -> w_0 = 4/13; channel 1 g = [[1, -2], [0, 3]]: a = 1 / (2 + 2) = 1/4 at (0, 0),
    # 9 / (18 + 54) = 1/8 at (1, 1) -> w_1 = 1/4 + 3 * 1/8 = 5/8
    cam = methods.grad_cam_plus_plus(SpatialReadout().eval(), X, torch.tensor([1]))
    w0, w1 = 4 / 13, 5 / 8
    torch.testing.assert_close(cam, torch.tensor([[[[w0, 2 * w1], [3 * w0, 0.5 * w0]]]]))


def test_layer_cam_by_hand():
    # ReLU(sum_k ReLU(g_k) * A_k) per location
    model = SpatialReadout().eval()
    # class 0: ReLU(V_0) = [[1, 2], [0, .5]], [[.5, 1], [2, 0]] -> [[1, 0], [0, .25]] + [[0, 2], [0, 0]]
    torch.testing.assert_close(methods.layer_cam(model, X, torch.tensor([0])),
                               torch.tensor([[[[1.0, 2.0], [0.0, 0.25]]]]))
    # class 1: ReLU(V_1) = [[0, 0], [1, 1]], [[1, 0], [0, 3]] -> [[0, 0], [3, .5]] + 0
    torch.testing.assert_close(methods.layer_cam(model, X, torch.tensor([1])),
                               torch.tensor([[[[0.0, 0.0], [3.0, 0.5]]]]))


def test_score_cam_by_hand():
    # N_0 = A_0 / 3, N_1 = A_1 / 2; the masked inputs x * N_k give logits (hand-computed):
    # x N_0 = [[1/3, 0], [3, 1/12]] -> f = (-2.625, 2.75); x N_1 = [[0, -2], [0, 0]] -> f = (2, -4)
    model, A0, A1 = SpatialReadout().eval(), torch.tensor([[1.0, 0.0], [3.0, 0.5]]), torch.tensor([[0.0, 2.0], [0, 0]])
    s0, s1 = 1 / (1 + math.exp(2.75 + 2.625)), 1 / (1 + math.exp(-4 - 2))     # softmax of class 0
    torch.testing.assert_close(methods.score_cam(model, X, torch.tensor([0]))[0, 0], s0 * A0 + s1 * A1)
    # logits as weights: ReLU(-2.625 A_0 + 2 A_1) = [[0, 4], [0, 0]]
    torch.testing.assert_close(methods.score_cam(model, X, torch.tensor([0]), output="logit")[0, 0],
                               torch.tensor([[0.0, 4.0], [0.0, 0.0]]))
    # class 1 with logits: ReLU(2.75 A_0 - 4 A_1) = [[2.75, 0], [8.25, 1.375]]
    torch.testing.assert_close(methods.score_cam(model, X, torch.tensor([1]), output="logit")[0, 0],
                               torch.tensor([[2.75, 0.0], [8.25, 1.375]]))


# ---------------------------------------------------------------- one clear error

CAMS = ["grad_cam", "guided_grad_cam", "grad_cam_plus_plus", "layer_cam", "score_cam"]
LRPS = ["lrp_epsilon", "lrp_gamma", "lrp_alpha1_beta0", "lrp_epsilon_plus_flat", "lrp_epsilon_gamma_box"]


def _one_error(call, pattern: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert info.value.__context__ is None and info.value.__cause__ is None             # one error, not a chain
    assert info.match(pattern)


@pytest.mark.parametrize("name", CAMS)
def test_cam_without_spatial_layer_raises_one_clear_error(name, linear_batch):
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    _one_error(lambda: getattr(methods, name)(linear_batch[0], x, torch.tensor([0, 1])),
               rf"^{name} cannot run on Linear: it needs a spatial layer")


class _TanhNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(3, 2, 3, padding=1), nn.Tanh(), nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


class _NormFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv, self.fc = nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3, padding=1), nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.conv(self.bn(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("name", LRPS)
def test_lrp_on_unsupported_layer_raises_one_clear_error(name):
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    _one_error(lambda: getattr(methods, name)(_TanhNet().eval(), x, torch.tensor([0, 1])),
               rf"^{name} cannot run on _TanhNet: layer 'act' \(Tanh\) has no LRP rule here")
    _one_error(lambda: getattr(methods, name)(_NormFirst().eval(), x, torch.tensor([0, 1])),
               rf"^{name} cannot run on _NormFirst: batch norm 'bn' does not directly follow a conv or linear")


def test_deeplift_on_unsupported_or_reused_module_raises_one_clear_error():
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    norm = nn.Sequential(nn.Conv2d(3, 2, 1), nn.GroupNorm(1, 2), nn.Flatten(), nn.Linear(32, 2)).eval()
    _one_error(lambda: methods.deeplift(norm, x, torch.tensor([0, 1])),
               r"^deeplift cannot run on Sequential: layer '1' \(GroupNorm\) has no DeepLIFT rule here")
    relu = nn.ReLU()
    reused = nn.Sequential(nn.Conv2d(3, 3, 1), relu, nn.Conv2d(3, 2, 1), relu, nn.Flatten(), nn.Linear(32, 2)).eval()
    _one_error(lambda: methods.deeplift_shap(reused, x, torch.tensor([0, 1]), samples=2),
               r"^deeplift_shap cannot run on Sequential: module '1' runs 2 times per forward")


# ---------------------------------------------------------------- the model is restored, even on error

class _Tripwire(nn.Identity):
    """Identity that raises on its n-th forward, or in the backward pass (an Identity, so LRP accepts it)."""

    def __init__(self):
        super().__init__()
        self.when, self.calls = None, 0

    def forward(self, x):
        self.calls += 1
        if self.when == ("forward", self.calls):
            raise RuntimeError("tripwire")
        if self.when == "backward" and x.requires_grad:
            x = x.clone()
            x.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("tripwire")))
        return x


class _Trapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.relu1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.pool, self.trip = nn.MaxPool2d(2), _Tripwire()
        self.conv2, self.relu2, self.drop = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.0)
        self.gap, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3)

    def forward(self, x):
        x = self.trip(self.pool(self.relu1(self.bn(self.conv1(x)))))
        return self.fc(self.gap(self.drop(self.relu2(self.conv2(x)))).flatten(1))


def _snapshot(model: nn.Module):
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return ([(m.training, sorted(vars(m)), [list(getattr(m, h)) for h in hooks]) for m in model.modules()],
            [(p, p.requires_grad) for p in model.parameters()],
            {k: v.clone() for k, v in model.state_dict().items()})


# no backward pass reaches the tripwire: perturbation methods, and CAMs (gradients stop at the last layer)
NO_BACKWARD = {"occlusion", "rise", "lime", "kernel_shap", "feature_ablation", "score_cam", "grad_cam",
               "grad_cam_plus_plus", "layer_cam"}
USES_MODEL = sorted(set(methods.__all__) - {"random_map", "edge", "centre", "constant", "attribution_method",
                                            "last_spatial_layer", "grid_segments"})


@pytest.mark.parametrize("name", USES_MODEL)
def test_model_restored_when_the_method_raises(name):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Trapped().eval()
    model.drop.train()                                     # a mixed mode, as a user may leave it
    model.conv1.weight.requires_grad_(False)               # and a frozen parameter
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before_out = model(x)
    before = _snapshot(model)
    # the first forward (before or after the method's hooks), the second (if any), the first backward
    for when in [("forward", 1), ("forward", 2)] + ([] if name in NO_BACKWARD else ["backward"]):
        model.trip.when, model.trip.calls = when, 0
        try:
            getattr(methods, name)(model, x, torch.tensor([0, 2]))
            assert when == ("forward", 2), f"{name} did not raise at {when}"
        except RuntimeError as e:
            assert str(e) == "tripwire"
        after = _snapshot(model)
        assert after[0] == before[0], f"{name} ({when}): modes, attributes or hooks changed"
        assert [(p is q, f == g) for (p, f), (q, g) in zip(after[1], before[1])] == [(True, True)] * len(before[1])
        assert all(torch.equal(v, before[2][k]) for k, v in after[2].items())
    model.trip.when = None
    with torch.no_grad():
        assert torch.equal(model(x), before_out)


CHUNKED = {                         # methods with a pass size, and small settings for them
    "smoothgrad": {"samples": 6}, "smoothgrad_squared": {"samples": 6}, "vargrad": {"samples": 6},
    "expected_gradients": {"samples": 6}, "deeplift_shap": {"samples": 4}, "rise": {"masks": 12},
    "lime": {"samples": 12, "cells": 2}, "kernel_shap": {"samples": 12, "cells": 2}, "score_cam": {},
    "integrated_gradients": {"steps": 6},
}


@pytest.mark.parametrize("name", CHUNKED)
def test_pass_size_from_the_memory_budget(name, tiny_cnn, batch, monkeypatch):
    """chunk_size (internal_batch_size for IG) None sizes each forward pass from metrics.batching's budget,
    at least one draw of the whole batch (IG: one node of a group of samples), and gives the maps of
    explicit pass sizes."""
    import metrics.batching
    x, target = batch
    size = "internal_batch_size" if name == "integrated_gradients" else "chunk_size"
    fn, kwargs = getattr(methods, name), CHUNKED[name]
    explicit = fn(tiny_cnn, x.clone(), target, **kwargs, **{size: len(x)})
    passes = []
    hook = tiny_cnn.conv1.register_forward_hook(lambda m, i, o: passes.append(len(i[0])))
    monkeypatch.setitem(metrics.batching.CHUNK_BYTES, "cpu", 2 * x[0].numel() * x.element_size())   # 2 images
    try:
        auto = fn(tiny_cnn, x.clone(), target, **kwargs)
    finally:
        hook.remove()
    torch.testing.assert_close(auto, explicit, rtol=1e-5, atol=1e-6)
    per_draw = name in ("smoothgrad", "smoothgrad_squared", "vargrad", "expected_gradients",
                        "deeplift_shap")                            # passes of whole draws of the batch
    expected = len(x) if per_draw else 2
    assert max(set(passes), key=passes.count) == expected and passes.count(expected) >= 2, passes   # besides probes


def test_integrated_gradients_retries_a_pass_that_runs_out_of_memory(tiny_cnn, batch):
    """captum batches IG's nodes itself; a pass that runs out of memory is retried once at half the size,
    with a ChunkRetryWarning (what the runner records), and gives the same map."""
    from metrics.batching import ChunkRetryWarning
    x, target = batch
    sizes = []

    class Tight(nn.Module):                                             # "out of memory" above 2 draws of the batch
        def forward(self, inputs):
            sizes.append(len(inputs))
            if len(inputs) > 2 * len(x):
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return tiny_cnn(inputs)

    expected = methods.integrated_gradients(tiny_cnn, x.clone(), target, steps=4, internal_batch_size=len(x))
    with pytest.warns(ChunkRetryWarning, match="internal_batch_size=20; retried with internal_batch_size=10"):
        got = methods.integrated_gradients(Tight(), x.clone(), target, steps=4, internal_batch_size=4 * len(x))
    torch.testing.assert_close(got, expected)
    assert sizes[0] == 4 * len(x) and set(sizes[1:]) == {2 * len(x)}
    with pytest.raises(RuntimeError, match="out of memory"), pytest.warns(ChunkRetryWarning):   # one retry only
        methods.integrated_gradients(Tight(), x.clone(), target, steps=8, internal_batch_size=8 * len(x))
