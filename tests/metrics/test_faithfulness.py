import math

import numpy as np
import pytest
import torch

from bench.config import CONF, derive_seeds
from bench.provenance import without_meta
from metrics import pixel_flipping, to_map

from metrics.batching import CHUNK_BYTES, auto_chunk_size


def pixel_flipping_reference(model, x, target, attribution, *, steps, order="morf", baseline=0.0, seed=0, budget=None):
    """Per-sample, per-step loop straight from the definition: slow, obviously right. `budget`: the
    pixels removed by the last step (Samek et al.'s L regions), all of them by default."""
    B, C, H, W = x.shape
    n = H * W
    m = n if budget is None else budget
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
            removed = keyed[: -(-k * m // steps)]                    # ceil(k m / steps) pixels
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


def test_automatic_chunk_size(tiny_cnn, batch, monkeypatch):
    """chunk_size None fits CHUNK_BYTES of inputs per forward pass, and chunks never change a number."""
    assert auto_chunk_size(torch.zeros(2, 3, 64, 64)) == (2 << 20) // (3 * 64 * 64 * 4) == 42
    assert auto_chunk_size(torch.zeros(1, 3, 4096, 4096)) == 1
    x, target = batch
    attribution = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = pixel_flipping(tiny_cnn, x, target, attribution, steps=8, chunk_size=1000)
    monkeypatch.setitem(CHUNK_BYTES, "cpu", 3 * x[0].numel() * x.element_size())   # 3 inputs per chunk
    sizes = []
    hook = tiny_cnn.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    try:
        auto = pixel_flipping(tiny_cnn, x, target, attribution, steps=8)
    finally:
        hook.remove()
    assert sizes == [3] * 15                                      # 5 samples x 9 points
    torch.testing.assert_close(auto.scores["auc"], ref.scores["auc"])


def test_softmax_output(tiny_cnn, batch):
    x, target = batch
    attribution = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(2))
    r = pixel_flipping(tiny_cnn, x, target, attribution, steps=4, output="softmax")
    expected = tiny_cnn(x).softmax(dim=1).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(r.curves["curve"].y[:, 0], expected)


@pytest.mark.parametrize("kwargs,message", [
    ({"steps": 0}, "steps must be between 1"),
    ({"order": "random"}, "order must be 'morf', 'lerf' or 'both'"),
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
    with pytest.raises(ValueError, match=r"x holds no samples \(B = 0\)"):
        pixel_flipping(tiny_cnn, x[:0], target[:0], torch.zeros(0, 8, 8))


# ---- region perturbation, both orders, baselines, ties ---------------------------------------------------

from scipy import ndimage  # noqa: E402

from metrics import deletion, faithfulness_correlation, infidelity, insertion, road  # noqa: E402
from metrics._perturb import _noisy_linear_imputation  # noqa: E402
from metrics.baselines import BLUR_SIGMA, baseline_fill as _baseline_fill  # noqa: E402


def region_reference(model, x, target, attribution, *, steps, patch, order="morf", seed=0):
    """Per-sample loop: patch sums over a grid (partial patches at the far edges), units ranked with the
    shared tie permutation, ceil(k n / steps) units removed (set to 0) at step k."""
    B, C, H, W = x.shape
    Hp, Wp = -(-H // patch), -(-W // patch)
    n = Hp * Wp
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tie = torch.empty(n, dtype=torch.long)
    tie[perm] = torch.arange(n)
    curves = []
    for b in range(B):
        sums = [attribution[b, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].sum().item()
                for i in range(Hp) for j in range(Wp)]
        keyed = sorted(range(n), key=lambda u: ((-sums[u] if order == "morf" else sums[u]), tie[u].item()))
        ys = []
        for k in range(steps + 1):
            xk = x[b].clone()
            for u in keyed[: -(-k * n // steps)]:
                i, j = divmod(u, Wp)
                xk[:, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch] = 0.0
            ys.append(model(xk[None])[0, target[b]].item())
        curves.append(ys)
    return torch.tensor(curves)


def test_region_perturbation_hand_computed(pixel_sum):
    # 4x4 values 1..16, 2x2 patches: sums 14 (top-left), 22, 46, 54 (bottom-right); MoRF removes 54, 46, 22, 14
    x = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    r = pixel_flipping(pixel_sum, x, torch.tensor([0]), x[:, 0], steps=4, patch=2)
    torch.testing.assert_close(r.curves["curve"].y, torch.tensor([[136.0, 82.0, 36.0, 14.0, 0.0]]))
    torch.testing.assert_close(r.curves["curve"].x, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    # 3x3 with a partial grid: patches {1,2,4,5}=12, {3,6}=9, {7,8}=15, {10}=10 -> remove 15, 12, 10, 9
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 10.0]]).reshape(1, 1, 3, 3)
    r = pixel_flipping(pixel_sum, x, torch.tensor([0]), x[:, 0], steps=4, patch=2)
    torch.testing.assert_close(r.curves["curve"].y, torch.tensor([[46.0, 31.0, 19.0, 9.0, 0.0]]))


@pytest.mark.parametrize("patch,steps,order", [(2, 16, "morf"), (3, 9, "lerf"), (3, 4, "morf"), (5, 2, "lerf")])
def test_region_perturbation_matches_reference(tiny_cnn, batch, patch, steps, order):
    x, target = batch
    attribution = torch.randint(0, 3, (5, 8, 8), generator=torch.Generator().manual_seed(patch)).float()  # ties
    fast = pixel_flipping(tiny_cnn, x, target, attribution, steps=steps, order=order, patch=patch, chunk_size=5)
    slow = region_reference(tiny_cnn, x, target, attribution, steps=steps, patch=patch, order=order)
    torch.testing.assert_close(fast.curves["curve"].y, slow, atol=1e-5, rtol=1e-5)


def test_both_orders_and_srg(pixel_sum, tiny_cnn, batch):
    x = torch.tensor([[[[1.0, 2.0]]]])
    r = pixel_flipping(pixel_sum, x, torch.tensor([0]), x[:, 0], steps=2, order="both")
    torch.testing.assert_close(r.curves["morf"].y, torch.tensor([[3.0, 1.0, 0.0]]))
    torch.testing.assert_close(r.curves["lerf"].y, torch.tensor([[3.0, 2.0, 0.0]]))
    assert r.scores["srg"].item() == pytest.approx(1.75 - 1.25)
    assert r.higher_is_better == {"auc_morf": False, "auc_lerf": True, "aopc_morf": True, "aopc_lerf": False,
                                  "srg": True}
    x, target = batch
    a = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(3))
    both = pixel_flipping(tiny_cnn, x, target, a, steps=5, order="both", patch=2, chunk_size=4)
    for o in ("morf", "lerf"):
        one = pixel_flipping(tiny_cnn, x, target, a, steps=5, order=o, patch=2)
        torch.testing.assert_close(both.curves[o].y, one.curves["curve"].y)
        torch.testing.assert_close(both.scores[f"auc_{o}"], one.scores["auc"])
        torch.testing.assert_close(both.scores[f"aopc_{o}"], one.scores["aopc"])
    torch.testing.assert_close(both.scores["srg"], both.scores["auc_lerf"] - both.scores["auc_morf"])


def test_baselines_hand_computed(pixel_sum):
    x = torch.tensor([[[[1.0, 2.0]]]])                    # MoRF removes the 2, then the 1
    curve = lambda baseline: pixel_flipping(pixel_sum, x, torch.tensor([0]), x[:, 0], steps=2,
                                            baseline=baseline).curves["curve"].y
    torch.testing.assert_close(curve("image_min"), torch.tensor([[3.0, 2.0, 2.0]]))   # the image's minimum, 1
    torch.testing.assert_close(curve("mean"), torch.tensor([[3.0, 2.5, 3.0]]))        # the channel mean, 1.5
    torch.testing.assert_close(curve(-1.0), torch.tensor([[3.0, 0.0, -2.0]]))
    torch.testing.assert_close(curve(torch.tensor([10.0, 20.0]).view(1, 1, 1, 2)), torch.tensor([[3.0, 21.0, 30.0]]))
    # two-channel image: "image_min" is the minimum over channels and pixels, "channel_min" and "mean" per channel
    x2 = torch.tensor([[[[1.0, 2.0]], [[5.0, 7.0]]]])
    torch.testing.assert_close(_baseline_fill(x2, "image_min", seed=0), torch.tensor(1.0).view(1, 1, 1, 1))
    torch.testing.assert_close(_baseline_fill(x2, "channel_min", seed=0), torch.tensor([1.0, 5.0]).view(1, 2, 1, 1))
    with pytest.raises(ValueError, match="baseline 'black' is now called 'image_min'"):
        pixel_flipping(pixel_sum, x, torch.tensor([0]), x[:, 0], steps=2, baseline="black")
    torch.testing.assert_close(_baseline_fill(x2, "mean", seed=0), torch.tensor([1.5, 6.0]).view(1, 2, 1, 1))


def test_blur_and_uniform_baselines(batch):
    x, _ = batch
    blurred = _baseline_fill(x, "blur", seed=0)
    # independent implementation: scipy's Gaussian filter, per image and channel, edge-replicating ('nearest')
    expected = ndimage.gaussian_filter(x.double().numpy(), sigma=(0, 0, BLUR_SIGMA, BLUR_SIGMA), mode="nearest",
                                       truncate=3.0)
    torch.testing.assert_close(blurred.double(), torch.from_numpy(expected), atol=1e-5, rtol=1e-5)
    u = _baseline_fill(x, "uniform", seed=4)
    lo, hi = x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))
    v = (u - lo.view(-1, 1, 1, 1)) / (hi - lo).view(-1, 1, 1, 1)       # the shared field in [0, 1)
    torch.testing.assert_close(v, v[:1].expand_as(v))
    assert torch.equal(_baseline_fill(x[2:3], "uniform", seed=4), u[2:3])     # a sample's fill is its own
    assert not torch.equal(_baseline_fill(x, "uniform", seed=5), u)


def test_constant_map_matches_random_maps_in_expectation(tiny_cnn, batch, pixel_sum):
    # a constant map is ranked by the seeded tie permutation alone: a uniformly random order, as a random map's
    x, target = batch
    seeds = range(150)
    const = torch.stack([pixel_flipping(tiny_cnn, x, target, torch.zeros(5, 8, 8), steps=4, seed=s)
                         .curves["curve"].y for s in seeds])                       # (S, B, K)
    rand = torch.stack([pixel_flipping(tiny_cnn, x, target, torch.rand(5, 8, 8, generator=torch.Generator()
                                       .manual_seed(1000 + s)), steps=4).curves["curve"].y for s in seeds])
    se = (const.var(dim=0) / len(seeds) + rand.var(dim=0) / len(seeds)).sqrt()
    z = (const.mean(dim=0) - rand.mean(dim=0)).abs() / se.clamp_min(1e-12)
    assert z[:, 1:-1].max() < 4.5, z
    assert (const.std(dim=0)[:, 1:-1] > 0).all()                                 # seeds do change the order
    # exactly: for f = pixel sum, E f_k = (1 - x_k) f_0; 4000 random orders get within a few standard errors
    xs = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    ys = torch.stack([pixel_flipping(pixel_sum, xs, torch.tensor([0]), torch.zeros(1, 4, 4), steps=4, seed=s)
                      .curves["curve"].y[0] for s in range(400)])
    torch.testing.assert_close(ys.mean(dim=0), 136.0 * torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), atol=2.0, rtol=0)


# ---- deletion and insertion ------------------------------------------------------------------------------

def test_deletion_insertion_hand_computed(pixel_sum):
    x = torch.tensor([[[[1.0, 2.0]]]])
    d = deletion(pixel_sum, x, torch.tensor([0]), x[:, 0], steps=2, output="logit")
    torch.testing.assert_close(d.curves["curve"].y, torch.tensor([[3.0, 1.0, 0.0]]))
    assert d.scores["auc"].item() == pytest.approx(1.25) and d.higher_is_better == {"auc": False}
    # insertion from 0: the 2 comes back first, curve 0 -> 2 -> 3, AUC = 0.5 * 2/2 + 0.5 * 5/2 = 1.75
    i = insertion(pixel_sum, x, torch.tensor([0]), x[:, 0], steps=2, baseline=0.0, output="logit")
    torch.testing.assert_close(i.curves["curve"].y, torch.tensor([[0.0, 2.0, 3.0]]))
    assert i.scores["auc"].item() == pytest.approx(1.75) and i.higher_is_better == {"auc": True}


def test_insertion_is_pixel_flipping_of_the_baseline_image(tiny_cnn, batch):
    # inserting x's top pixels into the blurred image = removing the blurred image's top pixels towards x
    x, target = batch
    a = torch.randint(0, 4, (5, 8, 8), generator=torch.Generator().manual_seed(7)).float()
    ins = insertion(tiny_cnn, x, target, a, steps=6, seed=3, chunk_size=9)
    pf = pixel_flipping(tiny_cnn, _baseline_fill(x, "blur", seed=0), target, a, steps=6, baseline=x, seed=3,
                        output="softmax")
    torch.testing.assert_close(ins.curves["curve"].y, pf.curves["curve"].y)
    dele = deletion(tiny_cnn, x, target, a, steps=6, seed=3)
    torch.testing.assert_close(dele.curves["curve"].y,
                               pixel_flipping(tiny_cnn, x, target, a, steps=6, seed=3, output="softmax").curves["curve"].y)


# ---- ROAD ------------------------------------------------------------------------------------------------

def test_noisy_linear_imputation_reproduces_a_ramp():
    # x = 2 i - j + 1 is exactly the weighted mean of its 8 neighbours: holes in the interior are filled exactly
    i, j = torch.meshgrid(torch.arange(10.0), torch.arange(12.0), indexing="ij")
    x = (2 * i - j + 1).expand(2, 3, 10, 12).clone()
    keep = torch.ones(2, 1, 10, 12, dtype=torch.bool)
    keep[0, :, 2:8, 3:9] = False
    keep[1, :, 1:9, 1:3] = False
    out = _noisy_linear_imputation(x, keep, torch.zeros_like(x), iterations=200)
    torch.testing.assert_close(out, x, atol=1e-4, rtol=0)
    noise = torch.randn(2, 3, 10, 12, generator=torch.Generator().manual_seed(0))
    noisy = _noisy_linear_imputation(x, keep, noise, iterations=200)
    torch.testing.assert_close(noisy - out, torch.where(keep, 0.0, noise), atol=1e-4, rtol=0)


def test_road_curves(tiny_cnn, batch):
    x, target = batch
    a = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(5))
    r = road(tiny_cnn, x, target, a, steps=4, chunk_size=6)
    assert set(r.scores) == {"auc_morf", "auc_lerf", "acc_auc_morf", "acc_auc_lerf", "srg"} and r.higher_is_better["srg"]
    torch.testing.assert_close(r.curves["morf"].y[:, 0], tiny_cnn(x).gather(1, target[:, None])[:, 0])
    torch.testing.assert_close(r.scores["srg"], r.scores["auc_lerf"] - r.scores["auc_morf"])
    # every pixel removed: no data left, the image is 0 + noise, the same for every sample
    full = road(tiny_cnn, x, target, a, steps=1, order="morf", noise=0.0).curves["morf"].y[:, 1]
    torch.testing.assert_close(full, tiny_cnn(torch.zeros_like(x)).gather(1, target[:, None])[:, 0])
    morf = road(tiny_cnn, x, target, a, steps=4, order="morf", chunk_size=100)
    torch.testing.assert_close(morf.scores["auc_morf"], r.scores["auc_morf"], atol=1e-5, rtol=1e-5)


# ---- faithfulness correlation and infidelity -----------------------------------------------------------

def test_faithfulness_correlation_hand_computed(pixel_sum):
    # f = pixel sum: the drop over S is exactly the map's sum over S when the map is x (r = 1), -x gives -1
    x = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    t = torch.zeros(3, dtype=torch.long)
    kw = {"subsets": 20, "fraction": 5 / 36}
    torch.testing.assert_close(faithfulness_correlation(pixel_sum, x, t, x[:, 0], **kw).scores["pearson"], torch.ones(3))
    torch.testing.assert_close(faithfulness_correlation(pixel_sum, x, t, -x[:, 0], **kw).scores["pearson"], -torch.ones(3))
    assert faithfulness_correlation(pixel_sum, x, t, torch.ones(3, 6, 6), **kw).scores["pearson"].isnan().all()


def test_faithfulness_correlation_matches_reference(tiny_cnn, batch):
    x, target = batch
    a = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(9))
    r = faithfulness_correlation(tiny_cnn, x, target, a, subsets=10, fraction=7 / 64, seed=2, chunk_size=8)
    # the same subsets, drawn as documented; then a per-sample loop and numpy's corrcoef
    chosen = torch.rand(10, 64, generator=torch.Generator().manual_seed(2)).argsort(dim=1)[:, :7]
    for b in range(5):
        drops, sums = [], []
        for s in range(10):
            xs = x[b].clone().reshape(3, 64)
            xs[:, chosen[s]] = 0.0
            drops.append((tiny_cnn(x[b:b + 1]) - tiny_cnn(xs.reshape(1, 3, 8, 8)))[0, target[b]].item())
            sums.append(a[b].reshape(64)[chosen[s]].sum().item())
        assert r.scores["pearson"][b].item() == pytest.approx(np.corrcoef(sums, drops)[0, 1], abs=1e-5)


def test_infidelity_matches_captum(tiny_cnn, batch, pixel_sum):
    from captum.metrics import infidelity as captum_infidelity

    x, target = batch
    attribution = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(11))
    S = 6
    noise = 0.2 * torch.randn(S, 1, 8, 8, generator=torch.Generator().manual_seed(4))   # as infidelity draws it
    for normalize in (True, False):
        ours = infidelity(tiny_cnn, x, target, attribution.sum(dim=1), perturbations=S, normalize=normalize,
                          seed=4, chunk_size=7).scores["infidelity"]

        def perturb(inputs):                           # captum repeats each input S times, consecutively
            I = noise.expand(S, 3, 8, 8).repeat(inputs.shape[0] // S, 1, 1, 1)
            return I, inputs - I

        theirs = captum_infidelity(tiny_cnn, perturb, x, attribution, target=target, n_perturb_samples=S,
                                   normalize=normalize)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    # f = pixel sum: its gradient map (C * class scale per pixel) explains every perturbation exactly
    xs = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    r = infidelity(pixel_sum, xs, torch.tensor([0, 1]), torch.tensor([3.0, 6.0]).view(2, 1, 1).expand(2, 4, 4),
                   normalize=False)
    torch.testing.assert_close(r.scores["infidelity"], torch.zeros(2), atol=1e-8, rtol=0)


# ---- shared contracts of the new metrics ---------------------------------------------------------------

NEW = {
    "region": lambda m, x, t, a, **kw: pixel_flipping(m, x, t, a, steps=5, order="both", patch=3, **kw),
    "uniform": lambda m, x, t, a, **kw: pixel_flipping(m, x, t, a, steps=5, baseline="uniform", **kw),
    "deletion": lambda m, x, t, a, **kw: deletion(m, x, t, a, steps=5, baseline="image_min", **kw),
    "insertion": lambda m, x, t, a, **kw: insertion(m, x, t, a, steps=5, **kw),
    "road": lambda m, x, t, a, **kw: road(m, x, t, a, steps=3, **kw),
    "faithfulness_correlation": lambda m, x, t, a, **kw: faithfulness_correlation(m, x, t, a, subsets=6, fraction=0.15, **kw),
    "infidelity": lambda m, x, t, a, **kw: infidelity(m, x, t, a, perturbations=5, **kw),
}


@pytest.mark.parametrize("name", sorted(NEW))
def test_new_metrics_are_batch_and_chunk_invariant(tiny_cnn, batch, name):
    x, target = batch
    a = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(12))
    x0 = x.clone()
    ref = NEW[name](tiny_cnn, x, target, a)
    other = NEW[name](tiny_cnn, x, target, a, chunk_size=4)
    p = torch.tensor([3, 1, 4, 0, 2])
    permuted = NEW[name](tiny_cnn, x[p], target[p], a[p], chunk_size=11)
    alone = NEW[name](tiny_cnn, x[2:3], target[2:3], a[2:3])
    for k, v in ref.scores.items():
        torch.testing.assert_close(other.scores[k], v, equal_nan=True, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(permuted.scores[k], v[p], equal_nan=True, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.scores[k], v[2:3], equal_nan=True, atol=1e-5, rtol=1e-5)
        assert set(ref.higher_is_better) == set(ref.scores)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("fn,kwargs,message", [
    (pixel_flipping, {"patch": 0}, r"patch must be between 1 and min\(H, W\) \(8\), got 0"),
    (pixel_flipping, {"patch": 2, "steps": 17}, r"steps must be between 1 and the number of patches \(16\)"),
    (pixel_flipping, {"baseline": "white"}, "baseline must be a finite number, a tensor or one of"),
    (pixel_flipping, {"baseline": torch.zeros(2, 3, 8, 8)}, "a baseline tensor must broadcast to x's shape"),
    (insertion, {"output": "prob"}, "output must be 'logit' or 'softmax'"),
    (road, {"noise": -1.0}, r"noise must be >= 0 \(the imputation noise's standard deviation\), got -1.0"),
    (road, {"order": "random"}, "order must be 'morf', 'lerf' or 'both'"),
    (faithfulness_correlation, {"fraction": 1.5}, r"fraction must be in \(0, 1\]"),
    (faithfulness_correlation, {"subsets": 1}, r"subsets must be >= 2 \(random subsets; at least 2 define"),
    (infidelity, {"noise_std": 0.0}, "noise_std must be > 0"),
])
def test_new_bad_options(tiny_cnn, batch, fn, kwargs, message):
    x, target = batch
    with pytest.raises(ValueError, match=message):
        fn(tiny_cnn, x, target, torch.zeros(5, 8, 8), **kwargs)


# ---- issue 17: AOPC over Samek et al.'s removal budget, ROAD's accuracy, the map each metric consumes -----

def test_aopc_over_a_removal_budget_hand_computed(pixel_sum):
    # Samek et al. 2017: AOPC = 1/(L+1) sum_{k=0..L} (f_0 - f_k) over the first L regions, not the whole image.
    # f = pixel sum of 1..16 (4x4), map = x, max_fraction 1/4: the 4 largest go one per step (L = 4):
    # f_k = 136, 120, 105, 91, 78 -> AOPC = (0 + 16 + 31 + 45 + 58) / 5 = 30
    x = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    r = pixel_flipping(pixel_sum, x, torch.tensor([0]), x[:, 0], steps=4, max_fraction=0.25)
    torch.testing.assert_close(r.curves["curve"].y, torch.tensor([[136.0, 120.0, 105.0, 91.0, 78.0]]))
    torch.testing.assert_close(r.curves["curve"].x, torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]) / 16)
    assert r.scores["aopc"].item() == pytest.approx(30.0)
    # AUC over x in [0, 1/4]: (1/16) (128 + 112.5 + 98 + 84.5) = 423 / 16
    assert r.scores["auc"].item() == pytest.approx(423 / 16)
    # the whole image (the default) averages over f_k = 136, 78, 36, 10, 0 instead: AOPC = 420 / 5
    assert pixel_flipping(pixel_sum, x, torch.tensor([0]), x[:, 0], steps=4).scores["aopc"].item() == pytest.approx(84.0)
    # a budget of ceil(0.3 * 16) = 5 pixels in 2 steps: ceil(5/2) = 3 go first (16, 15, 14), then 13 and 12
    r = pixel_flipping(pixel_sum, x, torch.tensor([0]), x[:, 0], steps=2, max_fraction=0.3)
    torch.testing.assert_close(r.curves["curve"].y, torch.tensor([[136.0, 91.0, 66.0]]))
    torch.testing.assert_close(r.curves["curve"].x, torch.tensor([0.0, 3 / 16, 5 / 16]))
    assert r.scores["aopc"].item() == pytest.approx((0 + 45 + 70) / 3)


@pytest.mark.parametrize("steps,max_fraction,order", [(5, 0.16, "morf"), (3, 0.5, "lerf"), (10, 10 / 64, "morf")])
def test_removal_budget_matches_reference(tiny_cnn, batch, steps, max_fraction, order):
    x, target = batch
    attribution = torch.randint(0, 4, (5, 8, 8), generator=torch.Generator().manual_seed(steps)).float()   # ties
    fast = pixel_flipping(tiny_cnn, x, target, attribution, steps=steps, order=order, max_fraction=max_fraction,
                          chunk_size=6)
    budget = math.ceil(max_fraction * 64 - 1e-9)
    slow = pixel_flipping_reference(tiny_cnn, x, target, attribution, steps=steps, order=order, budget=budget)
    torch.testing.assert_close(fast.curves["curve"].y, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.scores["aopc"], (slow[:, :1] - slow).mean(dim=1), atol=1e-5, rtol=1e-5)
    # regions: the budget counts patches, one 2x2 region per step over the first quarter of 16 regions
    region = pixel_flipping(tiny_cnn, x, target, attribution, steps=4, patch=2, max_fraction=0.25)
    torch.testing.assert_close(region.curves["curve"].x, torch.arange(5.0) / 16)


def test_samek2017_experiment_is_the_papers_aopc(tiny_cnn):
    """experiment=samek2017: one region per step over ~16 % of the regions (L = 100 of ~620 at 224 px)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = derive_seeds(compose("config", overrides=["experiment=samek2017"]))
    pf = cfg.metric.pixel_flipping
    H = cfg.dataset.size
    regions = math.ceil(H / pf.patch) ** 2
    budget = math.ceil(pf.max_fraction * regions - 1e-9)
    assert pf.steps == budget                                              # one region per step
    assert abs(budget / regions - 100 / (224 / 9) ** 2) < 0.01             # Samek et al.'s share of the image
    assert pf.baseline == "uniform" and pf.order in ("morf", "both")
    metric = instantiate(without_meta(pf))                                   # less _headline_
    x = torch.randn(1, 3, H, H, generator=torch.Generator().manual_seed(0))
    r = metric(tiny_cnn, x, torch.tensor([0]), torch.rand(1, H, H))
    assert r.curves["morf"].y.shape == (1, budget + 1)


class ThresholdModel(torch.nn.Module):
    """Logits (t, pixel sum): the prediction is class 1 while the pixel sum exceeds t."""

    def __init__(self, t):
        super().__init__()
        self.t = t

    def forward(self, x):
        s = x.flatten(1).sum(dim=1)
        return torch.stack([torch.full_like(s, self.t), s], dim=1)


def test_road_accuracy_hand_computed():
    # 1x4 image [1, 10, 3, 5], map = x. ROAD's imputation on one row: a removed pixel is the mean of its
    # in-image row neighbours (weights 1/6 each; the diagonals fall outside the image).
    # MoRF removes 10, 5, 3, 1: pixel sums 19; 1+2+3+5 = 11; 1+2+3+3 = 9; all = 1: 4; nothing left: 0.
    # LeRF removes 1, 3, 5, 10: 19; 10+10+3+5 = 28; 10+10+7.5+5 = 32.5; all = 10: 40; 0.
    # With t = 10 the target class 1 is predicted while the sum exceeds 10.
    x = torch.tensor([1.0, 10.0, 3.0, 5.0]).view(1, 1, 1, 4)
    r = road(ThresholdModel(10.0), x, torch.tensor([1]), x[:, 0], steps=4, noise=0.0)
    torch.testing.assert_close(r.curves["morf"].y, torch.tensor([[19.0, 11.0, 9.0, 4.0, 0.0]]))
    torch.testing.assert_close(r.curves["lerf"].y, torch.tensor([[19.0, 28.0, 32.5, 40.0, 0.0]]))
    torch.testing.assert_close(r.curves["acc_morf"].y, torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(r.curves["acc_lerf"].y, torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]]))
    assert r.scores["acc_auc_morf"].item() == pytest.approx(0.25 * (1 + 0.5))            # trapezoid over x
    assert r.scores["acc_auc_lerf"].item() == pytest.approx(0.25 * (1 + 1 + 1 + 0.5))
    assert r.scores["auc_morf"].item() == pytest.approx(0.25 * (15 + 10 + 6.5 + 2))
    assert r.higher_is_better["acc_auc_morf"] is False and r.higher_is_better["acc_auc_lerf"] is True
    # class 0 as the target: correct exactly where class 1 is not (a tie at the sum = t goes to class 0)
    r0 = road(ThresholdModel(10.0), x, torch.tensor([0]), x[:, 0], steps=4, noise=0.0, order="morf")
    torch.testing.assert_close(r0.curves["acc_morf"].y, torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]]))


def test_road_accuracy_is_the_argmax_on_the_imputed_images(tiny_cnn, batch):
    """The 0/1 curves are argmax(model(imputed)) == target at every step; their sample mean is the
    paper's accuracy curve. Checked against the model's own predictions on the images the metric built."""
    x, target = batch
    a = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(5))
    r = road(tiny_cnn, x, target, a, steps=4, order="morf", chunk_size=7)
    images = []
    hook = tiny_cnn.register_forward_hook(lambda m, i, o: images.append((i[0].clone(), o.argmax(dim=1))))
    try:
        road(tiny_cnn, x, target, a, steps=4, order="morf", chunk_size=1)          # one image per pass
    finally:
        hook.remove()
    predicted = torch.stack([p[0] for _, p in images]).view(5, 5)               # (B, K), sample-major
    torch.testing.assert_close(r.curves["acc_morf"].y, (predicted == target[:, None]).float())
    assert r.curves["acc_morf"].y[:, 0].tolist() == (tiny_cnn(x).argmax(dim=1) == target).float().tolist()


def test_signed_metrics_consume_the_signed_map_whatever_the_run_reduces(pixel_sum):
    """Issue 17: infidelity's I^T phi and faithfulness correlation's sum over S take the signed attribution.
    Under the run's default reduce=abs_sum the runner hands each metric metric_input(raw, consumed(metric),
    reduce): these two must get the channel sum, the ranking metrics the reduced map."""
    from metrics import consumed, metric_input

    assert consumed(infidelity) == consumed(faithfulness_correlation) == consumed(road) == "signed"
    for fn in (pixel_flipping, deletion, insertion):
        assert consumed(fn) == "reduced", fn.__name__
    # f_0 = the sum over channels and pixels: removing or perturbing pixel p changes it by sum_c x_cp
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    t = torch.zeros(3, dtype=torch.long)
    # faithfulness correlation: raw = x, whose channel sum is exactly each pixel's drop: r = 1 (Bhatt et al.)
    a = metric_input(x, consumed(faithfulness_correlation), "abs_sum")
    torch.testing.assert_close(a, x.sum(dim=1))
    r = faithfulness_correlation(pixel_sum, x, t, a, subsets=20, fraction=5 / 36).scores["pearson"]
    torch.testing.assert_close(r, torch.ones(3))
    assert (faithfulness_correlation(pixel_sum, x, t, x.abs().sum(dim=1), subsets=20, fraction=5 / 36)
            .scores["pearson"] < 0.9).all()                                   # the abs map is not faithful
    # infidelity: the gradient of f_0 is 1 in every channel; raw (3, -1, 1) per pixel sums to it, so
    # I^T phi = 3 sum_p I_p = f(x) - f(x - I) and INFD = 0 (Yeh et al.); |.| would give 5 sum_p I_p
    raw = torch.tensor([3.0, -1.0, 1.0]).view(1, 3, 1, 1).expand(3, 3, 6, 6)
    a = metric_input(raw, consumed(infidelity), "abs_sum")
    score = infidelity(pixel_sum, x, t, a, normalize=False, noise_std=0.1).scores["infidelity"]
    torch.testing.assert_close(score, torch.zeros(3), atol=1e-8, rtol=0)
    noise = 0.1 * torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(0))   # as infidelity draws it
    expected = ((5 - 3) * noise.sum(dim=(1, 2, 3))).square().mean()               # E[(I^T |phi| - 3 sum I)^2]
    abs_score = infidelity(pixel_sum, x, t, to_map(raw, "abs_sum"), normalize=False, noise_std=0.1)
    torch.testing.assert_close(abs_score.scores["infidelity"], expected.expand(3), rtol=1e-4, atol=1e-6)


def test_road_ranks_by_the_signed_channel_sum():
    """Rong et al.'s code ranks pixels by np.sum of the attribution over channels (signed). A raw attribution
    whose signed sum is [1, 10, 3, 5] (the hand-computed case above) but whose absolute sum puts pixel 2 first:
    through the runner's metric_input under reduce=abs_sum, ROAD must still give the signed ranking's curve."""
    from metrics import consumed, metric_input

    x = torch.tensor([[1.0, 10.0, 3.0, 5.0], [0.0, 0.0, 0.0, 0.0]]).view(1, 2, 1, 4)     # channel 1 is empty
    raw = torch.tensor([[1.0, 10.0, 23.0, 5.0], [0.0, 0.0, -20.0, 0.0]]).view(1, 2, 1, 4)
    a = metric_input(raw, consumed(road), "abs_sum")
    torch.testing.assert_close(a, torch.tensor([[[1.0, 10.0, 3.0, 5.0]]]))
    r = road(ThresholdModel(10.0), x, torch.tensor([1]), a, steps=4, noise=0.0, order="morf")
    torch.testing.assert_close(r.curves["morf"].y, torch.tensor([[19.0, 11.0, 9.0, 4.0, 0.0]]))
    # the absolute map would remove pixel 2 (|23| + |-20|) first: 1 + 10 + (10 + 5) / 2 + 5 = 23.5
    absolute = road(ThresholdModel(10.0), x, torch.tensor([1]), to_map(raw, "abs_sum"), steps=4, noise=0.0,
                    order="morf")
    assert absolute.curves["morf"].y[0, 1].item() == pytest.approx(23.5)
