import pytest
import torch

from metrics import pixel_flipping


def pixel_flipping_reference(model, x, target, attribution, *, steps, order="morf", baseline=0.0, seed=0):
    """Per-sample, per-step loop straight from the definition: slow, obviously right."""
    B, C, H, W = x.shape
    n = H * W
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    curves = []
    for b in range(B):
        a = attribution[b].reshape(-1)
        # order pixels by value (desc for MoRF), ties by their position in the shared permutation
        tie = torch.empty(n, dtype=torch.long)
        tie[perm] = torch.arange(n)
        keyed = sorted(range(n), key=lambda p: ((-a[p].item() if order == "morf" else a[p].item()), tie[p].item()))
        ys = []
        for k in range(steps + 1):
            removed = keyed[: -(-k * n // steps)]                    # ceil(k n / steps) pixels
            xk = x[b].clone().reshape(C, n)
            xk[:, removed] = baseline
            ys.append(model(xk.reshape(1, C, H, W))[0, target[b]].item())
        curves.append(ys)
    return torch.tensor(curves)


def test_hand_computed_linear_model(pixel_sum):
    # f(x) = sum of pixels; x = [[1, 2]] (one channel, 1x2), map = x, 2 steps, MoRF:
    # curve 3 -> 1 -> 0 at x = 0, 0.5, 1: AUC = 0.5*(3+1)/2 + 0.5*(1+0)/2 = 1.25, AOPC = (0 + 2 + 3)/3 = 5/3
    x = torch.tensor([[[[1.0, 2.0]]]])
    r = pixel_flipping(pixel_sum, x, torch.tensor([0]), x[:, 0], steps=2, order="morf")
    torch.testing.assert_close(r.curves["curve"].y, torch.tensor([[3.0, 1.0, 0.0]]))
    torch.testing.assert_close(r.curves["curve"].x, torch.tensor([0.0, 0.5, 1.0]))
    assert r.scores["auc"].item() == pytest.approx(1.25)
    assert r.scores["aopc"].item() == pytest.approx(5 / 3)
    assert r.higher_is_better == {"auc": False, "aopc": True}
    # LeRF removes the 1 first: curve 3 -> 2 -> 0, AUC = 0.5*(5/2) + 0.5*(2/2) = 1.75
    r = pixel_flipping(pixel_sum, x, torch.tensor([0]), x[:, 0], steps=2, order="lerf")
    torch.testing.assert_close(r.curves["curve"].y, torch.tensor([[3.0, 2.0, 0.0]]))
    assert r.scores["auc"].item() == pytest.approx(1.75)
    assert r.higher_is_better == {"auc": True, "aopc": False}


def test_linear_model_closed_form_4x4(pixel_sum):
    # 4x4 image with values 1..16, map = values, 4 steps of 4 pixels, MoRF removes 16..13 first:
    # f_k = sum of the 16 - 4k smallest values = (16-4k)(17-4k)/2 -> 136, 78, 36, 10, 0; class 1 doubles it.
    x = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    r = pixel_flipping(pixel_sum, x, torch.tensor([1]), x[:, 0], steps=4, output="logit")
    torch.testing.assert_close(r.curves["curve"].y, 2 * torch.tensor([[136.0, 78.0, 36.0, 10.0, 0.0]]))


def test_fractional_steps_use_exact_fractions(pixel_sum):
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    r = pixel_flipping(pixel_sum, x, torch.tensor([0]), x[:, 0], steps=2)
    # 9 pixels in 2 steps: ceil(4.5) = 5 removed after step 1 (9+8+7+6+5), all 9 after step 2
    torch.testing.assert_close(r.curves["curve"].x, torch.tensor([0.0, 5 / 9, 1.0]))
    torch.testing.assert_close(r.curves["curve"].y, torch.tensor([[45.0, 10.0, 0.0]]))


@pytest.mark.parametrize("seed", [0, 0xDEADBEEF])
@pytest.mark.parametrize("steps,order", [(1, "morf"), (7, "lerf"), (13, "morf"), (64, "morf")])
def test_matches_reference(tiny_cnn, batch, seed, steps, order):
    x, target = batch
    g = torch.Generator().manual_seed(seed)
    attribution = torch.randint(0, 5, (5, 8, 8), generator=g).float()      # many ties
    fast = pixel_flipping(tiny_cnn, x, target, attribution, steps=steps, order=order, seed=seed, chunk_size=7)
    slow = pixel_flipping_reference(tiny_cnn, x, target, attribution, steps=steps, order=order, seed=seed)
    torch.testing.assert_close(fast.curves["curve"].y, slow, atol=1e-5, rtol=1e-5)


def test_invariances(tiny_cnn, batch):
    x, target = batch
    attribution = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(1))
    x0, state = x.clone(), {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    ref = pixel_flipping(tiny_cnn, x, target, attribution, steps=8)
    # chunk size does not change results
    other = pixel_flipping(tiny_cnn, x, target, attribution, steps=8, chunk_size=3)
    torch.testing.assert_close(ref.scores["auc"], other.scores["auc"])
    # permuting the batch permutes the scores; a sample's score does not depend on its batch
    p = torch.tensor([3, 1, 4, 0, 2])
    permuted = pixel_flipping(tiny_cnn, x[p], target[p], attribution[p], steps=8)
    torch.testing.assert_close(permuted.scores["aopc"], ref.scores["aopc"][p])
    alone = pixel_flipping(tiny_cnn, x[2:3], target[2:3], attribution[2:3], steps=8)
    torch.testing.assert_close(alone.scores["auc"], ref.scores["auc"][2:3])
    # a positive rescaling of the map changes nothing (rank-based)
    scaled = pixel_flipping(tiny_cnn, x, target, 3.0 * attribution + 1.0, steps=8)
    torch.testing.assert_close(scaled.scores["auc"], ref.scores["auc"])
    # inputs and model unchanged
    assert torch.equal(x, x0)
    assert all(torch.equal(v, state[k]) for k, v in tiny_cnn.state_dict().items())


def test_softmax_output(tiny_cnn, batch):
    x, target = batch
    attribution = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(2))
    r = pixel_flipping(tiny_cnn, x, target, attribution, steps=4, output="softmax")
    expected = tiny_cnn(x).softmax(dim=1).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(r.curves["curve"].y[:, 0], expected)


@pytest.mark.parametrize("kwargs,message", [
    ({"steps": 0}, "steps must be between 1"),
    ({"order": "random"}, "order must be 'morf' or 'lerf'"),
    ({"output": "prob"}, "output must be 'logit' or 'softmax'"),
    ({"chunk_size": 0}, "chunk_size must be a positive integer"),
])
def test_bad_options(tiny_cnn, batch, kwargs, message):
    x, target = batch
    with pytest.raises(ValueError, match=message):
        pixel_flipping(tiny_cnn, x, target, torch.zeros(5, 8, 8), **kwargs)


def test_bad_shapes(tiny_cnn, batch):
    x, target = batch
    with pytest.raises(ValueError, match=r"reduce an attribution \(B, C, H, W\) with metrics.to_map"):
        pixel_flipping(tiny_cnn, x, target, torch.zeros(5, 3, 8, 8))
    with pytest.raises(ValueError, match="NaN or Inf"):
        pixel_flipping(tiny_cnn, x, target, torch.full((5, 8, 8), torch.nan))
