"""Published findings as tests (issue 17): one test per statement of the literature, on the embedded zoo.

Each test names its paper and section and asserts the paper's threshold where the embedded benchmark
(small_cnn trained on `shapes`, the session's `trained` fixture; its first 64 test images) reproduces
it. Where it does not, the test asserts what the benchmark does measure, with the measured value and
a margin in a comment, and README.md ("What reproduces and what does not") lists paper and ours side
by side. Computations shared by several statements live in module-scoped fixtures.

Statements already tested elsewhere are referenced, not repeated:
- tests/test_findings.py: random is worst on MoRF AUC and on pointing game / RMA; edge invariant under MPRT.
- tests/test_findings_faithfulness.py: IG and Grad-CAM beat random in both orders and on SRG; deletion / insertion.
- tests/test_findings_localization.py: Grad-CAM and IG beat random and centre on all eight localization metrics.
- tests/test_findings_randomization.py: guided backprop > 0.9 after the logit layer; edge identical under
  every randomization; random logit of per-class random maps; the label-randomized model memorises.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bench.config import CONF, derive_seeds
from bench.data import Shapes
from bench.zoo import SmallCNN
from methods import random_map
from metrics import mprt, randomization_layers, similarities

N = 64                                   # images: the mean of 64 per-sample scores has se ~ sd / 8


def _method(name: str, **overrides):
    """The method as conf/method/<name>.yaml configures it, with `overrides` of its options."""
    node = OmegaConf.load(CONF / "method" / f"{name}.yaml")[name]
    cfg = derive_seeds(OmegaConf.create({"seed": 0, "method": {name: node}}))      # a default run's seeds
    return instantiate(OmegaConf.merge(cfg.method[name], overrides))


@pytest.fixture(scope="module")
def zoo(trained):
    """(model, x, target, mask) of the first N test images of the session's trained small_cnn."""
    return trained.model, trained.x[:N], trained.target[:N], trained.mask[:N]


# ---------------------------------------------------------------- 1. chance level of the similarity measures

def test_two_independent_random_maps_score_chance_on_every_similarity():
    """Adebayo et al. 2018, App. B (similarity of two independent random maps): every similarity
    measure is ~0 for unrelated maps, |mean| < 0.05 over >= 64 samples; top-k intersection is
    compared with its chance level (the fraction k/n), not with 0.

    Two random controls (uniform maps, seeds 0 and 1) on 64 shapes images; signed Spearman on the
    same maps centred (u - 1/2), so that it differs from the ABS map's. HOG with Adebayo's features
    (5 % cells, Spearman of the features) holds the threshold; the suite's default (8 px cells,
    Pearson) has a small positive bias on iid noise (0.07 measured), which is asserted as such.
    """
    x = Shapes(n_samples=N).tensors()["x"]
    target = torch.zeros(N, dtype=torch.long)
    model = SmallCNN().eval()                                             # the control ignores it
    a, b = (random_map(model, x, target, seed=s) for s in (0, 1))        # (N, 3, H, W) each
    adebayo = similarities(a, b, ssim_window="gaussian", hog_cell=0.0535, hog_correlation="spearman")
    default = similarities(a, b)
    signed = similarities(a - 0.5, b - 0.5, measures=["spearman_signed"])["spearman_signed"]
    mean = {f"{k}/{which}": v.mean().item() for which, s in (("adebayo", adebayo), ("default", default))
            for k, v in s.items()}
    mean["spearman_signed/centred"] = signed.mean().item()
    for name in ("spearman", "ssim", "hog"):
        assert abs(mean[f"{name}/adebayo"]) < 0.05, mean
    assert abs(mean["spearman_signed/centred"]) < 0.05, mean
    assert abs(mean["top_k/adebayo"] - 0.1) < 0.05, mean                 # chance = top_k fraction 0.1
    # measured: Spearman 0.001 (per-sample sd 1/sqrt(4095) = 0.016), top-k 0.0995, SSIM 0.006 (Gaussian
    # window 0.004), HOG with Adebayo's features 0.007
    assert abs(mean["spearman/default"]) < 0.01 and abs(mean["top_k/default"] - 0.1) < 0.01, mean
    assert abs(mean["ssim/default"]) < 0.05, mean
    # the default HOG similarity of iid noise is biased upwards (0.07; sd 0.05 per sample, se 0.006):
    # the paper's < 0.05 does not hold for it, so the default is not a zero-centred measure
    assert 0.03 < mean["hog/default"] < 0.12, mean


# ---------------------------------------------------------------- 2-5. cascading model parameter randomization

@pytest.fixture(scope="module")
def cascading(zoo):
    """Cascading top-down MPRT (Adebayo et al. 2018, Sec. 3.1) with their ABS and signed Spearman, from the
    raw attributions; gradient and guided backprop averaged over 3 randomization draws (`repeats`)."""
    model, x, target, _ = zoo
    repeats = {"gradient": 3, "guided_backprop": 3}
    out = {}
    for name in ("gradient", "guided_backprop", "gradient_x_input", "integrated_gradients", "grad_cam"):
        r = mprt(model, x, target, _method(name), measures=["spearman", "spearman_signed"],
                 repeats=repeats.get(name, 1))
        out[name] = {m: dict(zip(r.curves[m].labels, r.curves[m].y.mean(dim=0).tolist()))
                     for m in ("spearman", "spearman_signed")}                        # stage -> mean over images
    return randomization_layers(model), out


@pytest.mark.slow
def test_gradient_decorrelates_gradually_under_cascading_randomization(zoo, cascading):
    """Adebayo et al. 2018, Sec. 4 and Fig. 2 (cascading randomization, Inception v3): the gradient's ABS
    Spearman falls stage by stage as layers are randomized from the logits down, ends below 0.2 once
    every layer is random, and after the logit layer alone is still well above 0 (the drop is gradual).
    (tests/test_findings_randomization.py pins the run map's version, < 0.35.)

    With Adebayo's ABS map sum_c |E_c| (their VisualizeImageGrayscale) it does not reproduce: 0.64 after
    the logit layer, 0.59 after fc1, 0.33 after the last conv block, then a plateau at 0.29-0.30 (mean of
    64 images, 3 draws; a model trained on one thread instead of two gave 0.67, 0.56, 0.32, then 0.31-0.33):
    the per-channel magnitudes keep the image's edges, whatever the weights. The absolute value of the
    channel-summed map, |sum_c E_c|, does reproduce it: above 0.4 after the top two stages, then falling
    at every stage to below 0.2: 0.49, 0.54 -> 0.21 -> 0.17 -> 0.16 -> 0.14 -> 0.13 (seed 0; the other
    training: 0.54 -> 0.47 -> 0.21 -> 0.19 -> 0.18 -> 0.16 -> 0.14).
    """
    from metrics import mprt_stages, spearman

    layers, c = cascading
    curve = [c["gradient"]["spearman"][name] for name in reversed(layers)]          # logit layer first
    assert curve[0] > 0.5, curve                                                  # after the logits alone
    assert curve[0] > curve[1] > curve[2] + 0.1, curve                            # the top stages fall
    assert max(curve[2:]) - min(curve[2:]) < 0.06 and 0.25 < curve[-1] < 0.35, curve   # then a plateau at 0.3

    model, x, target, _ = zoo
    gradient = _method("gradient")
    summed = lambda m: gradient(m, x, target).sum(dim=1).abs()                       # noqa: E731  (B, H, W)
    original = summed(model)
    curve = [spearman(original, summed(randomized)).mean().item() for _, randomized in mprt_stages(model)]
    assert min(curve[:2]) > 0.4 and max(curve[:2]) > curve[2] + 0.2, curve        # high after the top two stages
    assert all(later < earlier for earlier, later in zip(curve[2:], curve[3:])), curve   # then falls at every stage
    assert curve[-1] < 0.2, curve                                                    # the paper's threshold


@pytest.mark.slow
def test_guided_backprop_stays_similar_where_gradient_does_not(cascading):
    """Adebayo et al. 2018, Sec. 4, Fig. 2: guided backprop is nearly invariant to randomizing the top
    layers; its ABS Spearman stays above the gradient's by >= 0.15 after the logit layer and after the
    next one (means over 3 draws), and it decorrelates only once the layers nearest the input are random.
    (tests/test_findings_randomization.py: GBP > 0.9 after the logit layer on the abs_sum map.)

    Measured: guided backprop 0.95 / 0.95 after fc2 / fc1 against the gradient's 0.67 / 0.56; it falls to
    0.79 after the last conv block, 0.57 after block3 and 0.33 with every layer random.
    """
    layers, c = cascading
    gbp, grad = c["guided_backprop"]["spearman"], c["gradient"]["spearman"]
    for stage in (layers[-1], layers[-2]):                                        # logits, then the next layer
        assert gbp[stage] >= grad[stage] + 0.15, (stage, gbp, grad)
    assert gbp[layers[0]] < 0.4 and gbp[layers[0]] < gbp[layers[-1]] - 0.5, gbp   # decorrelates at the input
    assert gbp[layers[2]] > 0.5, gbp                                               # but not before the early blocks


@pytest.mark.slow
@pytest.mark.parametrize("name", ["integrated_gradients", "gradient_x_input"])
def test_input_weighted_methods_lose_their_sign_first(cascading, name):
    """Adebayo et al. 2018, Sec. 4 and App. (ABS vs. signed maps, Fig. 10): for Integrated Gradients and
    gradient x input the signed Spearman is < 0.5 already after the logit layer and |.| < 0.1 once every
    layer is random, while the ABS Spearman stays above it (gap > 0.2 at some stage): the input's own
    structure keeps the ABS maps alike, the sign of the evidence is lost.

    Measured after the logit layer: signed 0.18 (IG) and 0.10 (gradient x input), ABS 0.77 and 0.77;
    with every layer random: signed 0.00, ABS 0.55 and 0.54.
    """
    layers, c = cascading
    signed, absolute = c[name]["spearman_signed"], c[name]["spearman"]
    assert signed[layers[-1]] < 0.5, signed
    assert abs(signed[layers[0]]) < 0.1, signed
    assert max(absolute[s] - signed[s] for s in layers) > 0.2, (absolute, signed)


@pytest.mark.slow
def test_grad_cam_changes_with_the_logit_layer(cascading):
    """Adebayo et al. 2018, Sec. 4, Fig. 2: Grad-CAM is sensitive to the top layer, ABS Spearman < 0.7
    after randomizing the logit layer alone. Measured: 0.31."""
    layers, c = cascading
    assert c["grad_cam"]["spearman"][layers[-1]] < 0.7, c["grad_cam"]["spearman"]


# ---------------------------------------------------------------- 11. localization: chance, controls, informed

@pytest.fixture(scope="module")
def shapes_2000():
    """2000 test images of `shapes` with their masks: the controls need no model, so chance levels are
    measured on many images (se ~0.005 for a hit rate)."""
    return Shapes(n_samples=2000).tensors()


def test_random_map_localizes_at_the_mask_share(shapes_2000):
    """Arras et al. 2022, Sec. 4 (relevance mass and rank accuracy) and Zhang et al. 2018 (pointing game):
    a map that ignores the image scores the mask's share of the image, |S|/N, on all three.

    Measured on 2000 images: |S|/N = 0.0701; random RMA 0.0701, RRA 0.0697, pointing game 0.062 (se 0.0054).
    """
    from metrics import pointing_game, relevance_mass_accuracy, relevance_rank_accuracy

    x, target, mask = shapes_2000["x"], shapes_2000["target"], shapes_2000["mask"]
    share = mask.flatten(1).double().mean(dim=1)                                     # (B,) |S| / N
    a = random_map(SmallCNN().eval(), x, target)[:, 0]                                 # (B, H, W)
    for fn in (pointing_game, relevance_mass_accuracy, relevance_rank_accuracy):
        (score, v), = fn(a, mask).scores.items()
        v = v.double()
        se = ((v - share).std() / math.sqrt(len(v))).item()                         # paired with |S|/N per image
        assert abs((v - share).mean().item()) < 4 * se + 1e-3, (score, v.mean().item(), share.mean().item(), se)


def test_centre_prior_hits_at_the_generators_analytic_rate(shapes_2000):
    """Judd et al. 2009's centre prior as a control (Zhang et al. 2018 compare with it): on `shapes` its
    pointing game equals the chance that the image centre lies on the object, which the generator fixes:
    the object's centre is uniform on [r + 1, 62 - r]^2 (side L = 61 - 2r), its area a_c r^2 (a_c per
    class, bench.data.shapes._AREA), r uniform on [9, 16], classes balanced, so
    P(hit) = mean_c a_c * E_r[r^2 / (61 - 2r)^2] = 0.246 (exact for r <= 14.5, where the whole shape
    around the centre pixel fits the range; larger objects lose a sliver, so this is an upper bound).

    Measured on 2000 images: 0.241 (se 0.009).
    """
    from bench.data.shapes import _AREA
    from methods import centre
    from metrics import pointing_game

    x, target, mask = shapes_2000["x"], shapes_2000["target"], shapes_2000["mask"]
    r = torch.linspace(9.0, 16.0, 70001, dtype=torch.float64)
    analytic = (sum(_AREA) / len(_AREA) * (r.square() / (61 - 2 * r).square())).mean().item()
    hit = pointing_game(centre(SmallCNN().eval(), x, target)[:, 0], mask).scores["hit"].double()
    se = (hit.std() / math.sqrt(len(hit))).item()
    assert analytic == pytest.approx(0.246, abs=0.001)
    assert analytic - 3 * se - 0.01 < hit.mean().item() < analytic + 3 * se, (hit.mean().item(), analytic, se)


@pytest.mark.slow
def test_informed_maps_rank_the_object_at_least_twice_as_well_as_chance(zoo):
    """Arras et al. 2022, Sec. 5 (CLEVR-XAI): informed methods reach relevance rank accuracy far above
    the random baseline; here >= 2x random's for Grad-CAM and IG, and above the centre prior's.
    (tests/test_findings_localization.py: both beat random and centre on all eight metrics.)

    Measured on 64 images: RRA Grad-CAM 0.62, IG 0.55, random 0.07, centre 0.22.
    """
    from metrics import relevance_rank_accuracy, to_map

    model, x, target, mask = zoo
    rra = {name: relevance_rank_accuracy(to_map(_method(name)(model, x, target), "abs_sum"), mask)
           .scores["rra"].mean().item() for name in ("grad_cam", "integrated_gradients", "random", "centre")}
    for name in ("grad_cam", "integrated_gradients"):
        assert rra[name] >= 2 * rra["random"] and rra[name] > rra["centre"] + 0.1, rra


# ---------------------------------------------------------------- 12. input invariance

@pytest.mark.slow
def test_a_compensated_mean_shift_changes_only_the_maps_that_read_the_input(zoo):
    """Kindermans et al. 2019 ("The (un)reliability of saliency methods", Sec. 3, Fig. 2): shift every
    input by a constant and compensate it exactly in the first layer's bias, so the network's function
    is unchanged. Gradient, guided backprop and SmoothGrad (noise scaled to the unchanged range) are
    input invariant; gradient x input and IG with a zero baseline are not; IG with a baseline that moves
    with the input (each image's mean colour) is invariant again.

    Measured rel_l1 = sum |E' - E| / sum |E| on 32 images (max): gradient, guided backprop 1e-7,
    SmoothGrad 2e-5, IG(mean) 3e-5 (float32 round-off); mean rel_l1 gradient x input 2.0, IG(zero) 1.5,
    signed Spearman 0.43 and 0.33.
    """
    from metrics import input_invariance

    model, x, target, _ = zoo
    x, target = x[:32], target[:32]
    methods = {"gradient": _method("gradient"), "guided_backprop": _method("guided_backprop"),
               "smoothgrad": _method("smoothgrad", samples=8),
               "integrated_gradients/zero": _method("integrated_gradients", baseline=0.0),
               "integrated_gradients/mean": _method("integrated_gradients", baseline="mean"),
               "gradient_x_input": _method("gradient_x_input")}
    rel = {name: input_invariance(model, x, target, m, shift=1.0, measures=["spearman_signed"]).scores
           for name, m in methods.items()}
    for name in ("gradient", "guided_backprop", "smoothgrad", "integrated_gradients/mean"):
        assert rel[name]["rel_l1"].max() < 1e-3, (name, rel[name]["rel_l1"].max())
        assert rel[name]["spearman_signed"].min() > 0.999, name
    for name in ("gradient_x_input", "integrated_gradients/zero"):
        assert rel[name]["rel_l1"].median() > 0.5, (name, rel[name]["rel_l1"].median())
        assert rel[name]["spearman_signed"].mean() < 0.9, (name, rel[name]["spearman_signed"].mean())


# ---------------------------------------------------------------- 6. data randomization

@pytest.mark.slow
def test_label_memorising_model_changes_signed_gradient_maps_more_than_guided_backprop(trained, zoo):
    """Adebayo et al. 2018, Sec. 5 (data randomization test, Fig. 5): maps of a model trained on permuted
    labels (it can only memorise) must differ from the real model's. Gradient and SmoothGrad change
    clearly; guided backprop stays far more similar (it "fails" the test). The label-randomized model is
    the one the runner's data_randomization metric trains and caches (conf/metric/data_randomization.yaml:
    256 images, 40 epochs, 100 % train and ~15 % test accuracy); 32 images, SmoothGrad with 16 draws.

    Reproduced on the signed maps: Spearman gradient 0.00, SmoothGrad 0.00, guided backprop 0.31 (64
    images). Not on the ABS maps: 0.43, 0.41 and 0.46, a gap of 0.03-0.05 where the paper's figure shows a
    clear one; the ABS maps of both models follow the image's edges, so the gap is pinned as small.
    """
    from bench.zoo import load_model
    from metrics import data_randomization

    model, x, target, _ = zoo
    x, target = x[:32], target[:32]
    retrain = OmegaConf.load(CONF / "metric" / "data_randomization.yaml").data_randomization.retrain
    model_cfg = OmegaConf.to_container(trained.cfg.model, resolve=True)
    model_cfg["train"] |= {**OmegaConf.to_container(retrain), "permute_labels": True}
    memorising, info = load_model(OmegaConf.create(model_cfg), trained.cfg.dataset, cache_dir=trained.cache_dir)
    assert info["train_accuracy"] >= 0.95 and info["test_accuracy"] < 0.35, info     # it memorised
    methods = {"gradient": _method("gradient"), "smoothgrad": _method("smoothgrad", samples=16),
               "guided_backprop": _method("guided_backprop")}
    rho = {name: {k: v.mean().item() for k, v in data_randomization(
        model, x, target, m, memorising, measures=["spearman", "spearman_signed"]).scores.items()}
        for name, m in methods.items()}
    for name in ("gradient", "smoothgrad"):
        assert rho[name]["spearman_signed"] < rho["guided_backprop"]["spearman_signed"] - 0.2, rho
        assert abs(rho[name]["spearman_signed"]) < 0.1, rho                        # signed maps unrelated
        assert abs(rho[name]["spearman"] - rho["guided_backprop"]["spearman"]) < 0.15, rho   # not reproduced


# ---------------------------------------------------------------- 7. eMPRT and sMPRT

@pytest.mark.slow
def test_emprt_of_the_random_control_is_zero_and_smprt_keeps_gradient_maps_more_alike(zoo):
    """Hedström et al. 2023 ("Sanity checks revisited", Sec. 4-5): eMPRT, the relative rise in a map's
    entropy under full randomization, is ~0 for the random-map control (its complexity cannot rise); sMPRT
    (maps averaged over N = 50 inputs with noise sigma = 0.1 of the input range, bottom-up) denoises the
    gradient before comparing, and gives a higher similarity than MPRT.

    Measured: eMPRT of random 0; ABS Spearman of the gradient, bottom-up, 16 images, per
    stage MPRT 0.52 0.36 0.35 0.34 0.30 0.29 0.30, sMPRT 0.59 0.32 0.38 0.38 0.36 0.34 0.35: higher at six
    of seven stages (not after block2) and after full randomization (+0.05).
    """
    from metrics import emprt, smprt

    model, x, target, _ = zoo
    e = emprt(model, x, target, _method("random")).scores["emprt"]
    assert e.mean().abs() < 0.01, e.mean()
    x, target = x[:16], target[:16]
    gradient = _method("gradient")
    plain = mprt(model, x, target, gradient, order="cascading_bottom_up", measures=["spearman"])
    smooth = smprt(model, x, target, gradient, samples=50, noise=0.1, measures=["spearman"])
    p, s = plain.curves["spearman"].y.mean(dim=0), smooth.curves["spearman"].y.mean(dim=0)   # (L,) per stage
    assert s[-1] > p[-1] + 0.02 and s.mean() > p.mean() + 0.01, (p, s)
    assert (s > p).sum() >= len(p) - 1, (p, s)


# ---------------------------------------------------------------- 8, 9, 13. pixel flipping, AOPC, reliability

FLIP = ["saliency", "gradient_x_input", "integrated_gradients", "guided_backprop", "grad_cam", "random"]
INFORMED = FLIP[:-1]


@pytest.fixture(scope="module")
def raw_maps(zoo):
    """Raw attributions (B, C, H, W) of FLIP's methods on the N images, as configured."""
    model, x, target, _ = zoo
    return {name: _method(name)(model, x, target) for name in FLIP}


@pytest.fixture(scope="module")
def flipping(zoo, raw_maps):
    """Pixel flipping of the run's map (abs_sum, what the metric consumes) with logits, 8 steps: both orders
    with the zero baseline (mid-grey), MoRF with blur and with uniform noise."""
    from metrics import consumed, metric_input, pixel_flipping

    model, x, target, _ = zoo
    maps = {n: metric_input(a, consumed(pixel_flipping), "abs_sum") for n, a in raw_maps.items()}
    runs = {"zero": dict(order="both", baseline=0.0), "blur": dict(order="morf", baseline="blur"),
            "uniform": dict(order="morf", baseline="uniform")}
    return {run: {n: pixel_flipping(model, x, target, maps[n], steps=8, **kw) for n in FLIP}
            for run, kw in runs.items()}


@pytest.mark.slow
def test_pixel_flipping_with_logits_separates_informed_maps_from_random(flipping):
    """Bluecher et al. 2024 (SRG, logits; Sec. 4) after Samek et al. 2017: with the logit as output, every
    informed method has a lower MoRF AUC, a higher LeRF AUC and a higher AOPC than the random map, and the
    random map's symmetric relevance gain SRG = AUC(LeRF) - AUC(MoRF) is ~0 (|mean| < 0.02).
    (tests/test_findings_faithfulness.py: IG and Grad-CAM beat random in both orders and on SRG.)

    Our SRG is in logit units, where 64 images give it an se of ~0.08: measured 0.13 (1.7 % of the
    unperturbed logit, 7.5). The paper's 0.02 is asserted relative to that logit, and the mean within 3 se.
    """
    zero = flipping["zero"]
    mean = {n: {k: v.mean().item() for k, v in r.scores.items()} for n, r in zero.items()}
    for n in INFORMED:
        assert mean[n]["auc_morf"] < mean["random"]["auc_morf"], (n, mean)
        assert mean[n]["auc_lerf"] > mean["random"]["auc_lerf"], (n, mean)
        assert mean[n]["aopc_morf"] > mean["random"]["aopc_morf"], (n, mean)
    srg = zero["random"].scores["srg"]
    f0 = zero["random"].curves["morf"].y[:, 0].mean().item()                   # unperturbed target logit
    assert abs(srg.mean().item()) < 0.02 * f0, (srg.mean().item(), f0)
    assert abs(srg.mean().item()) < 3 * srg.std().item() / math.sqrt(len(srg)), srg.mean().item()


@pytest.mark.slow
def test_aopc_depends_on_the_perturbation(flipping):
    """Samek et al. 2017, Sec. IV and Fig. 4 (IEEE TNNLS, "Evaluating the visualization of what a deep
    neural network has learned"): the scores depend on how regions are removed; removing by uniform
    noise gives a larger AOPC than removing by blurring, for the same maps, since noise takes the
    classifier further out of its data. Measured (MoRF, 8 steps): uniform exceeds blur by 1.05-1.26
    logits for every informed method and by 2.44 for random.
    """
    for n in FLIP:
        uniform = flipping["uniform"][n].scores["aopc"].mean().item()
        blur = flipping["blur"][n].scores["aopc"].mean().item()
        assert uniform > blur + 0.5, (n, uniform, blur)


@pytest.mark.slow
def test_morf_rankings_of_methods_are_unreliable_across_images(flipping):
    """Tomsett et al. 2020 ("Sanity checks for saliency metrics", AAAI, Sec. 4-5): inter-rater reliability
    of a faithfulness metric, each image ranking the methods by its MoRF AUC, is low: Krippendorff's
    alpha < 0.667 (the lowest acceptable value); it rises when a clearly bad control is added (every
    image agrees on it); and the internal consistency of one method's scores, the Spearman across
    images between its MoRF and its LeRF AUC, is well below 1.

    Measured (zero baseline, 8 steps): alpha 0.08 over the five informed methods, 0.27 with random;
    Spearman(MoRF, LeRF) between -0.24 and 0.55 for the informed methods (random: 0.92, both curves
    follow the unperturbed logit).
    """
    import krippendorff
    from scipy.stats import spearmanr

    zero = flipping["zero"]

    def alpha(names):
        auc = torch.stack([zero[n].scores["auc_morf"] for n in names], dim=1)      # (images, methods)
        ranks = auc.argsort(dim=1).argsort(dim=1).numpy()                          # each image ranks the methods
        return krippendorff.alpha(reliability_data=ranks, level_of_measurement="ordinal")

    informed, with_control = alpha(INFORMED), alpha(FLIP)
    assert informed < 0.667 and with_control > informed + 0.1, (informed, with_control)
    for n in INFORMED:
        rho = spearmanr(zero[n].scores["auc_morf"].numpy(), zero[n].scores["auc_lerf"].numpy())[0]
        assert rho < 0.75, (n, rho)


# ---------------------------------------------------------------- 8, 10. the imputation: zero, mean, blur, ROAD

STUDY = 16                                # images: ROAD's imputation costs ~50 ms of CPU per image and step


@pytest.fixture(scope="module")
def imputation_study(zoo, raw_maps):
    """Mean MoRF / LeRF AUC and SRG per (imputation, method) on the first STUDY images, 5 steps, the same
    abs_sum maps for every imputation (so only the removal differs): pixel flipping with the zero (mid-grey),
    mean and blur baselines, and ROAD's noisy linear imputation (Rong et al. 2022)."""
    from metrics import pixel_flipping, road, to_map

    model, x, target, _ = zoo
    x, target = x[:STUDY], target[:STUDY]
    out = {}
    for n in FLIP:
        a = to_map(raw_maps[n][:STUDY], "abs_sum")
        runs = {"zero": pixel_flipping(model, x, target, a, steps=5, order="both", baseline=0.0),
                "mean": pixel_flipping(model, x, target, a, steps=5, order="both", baseline="mean"),
                "blur": pixel_flipping(model, x, target, a, steps=5, order="both", baseline="blur"),
                "noisy_linear": road(model, x, target, a, steps=5)}
        for imputation, r in runs.items():
            out[imputation, n] = {s: r.scores[s].mean().item() for s in ("auc_morf", "auc_lerf", "srg")}
    return out


def _ranking(study, imputation, score, names=FLIP):
    """Methods' scores under one imputation, oriented so that larger is better (MoRF AUC negated)."""
    sign = -1 if score == "auc_morf" else 1
    return [sign * study[imputation, n][score] for n in names]


@pytest.mark.slow
def test_srg_rankings_are_not_more_stable_across_imputations_than_morf_here(imputation_study):
    """Bluecher et al. 2024 ("Decoupling pixel flipping and occlusion strategy", Sec. 5): rankings of
    methods by SRG are more stable across removal strategies than rankings by MoRF alone (mean pairwise
    Kendall tau over the baselines zero, mean, blur and noisy linear imputation).

    Not reproduced: MoRF's ranking is the stabler one here, mean tau 0.82 against SRG's 0.67 (16 images,
    5 steps; 0.86 against 0.69 on 64 images at 16 steps with two more methods): LeRF's ranking flips
    between the constant fills and the blur / ROAD fills (guided backprop last under zero and mean,
    second under ROAD; LeRF tau 0.42), and SRG inherits it.
    """
    from scipy.stats import kendalltau

    pairs = list(itertools.combinations(["zero", "mean", "blur", "noisy_linear"], 2))
    tau = {score: sum(kendalltau(_ranking(imputation_study, a, score), _ranking(imputation_study, b, score))[0]
                      for a, b in pairs) / len(pairs) for score in ("auc_morf", "srg", "auc_lerf")}
    assert tau["auc_morf"] > 0.6 and tau["auc_lerf"] < tau["srg"] < tau["auc_morf"] + 0.01, tau


@pytest.mark.slow
def test_removal_masks_leak_the_class(trained):
    """Rong et al. 2022 ("A consistent and efficient evaluation strategy for attribution methods", ICML,
    Sec. 3-4): (a) the removal mask alone carries class information (with a constant fill such as the
    mean, the model sees it): a classifier trained on the masks predicts the class above chance; (b) with
    their noisy linear imputation MoRF and LeRF rank methods consistently (Kendall tau between the two
    rankings), more so than with mean imputation.

    (a) reproduces: masks of the 20 % most salient pixels (saliency maps of the trained model), a small
    CNN trained on 600 of them (10 epochs), accuracy 0.38 on 200 others (chance 1/6, se 0.026; 0.5 with
    1000 masks and 15 epochs). (b) is inconclusive here and not asserted: tau(MoRF, LeRF) over the six
    methods of the imputation study (16 images) was 0.33 with ROAD's imputation against 0.33 with the
    mean (0.21 against 0.64 on 64 images with two more methods) for one trained small_cnn, and 0.73
    against 0.47 for the same recipe trained on two threads instead of one; with six methods tau moves
    in steps of 0.13, and the sign of the difference follows the training's rounding.
    """
    import torch.nn.functional as F
    from torch import nn

    from metrics import to_map

    data = Shapes(split="val", n_samples=800).tensors()
    a = to_map(_method("saliency")(trained.model, data["x"], data["target"]), "abs_sum")       # (800, H, W)
    top = a.flatten(1).topk(a[0].numel() // 5, dim=1).indices                                # the first 20 % removed
    masks = torch.zeros(a.shape[0], a[0].numel()).scatter_(1, top, 1.0).view(-1, 1, *a.shape[1:])
    masks, y = F.avg_pool2d(masks, 2), data["target"]                                        # (800, 1, 32, 32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                            nn.Linear(32, 6))
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(10):
            for idx in torch.randperm(600).split(50):
                loss = F.cross_entropy(net(masks[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        accuracy = (net(masks[600:]).argmax(dim=1) == y[600:]).double().mean().item()
    assert accuracy > 0.3, accuracy                       # chance 1/6, se 0.026 on 200 masks: > 5 se above
