"""Robustness metrics: hand-computed values, closed forms on analytic models, a per-sample oracle,
invariances (batch order, chunk size, purity), Hypothesis properties (range, NaN policy) and errors."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import methods
import metrics
from metrics._reexplain import noise_field
from tests.conftest import PixelSum

REEXPLAIN = ["max_sensitivity", "avg_sensitivity", "local_lipschitz_estimate", "continuity",
             "relative_input_stability", "relative_output_stability", "relative_representation_stability"]
SCORE = {"max_sensitivity": "max_sensitivity", "avg_sensitivity": "avg_sensitivity", "local_lipschitz_estimate":
         "lipschitz", "continuity": "continuity", "relative_input_stability": "ris",
         "relative_output_stability": "ros", "relative_representation_stability": "rrs"}
NOISY = {"max_sensitivity": ("uniform", 0.2), "avg_sensitivity": ("uniform", 0.2),
         "local_lipschitz_estimate": ("gaussian", 0.1), "relative_input_stability": ("uniform", 0.2),
         "relative_output_stability": ("uniform", 0.2), "relative_representation_stability": ("uniform", 0.2)}


def _options(name: str, **kw) -> dict:
    return ({"shifts": [-2, -1, 1, 2]} if name == "continuity" else {"samples": 5}) | kw


def _positive_batch(B=3, shape=(2, 3, 3), seed=0):
    """Inputs with all entries in [1, 2]: no zero to divide by, and PixelSum predicts class 1 under any noise < 1."""
    return 1 + torch.rand(B, *shape, generator=torch.Generator().manual_seed(seed)), torch.ones(B, dtype=torch.long)


# ---------------------------------------------------------------- hand values and closed forms

def test_continuity_by_hand():
    """x = [1, 2, 3], R = x (gradient x input of the pixel sum, class 0); shift +1 fills with the minimum 1:
    x' = [1, 1, 2], |R - R'|_1 / |x - x'|_2 = 2 / sqrt 2; shift -1: x' = [2, 3, 1], 4 / sqrt 6 (the larger)."""
    x = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 3)
    r = metrics.continuity(PixelSum().eval(), x, torch.tensor([0]), methods.gradient_x_input, shifts=[-1, 1])
    assert r.scores["continuity"].item() == pytest.approx(4 / math.sqrt(6), rel=1e-6)
    r = metrics.continuity(PixelSum().eval(), x, torch.tensor([0]), methods.gradient_x_input, shifts=[1])
    assert r.scores["continuity"].item() == pytest.approx(math.sqrt(2), rel=1e-6)
    r = metrics.continuity(PixelSum().eval(), x, torch.tensor([0]), methods.gradient_x_input, shifts=[3], baseline=0.0)
    assert r.scores["continuity"].item() == pytest.approx(6 / math.sqrt(14), rel=1e-6)   # all columns filled with 0


def test_consistency_by_hand():
    """PixelSum predicts 1 for a positive sum, 0 for a negative one: predictions 1, 1, 0, 1. Top-1 positions
    (and signs): 0+, 0+, 0+, 1+. Sample 0 shares e with 1 and 2 (classes 1, 0): 1/2; sample 1 likewise;
    sample 2 with 0 and 1 (class 1 both, its own 0): 0; sample 3 with none: NaN."""
    x = torch.tensor([1.0, 1.0, -1.0, 1.0]).view(4, 1, 1, 1).expand(4, 1, 1, 2).contiguous()
    a = torch.tensor([[5.0, 1.0], [3.0, 0.0], [2.0, 1.0], [0.0, 4.0]]).view(4, 1, 2)
    c = metrics.consistency(PixelSum().eval(), x, a, k=1).scores["consistency"]
    torch.testing.assert_close(c, torch.tensor([0.5, 0.5, 0.0, torch.nan]), equal_nan=True)
    # signs are part of e: flipping sample 1's top value's sign separates it from 0 and 2
    a[1, 0, 0] = -3.0
    c = metrics.consistency(PixelSum().eval(), x, a, k=1).scores["consistency"]
    torch.testing.assert_close(c, torch.tensor([0.0, torch.nan, 0.0, torch.nan]), equal_nan=True)
    # first_n_sign (Quantus' top_n_sign): the first value's sign only, + for 0, 2, 3 (classes 1, 0, 1), - for 1
    a[3, 0, 0] = 1.0
    c = metrics.consistency(PixelSum().eval(), x, a, discretise="first_n_sign", k=1).scores["consistency"]
    torch.testing.assert_close(c, torch.tensor([0.5, torch.nan, 0.0, 0.5]), equal_nan=True)


def test_closed_forms_on_the_pixel_sum():
    """f_c = (c + 1) sum(x), Phi = gradient x input = (c + 1) x, draws delta_s: Phi(x') - Phi(x) = (c + 1) delta_s, so
    sensitivity = max_s |delta_s| / |x| (mean for avg), Lipschitz = c + 1 exactly, RIS = 1 (both relative changes are
    -delta / x), ROS = max_s |delta_s / x| / (sqrt 5 |sum delta_s|) (two classes), continuity sees the same ratios."""
    model, (x, t) = PixelSum().eval(), _positive_batch()
    d = noise_field(x, 7, 0.3, "uniform", 4).flatten(1)                            # (S, n)
    flat = x.flatten(1)
    kw = dict(samples=7, radius=0.3, seed=4)
    r = metrics.max_sensitivity(model, x, t, methods.gradient_x_input, **kw).scores
    torch.testing.assert_close(r["max_sensitivity"], (d.norm(dim=1)[None] / flat.norm(dim=1)[:, None]).amax(dim=1))
    assert torch.equal(r["changed_fraction"], torch.zeros(3))
    r = metrics.avg_sensitivity(model, x, t, methods.gradient_x_input, **kw).scores
    torch.testing.assert_close(r["avg_sensitivity"], (d.norm(dim=1)[None] / flat.norm(dim=1)[:, None]).mean(dim=1))
    r = metrics.max_sensitivity(model, x, t, methods.gradient_x_input, normalize=False, **kw).scores
    torch.testing.assert_close(r["max_sensitivity"], 2 * d.norm(dim=1).amax().expand(3))   # (c + 1) |delta|, c = 1
    r = metrics.local_lipschitz_estimate(model, x, torch.tensor([0, 1, 1]), methods.gradient_x_input, **kw).scores
    torch.testing.assert_close(r["lipschitz"], torch.tensor([1.0, 2.0, 2.0]))
    r = metrics.relative_input_stability(model, x, t, methods.gradient_x_input, **kw).scores
    torch.testing.assert_close(r["ris"], torch.ones(3))
    r = metrics.relative_output_stability(model, x, t, methods.gradient_x_input, **kw).scores
    expected = ((d[None] / flat[:, None]).norm(dim=2) / (math.sqrt(5) * d.sum(dim=1).abs()[None])).amax(dim=1)
    torch.testing.assert_close(r["ros"], expected, rtol=1e-4, atol=0)             # logit differences cancel


@pytest.mark.parametrize("name", REEXPLAIN)
def test_the_gradient_of_a_linear_model_does_not_move(name, linear_batch):
    """A linear model's gradient is its weight row, whatever the input: every robustness score is 0."""
    model, x, target = linear_batch
    layers = {"layers": [""]} if name == "relative_representation_stability" else {}   # the model's own output
    r = getattr(metrics, name)(model, x, target, methods.gradient, changed="keep", **_options(name), **layers)
    torch.testing.assert_close(r.scores[SCORE[name]], torch.zeros(4))


def test_sensitivity_grows_with_the_radius_and_lipschitz_does_not():
    """Draws are radius x one seeded field, so on the pixel sum sensitivity is linear in the radius, Lipschitz flat."""
    model, (x, t) = PixelSum().eval(), _positive_batch()
    s = [metrics.max_sensitivity(model, x, t, methods.gradient_x_input, radius=r, samples=4).scores["max_sensitivity"]
         for r in (0.1, 0.3)]
    torch.testing.assert_close(s[1], 3 * s[0])
    lip = [metrics.local_lipschitz_estimate(model, x, t, methods.gradient_x_input, radius=r, samples=4).scores["lipschitz"]
           for r in (0.1, 0.3)]
    torch.testing.assert_close(lip[0], lip[1])


def test_prediction_changes_are_counted_and_dropped():
    """Near the pixel sum's decision boundary (sum 0) some draws flip the class: `changed_fraction` counts them
    (from the draws, by hand), "drop" maximises over the others, NaN where none is left."""
    model = PixelSum().eval()
    x = torch.stack([torch.full((1, 2, 2), v) for v in (0.01, 5.0, -0.01)])      # sums 0.04, 20, -0.04
    t = torch.tensor([1, 1, 0])
    d = noise_field(x, 9, 0.5, "uniform", 0).flatten(1).sum(dim=1)                 # (S,) sum of each draw
    flipped = torch.stack([(0.04 + d) < 0, (20 + d) < 0, (-0.04 + d) > 0])        # (B, S)
    assert 0 < flipped[0].float().mean() < 1
    keep = metrics.relative_input_stability(model, x, t, methods.gradient_x_input, samples=9, radius=0.5, changed="keep")
    drop = metrics.relative_input_stability(model, x, t, methods.gradient_x_input, samples=9, radius=0.5)
    torch.testing.assert_close(drop.scores["changed_fraction"], flipped.float().mean(dim=1))
    torch.testing.assert_close(keep.scores["changed_fraction"], drop.scores["changed_fraction"])
    # RIS of the pixel sum is 1 on every draw, dropped or not; a sample whose draws all flip would be NaN
    torch.testing.assert_close(drop.scores["ris"], torch.ones(3))
    lip = metrics.local_lipschitz_estimate(model, x[:1], t[:1], methods.gradient_x_input, samples=9, radius=0.5,
                                           noise="uniform", changed="drop")
    assert lip.scores["lipschitz"].item() == pytest.approx(2.0)                   # class 1 kept: c + 1


# ---------------------------------------------------------------- oracle and invariances

def _oracle(name, model, x, target, method):
    """Per sample, per draw, one method call each: the definitions written out, slow and obvious."""
    noise, radius = NOISY[name]
    d = noise_field(x, 5, radius, noise, 0)
    out = []
    for b in range(len(x)):
        xb, tb = x[b:b + 1], target[b:b + 1]
        a = method(model, xb.clone(), tb)
        pred = model(xb).argmax(1)
        values = []
        for s in range(5):
            xp = xb + d[s:s + 1]
            ap = method(model, xp.clone(), tb)
            if name.startswith("relative") and model(xp).argmax(1) != pred:
                continue
            rel_a = ((a - ap) / torch.where(a == 0, 1e-6, a)).norm()
            values.append({
                "max_sensitivity": (ap - a).norm() / a.norm(), "avg_sensitivity": (ap - a).norm() / a.norm(),
                "local_lipschitz_estimate": (ap - a).norm() / (xp - xb).norm(),
                "relative_input_stability": rel_a / ((xb - xp) / torch.where(xb == 0, 1e-6, xb)).norm().clamp_min(1e-6),
                "relative_output_stability": rel_a / (model(xb) - model(xp)).norm().clamp_min(1e-6),
            }[name])
        v = torch.stack(values) if values else torch.tensor([torch.nan])
        out.append(v.mean() if name == "avg_sensitivity" else v.max())
    return torch.stack(out).detach()


@pytest.mark.parametrize("name", [n for n in NOISY if n != "relative_representation_stability"])
def test_matches_a_per_sample_oracle(name, tiny_cnn, batch):
    x, target = batch
    ours = getattr(metrics, name)(tiny_cnn, x, target, methods.saliency, samples=5, chunk_size=3)
    torch.testing.assert_close(ours.scores[SCORE[name]], _oracle(name, tiny_cnn, x, target, methods.saliency),
                               rtol=1e-4, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("name", REEXPLAIN)
def test_batch_order_chunk_size_and_purity(name, tiny_cnn, batch):
    """Permuting the batch permutes the scores; chunk sizes 1, 4 and the budget agree; model, x and the global
    RNG are untouched; the runner's attribution and a recomputed one give the same scores."""
    x, target = batch
    x0, state, rng = x.clone(), {k: v.clone() for k, v in tiny_cnn.state_dict().items()}, torch.get_rng_state()
    fn = getattr(metrics, name)
    ref = fn(tiny_cnn, x, target, methods.saliency, **_options(name))
    perm = torch.tensor([3, 0, 4, 1, 2])
    shuffled = fn(tiny_cnn, x[perm], target[perm], methods.saliency, chunk_size=4, **_options(name))
    one = fn(tiny_cnn, x, target, methods.saliency, chunk_size=1,
             attribution=methods.saliency(tiny_cnn, x.clone(), target), **_options(name))
    for score, v in ref.scores.items():
        assert v.shape == (5,) and v.dtype == x.dtype and not ref.higher_is_better[score]
        # float32 rounding of differently batched convolutions, amplified by ROS's logit differences
        torch.testing.assert_close(shuffled.scores[score], v[perm], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(one.scores[score], v, rtol=1e-4, atol=1e-7)
    assert torch.equal(x, x0) and torch.equal(torch.get_rng_state(), rng) and not x.requires_grad
    assert all(torch.equal(v, state[k]) for k, v in tiny_cnn.state_dict().items())
    assert all(not m._forward_hooks for m in tiny_cnn.modules())                   # RRS's hooks are gone


def test_a_sample_does_not_depend_on_its_batch(tiny_cnn, batch):
    x, target = batch
    full = metrics.max_sensitivity(tiny_cnn, x, target, methods.saliency, samples=5).scores["max_sensitivity"]
    alone = metrics.max_sensitivity(tiny_cnn, x[2:3], target[2:3], methods.saliency, samples=5).scores["max_sensitivity"]
    torch.testing.assert_close(alone, full[2:3], rtol=1e-5, atol=1e-7)


def test_consistency_is_batch_order_equivariant(tiny_cnn, batch):
    x, target = batch
    a = torch.randint(-1, 2, (5, 8, 8), generator=torch.Generator().manual_seed(0)).float()
    a[:, 0, 0] = 9.0                                                               # shared top pixel: matches exist
    ref = metrics.consistency(tiny_cnn, x, a, k=1).scores["consistency"]
    perm = torch.tensor([4, 2, 0, 3, 1])
    torch.testing.assert_close(metrics.consistency(tiny_cnn, x[perm], a[perm], k=1).scores["consistency"], ref[perm])
    assert not ref.isnan().any()


# ---------------------------------------------------------------- properties

def _constant_method(value):
    return lambda model, x, target: torch.full_like(x, value)


@settings(derandomize=True, deadline=None, max_examples=12)
@given(st.integers(1, 3), st.integers(2, 5), st.sampled_from([0.0, -1.5, 2.0]), st.integers(0, 2**16),
       st.sampled_from(REEXPLAIN))
def test_constant_maps_never_move(B, S, value, seed, name):
    """A method whose map is a constant scores 0 on every robustness metric (nothing moves), but the relative
    sensitivity of an all-zero map, which is undefined: NaN. changed_fraction is a fraction."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(2, 3)).eval()
    x, target = torch.randn(B, 3, S, S, generator=g), torch.randint(0, 3, (B,), generator=g)
    kw = {"changed": "keep"} | ({"seed": seed} if name != "continuity" else {})
    r = getattr(metrics, name)(model, x, target, _constant_method(value), **_options(name), **kw).scores
    v = r[SCORE[name]]
    if value == 0 and name in ("max_sensitivity", "avg_sensitivity"):
        assert v.isnan().all()
    else:
        assert torch.equal(v, torch.zeros(B))
    assert ((r["changed_fraction"] >= 0) & (r["changed_fraction"] <= 1)).all()


@settings(derandomize=True, deadline=None, max_examples=12)
@given(st.integers(2, 6), st.integers(1, 4), st.sampled_from(["normal", "ties", "constant", "zero"]),
       st.sampled_from(["top_k_sign", "first_n_sign"]), st.integers(0, 2**16))
def test_consistency_is_a_probability_or_nan(B, k, kind, discretise, seed):
    """In [0, 1] where another sample shares the discretised map, NaN exactly where none does; identical maps
    (constant, zero) all share one e, so the score is the share of the others with the same prediction."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, 2, 3, generator=g)
    a = {"normal": torch.randn(B, 2, 3, generator=g), "ties": torch.randint(-1, 2, (B, 2, 3), generator=g).float(),
         "constant": torch.full((B, 2, 3), 0.7), "zero": torch.zeros(B, 2, 3)}[kind]
    c = metrics.consistency(PixelSum(3).eval(), x, a, k=k, discretise=discretise).scores["consistency"]
    assert c.shape == (B,) and (c[~c.isnan()] >= 0).all() and (c[~c.isnan()] <= 1).all()
    if kind in ("constant", "zero"):
        pred = PixelSum(3)(x).argmax(1)
        same = (pred[:, None] == pred[None]).sum(dim=1) - 1
        torch.testing.assert_close(c, same / (B - 1))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, match", [
    ({"samples": 0}, "samples must be"), ({"samples": 2.5}, "samples must be an integer"),
    ({"radius": 0.0}, "radius must be"), ({"radius": float("nan")}, "radius must be a finite"),
    ({"noise": "laplace"}, "noise must be"), ({"changed": "nan"}, "changed must be"),
    ({"seed": -1}, "seed must be"), ({"chunk_size": 0}, "chunk_size must be"),
    ({"attribution": torch.zeros(5, 8, 8)}, "raw attribution"),
])
def test_bad_options_are_refused(kwargs, match, tiny_cnn, batch):
    x, target = batch
    with pytest.raises(ValueError, match=match):
        metrics.max_sensitivity(tiny_cnn, x, target, methods.saliency, **kwargs)


@pytest.mark.parametrize("fn, kwargs, match", [
    ("continuity", {"shifts": [0, 1]}, "must not contain 0"), ("continuity", {"shifts": [9]}, "shifts must be"),
    ("continuity", {"shifts": []}, "non-empty"), ("continuity", {"max_shift": 0}, "max_shift must be"),
    ("continuity", {"baseline": "black"}, "image_min"),
    ("relative_representation_stability", {"layers": ["nope"]}, "not modules of TinyCNN"),
    ("relative_representation_stability", {"layers": "conv1"}, "list of module names"),
    ("max_sensitivity", {"method": None}, "method must be"),
])
def test_bad_metric_options_are_refused(fn, kwargs, match, tiny_cnn, batch):
    x, target = batch
    method = kwargs.pop("method", methods.saliency)
    with pytest.raises(ValueError, match=match):
        getattr(metrics, fn)(tiny_cnn, x, target, method, **kwargs)
    with pytest.raises(ValueError, match="target must"):
        getattr(metrics, fn)(tiny_cnn, x, target[:2], methods.saliency)


@pytest.mark.parametrize("kwargs, match", [
    ({"discretise": "hash"}, "discretise must be"), ({"k": 0}, "k must be"), ({"k": 65}, "k must be"),
    ({"attribution": torch.zeros(5, 3, 8, 8)}, "map of shape"),
])
def test_bad_consistency_input_is_refused(kwargs, match, tiny_cnn, batch):
    x, _ = batch
    a = kwargs.pop("attribution", torch.zeros(5, 8, 8))
    with pytest.raises(ValueError, match=match):
        metrics.consistency(tiny_cnn, x, a, **kwargs)
