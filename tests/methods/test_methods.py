import pytest
import torch
from torch import nn

import methods


def test_linear_model_gradients_equal_weights(linear_batch):
    model, x, target = linear_batch
    w = model.weight.detach()[target]                                          # (B, C, H, W)
    torch.testing.assert_close(methods.saliency(model, x, target), w.abs())
    torch.testing.assert_close(methods.gradient_x_input(model, x, target), w * x)
    torch.testing.assert_close(methods.guided_backprop(model, x, target), w)   # no ReLU: plain gradient
    # IG of a linear model from baseline 0 is exactly (x - 0) * w for any number of steps
    torch.testing.assert_close(methods.integrated_gradients(model, x, target, steps=3), w * x)


def test_integrated_gradients_completeness(tiny_cnn, batch):
    x, target = batch
    ig = methods.integrated_gradients(tiny_cnn, x, target, steps=64)
    with torch.no_grad():
        gap = tiny_cnn(x).gather(1, target[:, None]).squeeze(1) - tiny_cnn(torch.zeros_like(x)).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(ig.sum(dim=(1, 2, 3)), gap, atol=1e-3, rtol=1e-3)


class TwoLayer(nn.Module):
    """A = relu(conv1x1(x)) with 2 channels, f_k = sum_c v_kc * mean_hw A_c: Grad-CAM by hand."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[2.0, 1.0], [-1.0, 3.0]]))

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def test_grad_cam_hand_computed():
    model = TwoLayer().eval()
    x = torch.tensor([[[[1.0, -2.0], [3.0, 0.5]]]])                           # (1, 1, 2, 2)
    # A_0 = relu(x) = [[1, 0], [3, .5]], A_1 = relu(-x) = [[0, 2], [0, 0]]
    # class 0: alpha = v_0 / (h w) = [2, 1] / 4 -> cam = relu(.5 A_0 + .25 A_1) = [[.5, .5], [1.5, .25]]
    cam = methods.grad_cam(model, x, torch.tensor([0]), layer="relu")
    torch.testing.assert_close(cam, torch.tensor([[[[0.5, 0.5], [1.5, 0.25]]]]))
    # class 1: alpha = [-1, 3] / 4 -> relu(-.25 A_0 + .75 A_1) = [[0, 1.5], [0, 0]]
    cam = methods.grad_cam(model, x, torch.tensor([1]))                        # layer found automatically
    torch.testing.assert_close(cam, torch.tensor([[[[0.0, 1.5], [0.0, 0.0]]]]))


def test_grad_cam_upsamples_and_broadcasts(tiny_cnn, batch, linear_batch):
    x, target = batch
    assert methods.last_spatial_layer(tiny_cnn, x) == "relu2"
    cam = methods.grad_cam(tiny_cnn, x, target)
    assert cam.shape == x.shape and torch.equal(cam[:, 0], cam[:, 2]) and (cam >= 0).all()
    with pytest.raises(ValueError, match="'nope' is not a module"):
        methods.grad_cam(tiny_cnn, x, target, layer="nope")
    with pytest.raises(ValueError, match="needs a spatial layer"):
        methods.grad_cam(linear_batch[0], torch.zeros(1, 3, 4, 4), torch.tensor([0]))


def test_edge_is_sobel_magnitude():
    # a vertical step edge: gray = 0 left of column 2, 1 from column 2 on; Sobel d/dx = 4 at columns 1 and 2
    x = torch.zeros(1, 3, 5, 5)
    x[..., 2:] = 1.0
    e = methods.edge(None, x, torch.tensor([0]))
    expected = torch.tensor([0.0, 4.0, 4.0, 0.0, 0.0]).expand(5, 5)
    torch.testing.assert_close(e[0, 0], expected)
    assert torch.equal(e[0, 0], e[0, 1])


def test_random_map_is_seeded_and_batch_invariant(batch):
    x, target = batch
    a = methods.random_map(None, x, target, seed=1)
    torch.testing.assert_close(methods.random_map(None, x[2:3], target[2:3], seed=1), a[2:3])
    assert not torch.equal(methods.random_map(None, x, target, seed=2), a)
    assert not torch.equal(a[0], a[1])
    assert ((a >= 0) & (a < 1)).all() and torch.equal(a[:, 0], a[:, 1])
