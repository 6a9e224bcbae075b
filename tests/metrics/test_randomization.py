import copy
import math

import numpy as np
import pytest
import scipy.stats
import skimage.feature
import skimage.metrics
import torch

import methods
from bench.config import CONF, derive_seeds
from metrics import (SIMILARITIES, data_randomization, emprt, hog, hog_similarity, input_invariance, mprt, mprt_stages,
                     random_logit, randomization_layers, similarities, smprt, spearman, ssim, to_map,
                     top_k_overlap)
from metrics.randomization import _entropy


def test_spearman_with_ties_matches_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (7, 30), generator=g).float()        # heavy ties
    b = torch.randint(0, 6, (7, 30), generator=g).float()
    ours = spearman(a, b)
    ref = torch.tensor([scipy.stats.spearmanr(a[i], b[i]).statistic for i in range(7)], dtype=torch.float32)
    torch.testing.assert_close(ours, ref)


def test_spearman_hand_computed():
    # ranks of a: [0, 1, 2, 3]; of b: [0.5, 0.5, 2, 3] -> Pearson of the ranks
    r = spearman(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[5.0, 5.0, 6.0, 9.0]]))
    ra, rb = torch.tensor([-1.5, -0.5, 0.5, 1.5]), torch.tensor([-1.0, -1.0, 0.5, 1.5])
    expected = (ra * rb).sum() / (ra.norm() * rb.norm())
    assert r.item() == pytest.approx(expected.item())
    assert math.isnan(spearman(torch.ones(1, 4), torch.arange(4.0)[None]).item())   # constant map: undefined


def test_layers_default_and_declared(tiny_cnn):
    assert randomization_layers(tiny_cnn) == ["conv1", "conv2", "fc"]
    tiny_cnn.mprt_layers = ("conv2", "fc")
    assert randomization_layers(tiny_cnn) == ["conv2", "fc"]


def test_edge_control_stays_identical(tiny_cnn, batch):
    x, target = batch
    r = mprt(tiny_cnn, x, target, methods.edge)
    assert set(r.scores) == {f"{m}{s}" for m in (*SIMILARITIES, "degenerate") for s in ("@conv1", "@conv2", "@fc", "")}
    for k, v in r.scores.items():                  # 8x8 maps hold no 3x3 block of 8x8 HOG cells: NaN
        expected = torch.nan if k.startswith("hog") else 0.0 if k.startswith("degenerate") else 1.0
        torch.testing.assert_close(v, torch.full((5,), expected), equal_nan=True)
    for m in SIMILARITIES:
        assert r.curves[m].labels == ("fc", "conv2", "conv1")             # output layer first
    assert not any(r.higher_is_better.values())


def test_gradient_decorrelates_and_model_untouched(tiny_cnn, batch):
    x, target = batch
    state = copy.deepcopy(tiny_cnn.state_dict())
    rng = torch.get_rng_state()
    r = mprt(tiny_cnn, x, target, methods.saliency, seed=3)
    assert (r.scores["spearman"] < 0.9).all()
    assert all(torch.equal(v, state[k]) for k, v in tiny_cnn.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)                          # global RNG untouched
    # deterministic given the seed, and a precomputed map gives the same result
    again = mprt(tiny_cnn, x, target, methods.saliency, seed=3,
                 attribution=methods.saliency(tiny_cnn, x, target))           # the raw (B, C, H, W) attribution
    torch.testing.assert_close(again.scores["spearman"], r.scores["spearman"])


def test_stage_equals_manual_randomization(tiny_cnn, batch):
    """The last cascading stage equals re-initialising every layer by hand with the documented seeds."""
    x, target = batch
    r = mprt(tiny_cnn, x, target, methods.gradient_x_input, seed=10)
    manual = copy.deepcopy(tiny_cnn)
    for i, name in enumerate(["conv1", "conv2", "fc"]):
        torch.manual_seed(10 + i)
        getattr(manual, name).reset_parameters()
    a = to_map(methods.gradient_x_input(tiny_cnn, x, target), "abs_sum")     # Adebayo's ABS map: sum_c |E_c|
    b = to_map(methods.gradient_x_input(manual, x, target), "abs_sum")
    torch.testing.assert_close(r.scores["spearman"], spearman(a, b))
    torch.testing.assert_close(r.scores["spearman_signed"], spearman(to_map(methods.gradient_x_input(tiny_cnn, x, target), "sum"),
                                                                     to_map(methods.gradient_x_input(manual, x, target), "sum")))


def test_independent_order_resets_one_layer(tiny_cnn, batch):
    x, target = batch
    r = mprt(tiny_cnn, x, target, methods.saliency, order="independent", seed=5)
    manual = copy.deepcopy(tiny_cnn)
    torch.manual_seed(5 + 0)
    manual.conv1.reset_parameters()
    expected = spearman(to_map(methods.saliency(tiny_cnn, x, target), "sum"), to_map(methods.saliency(manual, x, target), "sum"))
    torch.testing.assert_close(r.scores["spearman@conv1"], expected)


def test_bad_layers(tiny_cnn, batch):
    x, target = batch
    with pytest.raises(ValueError, match=r"\['nope'\] are not modules of TinyCNN"):
        mprt(tiny_cnn, x, target, methods.saliency, layers=["nope"])
    with pytest.raises(ValueError, match="order must be"):
        mprt(tiny_cnn, x, target, methods.saliency, order="top_down")
    with pytest.raises(ValueError, match=r"measures \['pearson'\] unknown"):
        mprt(tiny_cnn, x, target, methods.saliency, measures=["pearson"])


# ---------------------------------------------------------------- similarity measures by hand

def test_ssim_hand_computed_single_window():
    # one 3x3 window: a = centre pixel 1, b = 1 - a. means 1/9, 8/9; sample variances
    # 9/8 (1/9 - 1/81) = 1/9 each; sample covariance 9/8 (0 - 8/81) = -1/9.
    a = torch.zeros(1, 3, 3, dtype=torch.float64)
    a[0, 1, 1] = 1.0
    c1, c2 = 1e-4, 9e-4
    expected = (2 / 81 * 8 + c1) * (-2 / 9 + c2) / ((65 / 81 + c1) * (2 / 9 + c2))
    assert ssim(a, 1 - a, win_size=3).item() == pytest.approx(expected, rel=1e-12)
    assert ssim(a, a, win_size=3).item() == pytest.approx(1.0)
    assert math.isnan(ssim(a, a, win_size=5).item())                            # map smaller than the window


def test_ssim_matches_skimage():
    g = torch.Generator().manual_seed(0xDEADBEEF)
    a, b = torch.rand(4, 11, 9, generator=g, dtype=torch.float64), torch.rand(4, 11, 9, generator=g, dtype=torch.float64)
    b[1] = 0.7 * a[1] + 0.3 * b[1]                                               # one correlated pair
    for win in (3, 7):
        ref = [skimage.metrics.structural_similarity(a[i].numpy(), b[i].numpy(), win_size=win, data_range=1.0)
               for i in range(4)]
        torch.testing.assert_close(ssim(a, b, win_size=win), torch.tensor(ref, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_hog_on_known_edges():
    # 16x16, a vertical step edge between columns 7 and 8: horizontal gradient 1 on columns 7 and 8
    # (central differences), orientation 0 deg -> bin 0, 8 pixels per 8x8 cell -> mean 1/8; one-cell
    # blocks normalised by L2-Hys give exactly bin 0 = 1 in each of the 4 cells.
    img = torch.zeros(1, 16, 16, dtype=torch.float64)
    img[:, :, 8:] = 1.0
    f = hog(img, orientations=9, cell=8, block=1).view(2, 2, 9)
    expected = torch.zeros(2, 2, 9, dtype=torch.float64)
    expected[..., 0] = 1.0
    torch.testing.assert_close(f, expected, atol=1e-8, rtol=0)
    f = hog(img.transpose(1, 2), orientations=9, cell=8, block=1).view(2, 2, 9)   # horizontal edge: 90 deg -> bin 4
    torch.testing.assert_close(f, expected.roll(4, dims=-1), atol=1e-8, rtol=0)


def test_hog_matches_skimage():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(3, 40, 33, generator=g, dtype=torch.float64)
    ours = hog(a)
    for i in range(3):
        ref = skimage.feature.hog(a[i].numpy(), orientations=9, pixels_per_cell=(8, 8), cells_per_block=(3, 3),
                                  block_norm="L2-Hys", feature_vector=True)
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-6)               # skimage bins in float32 internally
    assert hog(a[:, :16, :16]).shape == (3, 0)                                   # less than one block
    assert torch.isnan(hog_similarity(a[:, :16, :16], a[:, :16, :16])).all()
    assert hog_similarity(a, a).tolist() == pytest.approx([1.0] * 3)


def test_top_k_overlap_hand_and_ties():
    a = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    b = torch.tensor([[0.0, 4.0, 3.0, 9.0, 1.0, 0.0]])
    # k = round(0.5 * 6) = 3: top(a) = {0, 1, 2}, top(b) = {3, 1, 2} -> 2/3
    assert top_k_overlap(a, b, fraction=0.5).item() == pytest.approx(2 / 3)
    # all tied: both top sets come from the same seeded permutation, so they coincide
    flat = torch.zeros(2, 10)
    # all tied: every pixel is in each top set with probability k / n = 0.3, independently -> 0.3, not 1
    assert top_k_overlap(flat, flat, fraction=0.3).tolist() == pytest.approx([0.3, 0.3])
    with pytest.raises(ValueError, match="top_k must be a fraction"):
        top_k_overlap(a, b, fraction=0.0)
    with pytest.raises(ValueError, match="top_k must be a fraction"):
        top_k_overlap(a, b, fraction=float("nan"))


def test_similarities_constant_maps_are_never_silently_nan():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 24, 24, generator=g)
    b = torch.rand(3, 24, 24, generator=g)
    b[1] = 0.0                                                                   # e.g. grad_cam after randomization
    a[2], b[2] = 0.0, 0.0                                                        # nothing to compare
    s = similarities(a, b, top_k=0.2)
    for m in SIMILARITIES:
        assert s[m][1].item() == 0.0 and math.isnan(s[m][2].item()) and math.isfinite(s[m][0].item()), m
    s = similarities(a, b, constant="nan")
    assert all(torch.isnan(s[m][1:]).all() for m in SIMILARITIES)


def test_similarities_invariant_to_positive_rescaling_and_identity():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 24, 24, generator=g), torch.randn(4, 24, 24, generator=g)
    s, t = similarities(a, b), similarities(3.0 * a, 0.5 * b)
    for m in SIMILARITIES:
        torch.testing.assert_close(s[m], t[m], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(similarities(a, a)[m], torch.ones(4))
    torch.testing.assert_close(s["spearman"], spearman(a.abs(), b.abs()))
    torch.testing.assert_close(s["spearman_signed"], spearman(a, b))
    assert similarities(a, -a, absolute=True)["spearman_signed"].tolist() == pytest.approx([-1.0] * 4)


# ---------------------------------------------------------------- orders, seeds, initialisation

def _manual(model, names_seeds, init="default", std=0.0):
    m = copy.deepcopy(model)
    for name, seed in names_seeds:
        torch.manual_seed(seed)
        layer = dict(m.named_modules())[name]
        if init == "default":
            layer.reset_parameters()
        else:
            with torch.no_grad():
                for p in layer.parameters():
                    p.normal_(0.0, std)
    return m


def test_orders_and_alias(tiny_cnn, batch):
    x, target = batch
    td = mprt(tiny_cnn, x, target, methods.saliency, seed=4)
    alias = mprt(tiny_cnn, x, target, methods.saliency, seed=4, order="cascading")
    bu = mprt(tiny_cnn, x, target, methods.saliency, seed=4, order="cascading_bottom_up")
    assert td.scores.keys() == alias.scores.keys()
    for k in td.scores:
        torch.testing.assert_close(td.scores[k], alias.scores[k], equal_nan=True, atol=0, rtol=0)
    assert bu.curves["ssim"].labels == ("conv1", "conv2", "fc")
    for m in SIMILARITIES:                        # both cascades end at the same fully randomized model
        torch.testing.assert_close(td.scores[m], bu.scores[m], equal_nan=True)
    # bottom-up after conv1 = conv1 alone = independent's conv1 stage
    ind = mprt(tiny_cnn, x, target, methods.saliency, seed=4, order="independent")
    torch.testing.assert_close(bu.scores["ssim@conv1"], ind.scores["ssim@conv1"])
    # bottom-up after conv2 = conv1 and conv2 randomized, by hand
    manual = _manual(tiny_cnn, [("conv1", 4), ("conv2", 5)])
    a, b = to_map(methods.saliency(tiny_cnn, x, target), "sum"), to_map(methods.saliency(manual, x, target), "sum")
    torch.testing.assert_close(bu.scores["ssim@conv2"], similarities(a, b)["ssim"])


def test_shared_seed_normal_init_and_exclude(tiny_cnn, batch):
    x, target = batch
    r = mprt(tiny_cnn, x, target, methods.gradient_x_input, seed=9, layer_seed="shared", init="normal",
             init_std=0.5, exclude=["conv1"], measures=["spearman_signed"])
    assert set(r.scores) - {"degenerate@fc", "degenerate@conv2", "degenerate"} == {
        "spearman_signed@fc", "spearman_signed@conv2", "spearman_signed"}
    manual = _manual(tiny_cnn, [("fc", 9), ("conv2", 9)], init="normal", std=0.5)
    a, b = to_map(methods.gradient_x_input(tiny_cnn, x, target), "sum"), to_map(methods.gradient_x_input(manual, x, target), "sum")
    torch.testing.assert_close(r.scores["spearman_signed"], spearman(a, b))


# ---------------------------------------------------------------- emprt, smprt

def test_entropy_matches_numpy_histogram():
    g = torch.Generator().manual_seed(5)
    m = torch.randn(4, 12, 12, generator=g, dtype=torch.float64) ** 3
    ref = [scipy.stats.entropy(np.histogram(m[i].numpy(), bins=17)[0]) for i in range(4)]
    torch.testing.assert_close(_entropy(m, 17), torch.tensor(ref, dtype=torch.float64))
    assert _entropy(torch.ones(1, 3, 3), 10).item() == 0.0


def test_emprt_equals_relative_entropy_rise(tiny_cnn, batch):
    x, target = batch
    r = emprt(tiny_cnn, x, target, methods.saliency, seed=2, bins=20)
    manual = _manual(tiny_cnn, [("conv1", 2), ("conv2", 3), ("fc", 4)])
    h0 = _entropy(to_map(methods.saliency(tiny_cnn, x, target), "sum"), 20)
    h1 = _entropy(to_map(methods.saliency(manual, x, target), "sum"), 20)
    torch.testing.assert_close(r.scores["emprt"], ((h1 - h0) / h0).float())
    assert r.higher_is_better == {"emprt": True}
    assert emprt(tiny_cnn, x, target, methods.edge).scores["emprt"].abs().max().item() == 0.0


def test_smprt_without_noise_is_mprt_and_chunking_is_invisible(tiny_cnn, batch):
    x, target = batch
    plain = mprt(tiny_cnn, x, target, methods.saliency, order="cascading_bottom_up", seed=1)
    quiet = smprt(tiny_cnn, x, target, methods.saliency, samples=3, noise=0.0, seed=1)
    for k in plain.scores:
        torch.testing.assert_close(quiet.scores[k], plain.scores[k], atol=1e-5, rtol=0, equal_nan=True)
    a = smprt(tiny_cnn, x, target, methods.saliency, samples=4, noise=0.2, seed=1, chunk_size=3)
    b = smprt(tiny_cnn, x, target, methods.saliency, samples=4, noise=0.2, seed=1, chunk_size=256)
    for k in a.scores:
        torch.testing.assert_close(a.scores[k], b.scores[k], equal_nan=True)
    assert not torch.equal(a.scores["spearman"], plain.scores["spearman"])      # the noise does something


# ---------------------------------------------------------------- random logit, data, input invariance

def test_random_logit_on_analytic_model(pixel_sum):
    # f_c = (c + 1) sum(x): every class has the same gradient map up to scale -> all measures 1;
    # gradient x input changes only by scale as well.
    x = torch.randn(3, 2, 24, 24, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 0])
    r = random_logit(pixel_sum, x, target, methods.gradient_x_input, seed=0)
    for m in SIMILARITIES:
        torch.testing.assert_close(r.scores[m], torch.ones(3))


def test_random_logit_uses_documented_other_class(tiny_cnn, batch):
    x, target = batch
    r = random_logit(tiny_cnn, x, target, methods.saliency, seed=11, measures=["spearman"])
    other = (target + torch.randint(1, 3, (5,), generator=torch.Generator().manual_seed(11))) % 3
    assert (other != target).all()
    expected = spearman(to_map(methods.saliency(tiny_cnn, x, target), "abs_sum"),
                        to_map(methods.saliency(tiny_cnn, x, other), "abs_sum"))
    torch.testing.assert_close(r.scores["spearman"], expected)
    assert (r.scores["spearman"] < 1).all()
    torch.testing.assert_close(random_logit(tiny_cnn, x, target, methods.edge).scores["ssim"], torch.ones(5))


def test_data_randomization_identity_and_difference(tiny_cnn, batch):
    x, target = batch
    same = data_randomization(tiny_cnn, x, target, methods.saliency, tiny_cnn)
    for m in set(SIMILARITIES) - {"hog"}:                                        # 8x8: no HOG block
        torch.testing.assert_close(same.scores[m], torch.ones(5))
    other = _manual(tiny_cnn, [("conv1", 0), ("conv2", 1), ("fc", 2)])
    r = data_randomization(tiny_cnn, x, target, methods.saliency, other, measures=["spearman"])
    expected = spearman(to_map(methods.saliency(tiny_cnn, x, target), "abs_sum"),
                        to_map(methods.saliency(other, x, target), "abs_sum"))
    torch.testing.assert_close(r.scores["spearman"], expected)

    with pytest.raises(ValueError, match="retrain must be a mapping"):
        data_randomization(tiny_cnn, x, target, methods.saliency, other, retrain=40)


def _zoo_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir
    conf = CONF
    with initialize_config_dir(str(conf), version_base="1.3"):
        return compose("config", overrides=["model=small_cnn", "dataset.size=32", *overrides])


def _with_train(model_cfg, **train):
    """A copy of a model config with its `train` section updated (composed configs are struct)."""
    from omegaconf import OmegaConf
    c = OmegaConf.to_container(model_cfg, resolve=True)
    return OmegaConf.create({**c, "train": {**c["train"], **train}})


def test_permute_labels_train_option(tmp_path):
    """Labels permuted by the documented seeded permutation; the option is part of the cache key."""
    from bench.zoo import cache_key, load_model
    from bench.zoo.train import permuted_labels
    target = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])
    out = permuted_labels(target, seed=3)
    assert torch.equal(out, target[torch.randperm(10, generator=torch.Generator().manual_seed(3))])
    assert torch.equal(out.bincount(), target.bincount()) and not torch.equal(out, target)
    cfg = _zoo_cfg("model.train.n_train=16", "model.train.epochs=1", f"cache_dir={tmp_path}")
    permuted, explicit_false = _with_train(cfg.model, permute_labels=True), _with_train(cfg.model, permute_labels=False)
    assert cache_key(explicit_false, cfg.dataset) == cache_key(cfg.model, cfg.dataset) != cache_key(permuted, cfg.dataset)
    real, real_info = load_model(cfg.model, cfg.dataset, cache_dir=tmp_path)
    memo, info = load_model(permuted, cfg.dataset, cache_dir=tmp_path)
    assert info["permute_labels"] and info["n_train"] == 16 and "permute_labels" not in real_info
    assert info["checkpoint"] != real_info["checkpoint"]                       # both cached, side by side
    assert not torch.equal(memo.classifier.fc2.weight, real.classifier.fc2.weight)   # other labels, other weights


def test_runner_loads_the_label_randomized_model_once(tmp_path):
    """bench.run's wiring: the zoo model with the metric's `retrain` overrides and permute_labels, cached."""
    from hydra.utils import instantiate

    from bench.calls import label_randomized_inputs as _label_randomized_inputs
    from bench.provenance import without_meta
    from bench.zoo import load_model
    over = ["metric=[data_randomization,mprt]", "metric.data_randomization.retrain.n_train=16",
            "metric.data_randomization.retrain.epochs=1", f"cache_dir={tmp_path}"]
    cfg = _zoo_cfg(*over)
    metrics = {n: instantiate(without_meta(v)) for n, v in cfg.metric.items()}     # _sanity_: the report's
    extra = _label_randomized_inputs(cfg, metrics, torch.device("cpu"))
    model, info = load_model(_with_train(cfg.model, n_train=16, epochs=1, permute_labels=True), cfg.dataset,
                             cache_dir=tmp_path)
    assert info["cached"] and list(extra) == ["label_randomized_model"]        # the runner trained and cached it
    assert all(torch.equal(a, b) for a, b in zip(extra["label_randomized_model"].state_dict().values(),
                                                  model.state_dict().values()))
    assert _label_randomized_inputs(cfg, {"mprt": metrics["mprt"]}, torch.device("cpu")) == {}
    bad = _zoo_cfg(*over, "+metric.data_randomization.retrain.epocs=3")
    with pytest.raises(ValueError, match=r"retrain has \['epocs'\], which model.train of small_cnn does not have"):
        _label_randomized_inputs(bad, metrics, torch.device("cpu"))


@pytest.mark.parametrize("name,invariant", [("saliency", True), ("guided_backprop", True), ("grad_cam", True),
                                            ("gradient_x_input", False), ("integrated_gradients", False)])
def test_input_invariance_kindermans(tiny_cnn, batch, name, invariant):
    x, target = batch
    state = copy.deepcopy(tiny_cnn.state_dict())
    hooks = sum(len(m._forward_hooks) for m in tiny_cnn.modules())
    r = input_invariance(tiny_cnn, x, target, getattr(methods, name), shift=1.0)
    if invariant:
        assert r.scores["rel_l1"].max().item() < 1e-4
        torch.testing.assert_close(r.scores["spearman"], torch.ones(5), atol=1e-3, rtol=0)
    else:
        assert r.scores["rel_l1"].min().item() > 0.05
    assert r.higher_is_better["spearman"] and not r.higher_is_better["rel_l1"]
    assert all(torch.equal(v, state[k]) for k, v in tiny_cnn.state_dict().items())
    assert sum(len(m._forward_hooks) for m in tiny_cnn.modules()) == hooks


def test_input_invariance_compensation_is_exact(tiny_cnn, batch):
    """The copy on x + shift computes the model's logits on x: checked through gradient x input's
    completeness-free part, the plain gradient, and by a bad layer choice being refused."""
    x, target = batch
    r = input_invariance(tiny_cnn, x, target, methods.saliency, shift=-2.5, measures=["spearman_signed"])
    assert r.scores["rel_l1"].max().item() < 1e-4
    with pytest.raises(ValueError, match="needs `layer` to name the first layer"):
        input_invariance(tiny_cnn, x, target, methods.saliency, layer="relu1")


def test_similarities_reference_is_a_pure_speed_up():
    """A reference dict kept across calls with the same original map gives exactly the fresh numbers."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 16, 16, generator=g)
    others = [torch.randn(4, 16, 16, generator=g) for _ in range(3)] + [a.clone(), torch.zeros(4, 16, 16)]
    reference = {}
    for absolute in (True, False):
        for b in others:
            kept = similarities(a, b, absolute=absolute, reference=reference)
            fresh = similarities(a, b, absolute=absolute)
            assert all(torch.equal(kept[m].nan_to_num(-9.0), fresh[m].nan_to_num(-9.0)) for m in fresh)
    assert {key[0] for key in reference} == {"maps", "constant_abs", "constant_signed", "finite", "minmax",
                                             "rank_abs", "rank", "ssim", "hog", "top_k"}
    assert {key[1][1] for key in reference} == {True, False}              # kept apart per option (absolute)


# ---------------------------------------------------------------- issue 17: raw attributions, ties, repeats, options

def _signed_pair():
    """E (1, 2, 2, 2) and E' = E with channel 1 negated: the same ABS map sum_c |E_c|, another signed map."""
    e = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]], [[-1.0, 1.0], [0.0, -4.0]]]])
    e2 = e.clone()
    e2[:, 1] *= -1
    return e, e2


def test_abs_and_signed_pair_by_hand(tiny_cnn):
    # ABS = [[2, 3], [3, 4]] for both -> 1. signed: [0, -1, 3, -4] and [2, -3, 3, 4], ranks [2, 1, 3, 0] and
    # [1, 0, 2, 3], centred dot -1 over norms 5 -> -0.2. (The run's reduce=sum map gave Spearman of |sum_c E_c|:
    # [0, 1, 3, 4] vs [2, 3, 3, 4] -> 0.949; reduce=abs_sum gave 1 for both.)
    e, e2 = _signed_pair()
    s = similarities(e, e2, measures=["spearman", "spearman_signed"])
    assert s["spearman"].item() == pytest.approx(1.0) and s["spearman_signed"].item() == pytest.approx(-0.2)
    # mprt builds the same pair from the raw attributions, whatever the run's reduction was
    x, target = torch.zeros(1, 3, 2, 2), torch.tensor([0])
    method = lambda model, x, t: e if model is tiny_cnn else e2                      # noqa: E731
    r = mprt(tiny_cnn, x, target, method, layers=["fc"], measures=["spearman", "spearman_signed"])
    assert r.scores["spearman"].item() == pytest.approx(1.0) and r.scores["spearman_signed"].item() == pytest.approx(-0.2)
    r = mprt(tiny_cnn, x, target, method, attribution=e, layers=["fc"], measures=["spearman_signed"])
    assert r.scores["spearman_signed"].item() == pytest.approx(-0.2)
    with pytest.raises(ValueError, match=r"raw attribution \(B, C, H, W\)"):
        mprt(tiny_cnn, x, target, method, attribution=e.sum(dim=1), layers=["fc"])    # a reduced map is refused
    assert mprt.consumes == smprt.consumes == emprt.consumes == random_logit.consumes == "raw"
    assert data_randomization.consumes == "raw"


def _grayscale(e, q=99):
    """Adebayo et al.'s code (saliency.VisualizeImageGrayscale), channels first, numpy."""
    m = np.abs(e).sum(axis=0)
    vmax, vmin = np.percentile(m, q), m.min()
    return np.clip((m - vmin) / (vmax - vmin), 0, 1)


def _diverging(e, q=99):
    """saliency.VisualizeImageDiverging, channels first, numpy."""
    m = e.sum(axis=0)
    span = abs(np.percentile(m, q))
    return np.clip((m + span) / (2 * span), -1, 1)


def test_percentile_clip_is_adebayos_visualisation():
    g = torch.Generator().manual_seed(4)
    e, e2 = torch.randn(3, 3, 20, 20, generator=g, dtype=torch.float64), torch.randn(3, 3, 20, 20, generator=g, dtype=torch.float64)
    e[2] = e[2] ** 3 - 0.5                                                            # skewed: clips at both ends
    s = similarities(e, e2, measures=["spearman", "spearman_signed"], clip=99)
    for i in range(3):
        a, b = e[i].numpy(), e2[i].numpy()
        assert s["spearman"][i].item() == pytest.approx(scipy.stats.spearmanr(_grayscale(a).ravel(), _grayscale(b).ravel()).statistic)
        assert s["spearman_signed"][i].item() == pytest.approx(
            scipy.stats.spearmanr(_diverging(a).ravel(), _diverging(b).ravel()).statistic)
    plain = similarities(e, e2, measures=["spearman"])["spearman"]
    assert not torch.allclose(plain, s["spearman"])                                  # the clip's ties count
    with pytest.raises(ValueError, match="clip must be a percentile"):
        similarities(e, e2, clip=0)


def test_top_k_disjoint_sparse_maps_tie_expectation():
    # n = 10, k = 5: a > 0 on {0, 1}, b > 0 on {2, 3}, zeros elsewhere. P(p in top(a)) = 1 on {0, 1} and
    # (5 - 2) / 8 = 3/8 on the 8 zeros; same for b. E|A & B| = 2 (3/8) + 2 (3/8) + 6 (3/8)^2 = 2.34375 -> / 5.
    a, b = torch.zeros(1, 10), torch.zeros(1, 10)
    a[0, :2], b[0, 2:4] = torch.tensor([2.0, 1.0]), torch.tensor([5.0, 3.0])
    assert top_k_overlap(a, b, fraction=0.5).item() == pytest.approx(2.34375 / 5)
    # Monte Carlo: independent uniform tie-breaking in each map
    g = torch.Generator().manual_seed(0)
    hits = []
    for _ in range(4000):
        ta = torch.cat([torch.tensor([0, 1]), 2 + torch.randperm(8, generator=g)[:3]])
        zb = torch.tensor([0, 1, 4, 5, 6, 7, 8, 9])[torch.randperm(8, generator=g)[:3]]
        hits.append(len(set(ta.tolist()) & {2, 3, *zb.tolist()}))
    assert np.mean(hits) / 5 == pytest.approx(2.34375 / 5, abs=0.01)
    # Grad-CAM-like 64 x 64 maps after ReLU, disjoint supports of 300 pixels, k = 410: about 0.05 (chance 0.1)
    a, b = torch.zeros(1, 64, 64), torch.zeros(1, 64, 64)
    a.view(-1)[:300], b.view(-1)[300:600] = torch.linspace(1, 2, 300), torch.linspace(1, 2, 300)
    w = (410 - 300) / (4096 - 300)
    assert top_k_overlap(a, b, fraction=0.1).item() == pytest.approx((600 * w + 3496 * w * w) / 410, rel=1e-5)


def test_top_k_agrees_with_localization_top_k_hits():
    """With no ties in b, E|top(a) & top(b)| is localization's expected hit count of top(a) on b's top set."""
    from metrics.localization import _top_k_hits
    g = torch.Generator().manual_seed(7)
    a = torch.randint(0, 5, (6, 200), generator=g).float()                          # heavy ties
    b = torch.rand(6, 200, generator=g)
    k = 20
    mask = torch.zeros(6, 200, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    expected = _top_k_hits(a, mask, torch.full((6,), k)) / k
    torch.testing.assert_close(top_k_overlap(a, b, fraction=0.1).double(), expected)


def test_ssim_gaussian_window_matches_skimage():
    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(3, 20, 23, generator=g, dtype=torch.float64), torch.rand(3, 20, 23, generator=g, dtype=torch.float64)
    b[0] = 0.8 * a[0] + 0.2 * b[0]
    ref = [skimage.metrics.structural_similarity(a[i].numpy(), b[i].numpy(), gaussian_weights=True, sigma=1.5,
                                                 data_range=1.0) for i in range(3)]
    torch.testing.assert_close(ssim(a, b, window="gaussian"), torch.tensor(ref, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert math.isnan(ssim(a[:, :10, :10], b[:, :10, :10], window="gaussian")[0].item())   # under one 11 x 11 window
    s = similarities(a, b, measures=["ssim"], ssim_window="gaussian")["ssim"]         # on min-max normalised maps
    mm = lambda t: (t - t.amin(dim=(1, 2), keepdim=True)) / (t.amax(dim=(1, 2), keepdim=True) - t.amin(dim=(1, 2), keepdim=True))  # noqa: E731
    torch.testing.assert_close(s, ssim(mm(a), mm(b), window="gaussian"))
    with pytest.raises(ValueError, match="ssim_window must be"):
        similarities(a, b, ssim_window="box")


def test_hog_paper_setting_spearman_and_width_fraction():
    g = torch.Generator().manual_seed(6)
    a, b = torch.rand(2, 64, 64, generator=g, dtype=torch.float64), torch.rand(2, 64, 64, generator=g, dtype=torch.float64)
    b = 0.5 * a + b
    ours = hog_similarity(a, b, cell=16 / 299, correlation="spearman")              # round(0.0535 * 64) = 3 px
    for i in range(2):
        fa, fb = (skimage.feature.hog(t[i].numpy(), orientations=9, pixels_per_cell=(3, 3), cells_per_block=(3, 3),
                                      block_norm="L2-Hys") for t in (a, b))
        assert ours[i].item() == pytest.approx(scipy.stats.spearmanr(fa, fb).statistic, abs=1e-4)   # skimage: float32 bins
    s = similarities(a, b, measures=["hog"], hog_cell=16 / 299, hog_correlation="spearman")["hog"]
    mm = lambda t: (t - t.amin(dim=(1, 2), keepdim=True)) / (t.amax(dim=(1, 2), keepdim=True) - t.amin(dim=(1, 2), keepdim=True))  # noqa: E731
    torch.testing.assert_close(s, hog_similarity(mm(a), mm(b), cell=3, correlation="spearman"))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="hog_cell must be"):
            similarities(a, b, hog_cell=bad)


def test_chance_levels_of_independent_maps():
    """Documented chance levels: Spearman 0, top-k = the fraction (not 0), SSIM and HOG near 0."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(256, 64, 64, generator=g), torch.rand(256, 64, 64, generator=g)
    s = {m: v.mean().item() for m, v in similarities(a, b).items()}
    assert abs(s["spearman"]) < 0.002 and abs(s["spearman_signed"]) < 0.002       # sd of the mean ~ 1/64/16
    assert s["top_k"] == pytest.approx(0.1, abs=0.002)
    assert abs(s["ssim"]) < 0.02 and 0.03 < s["hog"] < 0.1                          # measured 0.005 and 0.071


def test_repeats_average_draws_and_store_their_spread(tiny_cnn, batch):
    x, target = batch
    one = [mprt(tiny_cnn, x, target, methods.gradient_x_input, seed=2 + r * 100_003) for r in range(3)]
    r = mprt(tiny_cnn, x, target, methods.gradient_x_input, seed=2, repeats=3)
    for name in ("spearman", "spearman_signed@conv2", "ssim@fc"):
        y = torch.stack([o.scores[name] for o in one])                              # (3, B)
        torch.testing.assert_close(r.scores[name], y.mean(dim=0))
        std = name.replace("@", "_std@") if "@" in name else f"{name}_std"
        torch.testing.assert_close(r.scores[std], y.std(dim=0))
        assert (r.scores[std] > 0).all() and r.higher_is_better[std] is False
    torch.testing.assert_close(r.curves["spearman"].y, torch.stack([o.curves["spearman"].y for o in one]).mean(dim=0))
    assert "spearman_std" not in one[0].scores                                     # one draw: no spread
    # random logit and emprt: draw r from seed + 100003 r as well
    rl = random_logit(tiny_cnn, x, target, methods.saliency, seed=1, repeats=2, measures=["spearman"])
    singles = [random_logit(tiny_cnn, x, target, methods.saliency, seed=1 + r * 100_003, measures=["spearman"])
               for r in range(2)]
    y = torch.stack([o.scores["spearman"] for o in singles])
    torch.testing.assert_close(rl.scores["spearman"], y.mean(dim=0))
    torch.testing.assert_close(rl.scores["spearman_std"], y.std(dim=0))
    em = emprt(tiny_cnn, x, target, methods.saliency, seed=1, repeats=2)
    y = torch.stack([emprt(tiny_cnn, x, target, methods.saliency, seed=1 + r * 100_003).scores["emprt"] for r in range(2)])
    torch.testing.assert_close(em.scores["emprt"], y.mean(dim=0))
    assert em.higher_is_better == {"emprt": True, "emprt_std": False}


@pytest.mark.parametrize("repeats", [0, 2.5, True, "2"])
def test_bad_repeats(tiny_cnn, batch, repeats):
    x, target = batch
    for metric in (mprt, random_logit, emprt, smprt):
        with pytest.raises(ValueError, match="repeats must be a positive integer"):
            metric(tiny_cnn, x, target, methods.saliency, repeats=repeats)


@pytest.mark.parametrize("top_k", [0.0, 1.5, float("nan"), True, -0.1])
def test_bad_top_k(tiny_cnn, batch, top_k):
    x, target = batch
    with pytest.raises(ValueError, match="top_k must be a fraction"):
        mprt(tiny_cnn, x, target, methods.saliency, top_k=top_k)
    with pytest.raises(ValueError, match="top_k must be a fraction"):
        random_logit(tiny_cnn, x, target, methods.saliency, top_k=top_k)


def test_explain_prediction_uses_each_models_own_argmax(tiny_cnn, batch):
    x, target = batch
    calls = []

    def method(model, x, t):
        calls.append((model, t.clone()))
        return methods.saliency(model, x, t)

    with torch.no_grad():
        prediction = tiny_cnn(x).argmax(dim=1)
    given = methods.saliency(tiny_cnn, x, target)
    r = mprt(tiny_cnn, x, target, method, attribution=given, explain="prediction", seed=3, measures=["spearman"])
    assert not torch.equal(prediction, target)                                      # else the test proves nothing
    assert calls[0][0] is tiny_cnn and torch.equal(calls[0][1], prediction)         # original: recomputed for the argmax
    stages = list(mprt_stages(tiny_cnn, seed=3))
    assert len(calls) == 1 + len(stages)
    for (model, t), (name, _) in zip(calls[1:], stages):
        with torch.no_grad():
            assert torch.equal(t, model(x).argmax(dim=1)), name                     # the randomized model's argmax
    labels = mprt(tiny_cnn, x, target, methods.saliency, seed=3, measures=["spearman"])
    assert not torch.equal(r.scores["spearman"], labels.scores["spearman"])
    with pytest.raises(ValueError, match="explain must be 'label'"):
        mprt(tiny_cnn, x, target, methods.saliency, explain="argmax")


def test_random_logit_sign_flip_takes_the_better_sign(linear_batch):
    # a Linear model whose class 1 weights are minus class 0's: the "gradient" map of the other class is -E
    model, x, _ = linear_batch
    with torch.no_grad():
        model.weight[1] = -model.weight[0]
    method = lambda m, x, t: m.weight[t].detach().clone()                           # noqa: E731  (B, C, H, W)
    target = torch.tensor([0, 1, 1, 0])
    plain = random_logit(model, x, target, method, measures=["spearman", "spearman_signed"])
    flipped = random_logit(model, x, target, method, measures=["spearman", "spearman_signed"], sign_flip=True)
    torch.testing.assert_close(plain.scores["spearman_signed"], torch.full((4,), -1.0))
    torch.testing.assert_close(flipped.scores["spearman_signed"], torch.ones(4))
    torch.testing.assert_close(plain.scores["spearman"], torch.ones(4))           # ABS never sees the sign
    with pytest.raises(ValueError, match="sign_flip must be"):
        random_logit(model, x, target, method, sign_flip="yes")


def test_adebayo2018_preset_scores_abs_and_signed_side_by_side(tiny_cnn, batch):
    """The preset's mprt: both Spearman scores, three draws with their spread, the paper's SSIM/HOG settings."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from bench.provenance import without_meta
    conf = CONF
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = derive_seeds(compose("config", overrides=["experiment=adebayo2018"]))
    node = cfg.metric.mprt
    assert (node.explain, node.repeats, node.clip, node.ssim_window, node.hog_cell, node.hog_correlation) == \
        ("prediction", 3, 99, "gaussian", 0.0535, "spearman")
    assert cfg.metric.mprt_independent.order == "independent" and cfg.metric.random_logit.sign_flip
    x, target = batch
    r = instantiate(without_meta(node))(tiny_cnn, x, target, methods.gradient_x_input)   # as the runner does
    assert {"spearman", "spearman_signed", "spearman_std", "spearman_signed_std", "ssim", "hog"} <= set(r.scores)
    assert not torch.equal(r.scores["spearman"], r.scores["spearman_signed"])       # signed maps: not a copy
