"""The shared one-pixel removal sweep (metrics.sweep): its values, and reuse only inside sweeps_shared()."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from hydra import compose, initialize_config_dir

from bench.config import CONF
from metrics import faithfulness_estimate, non_sensitivity
from metrics.sweep import pixel_sweep, sweeps_shared


class Counted:
    """Images through `model`'s forward (a forward pre-hook), removed on exit."""

    def __init__(self, model):
        self.model, self.images = model, 0

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(lambda m, args: setattr(self, "images",
                                                                                    self.images + len(args[0])))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _maps(x, n=3):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(x.shape[0], *x.shape[2:], generator=g) for _ in range(n)]


def _both(model, x, target, a, baseline):
    """Both metrics on one map, as a run's YAMLs configure them (each with its own derived seed)."""
    fe = faithfulness_estimate(model, x, target, a, baseline=baseline, seed=11).scores["pearson"]
    ns = non_sensitivity(model, x, target, a.abs(), baseline=baseline, seed=11 if baseline == "uniform" else 12,
                         tolerance=1e-2).scores["violations"]
    return fe, ns


def test_pixel_sweep_is_the_definition(tiny_cnn, batch):
    x, target = batch
    fill = x.mean(dim=(2, 3), keepdim=True)                                       # "mean": (B, C, 1, 1)
    expected = torch.empty(5, 64)
    for b in range(5):                                                            # one image at a time
        for p in range(64):
            xp = x[b:b + 1].clone()
            xp[0, :, p // 8, p % 8] = fill[b, :, 0, 0]
            expected[b, p] = tiny_cnn(xp)[0, target[b]]
    torch.testing.assert_close(pixel_sweep(tiny_cnn, x, target, baseline="mean", chunk_size=7), expected)
    sm = pixel_sweep(tiny_cnn, x, target, baseline="mean", output="softmax")
    assert sm.shape == (5, 64) and bool(((sm > 0) & (sm < 1)).all())


@pytest.mark.parametrize("baseline", [0.0, "uniform"])
def test_scores_are_bit_identical_with_and_without_the_scope(tiny_cnn, batch, baseline):
    x, target = batch
    alone = [_both(tiny_cnn, x, target, a, baseline) for a in _maps(x)]
    with sweeps_shared() as memo:
        shared = [_both(tiny_cnn, x, target, a, baseline) for a in _maps(x)]
    for (fe, ns), (fe2, ns2) in zip(alone, shared):
        assert torch.equal(fe, fe2) and torch.equal(ns, ns2)
    assert not bool(alone[0][0].isnan().any())
    # one sweep for 3 maps x 2 metrics: a constant baseline is the same under the two metrics' seeds (11, 12);
    # a "uniform" one only under the same seed (another seed is another field: test below)
    assert (memo.misses, memo.hits) == (1, 5)
    assert memo.nbytes == 0 and not memo.entries                                  # emptied on exit


def test_second_method_and_second_metric_make_no_per_pixel_passes(tiny_cnn, batch):
    x, target = batch
    a1, a2 = _maps(x, 2)
    with sweeps_shared(), Counted(tiny_cnn) as c:
        faithfulness_estimate(tiny_cnn, x, target, a1)
        assert c.images == 5 + 5 * 64                                             # f(x), then every pixel
        faithfulness_estimate(tiny_cnn, x, target, a2)                            # another method's map
        non_sensitivity(tiny_cnn, x, target, a2.abs(), seed=5)                    # the other metric
        assert c.images == 5 + 5 * 64 + 5 + 5                                     # f(x) only
        non_sensitivity(tiny_cnn, x, target, a2.abs(), patch=2)                   # patches: its own passes
        assert c.images == 5 + 5 * 64 + 5 + 5 + 5 + 5 * 16
        faithfulness_estimate(tiny_cnn, x, target, a1, steps=8)                   # groups: its own passes
        assert c.images == 5 + 5 * 64 + 5 + 5 + 5 + 5 * 16 + 5 + 5 * 8


def _images(model, x, target, **options):
    with Counted(model) as c:
        pixel_sweep(model, x, target, **options)
    return c.images


def test_changed_input_model_or_weights_miss_the_memo(tiny_cnn, batch):
    x, target = batch
    full = 5 * 64
    with sweeps_shared() as memo:
        assert _images(tiny_cnn, x, target) == full
        assert _images(tiny_cnn, x.clone(), target) == 0                          # same content, another tensor
        y = x.clone()
        y[2, 1, 3, 4] += 1e-3                                                     # one pixel of one channel
        assert _images(tiny_cnn, y, target) == full
        assert _images(tiny_cnn, x, target.flip(0)) == full                       # other targets
        assert _images(tiny_cnn, x, target, output="softmax") == full
        assert _images(tiny_cnn, x, target, baseline=0.5) == full
        assert _images(tiny_cnn, x, target, baseline="uniform", seed=1) == full
        assert _images(tiny_cnn, x, target, baseline="uniform", seed=2) == full   # another field
        assert _images(tiny_cnn, x, target, chunk_size=9) == full                 # other pass sizes may round
        twin = copy.deepcopy(tiny_cnn)                                            # same weights, another object
        with Counted(twin) as c:
            torch.testing.assert_close(pixel_sweep(twin, x, target), pixel_sweep(tiny_cnn, x, target))
        assert c.images == full
        before = pixel_sweep(tiny_cnn, x, target)
        with torch.no_grad():
            tiny_cnn.conv1.weight.data.mul_(1.5)                                  # in place, behind autograd
        with Counted(tiny_cnn) as c:
            after = pixel_sweep(tiny_cnn, x, target)
        assert c.images == full and not torch.equal(before, after)
        tiny_cnn.train()
        assert _images(tiny_cnn, x, target) == full                               # training mode: never kept
        assert _images(tiny_cnn, x, target) == full
        assert memo.hits == 3                                                     # x.clone(), assert_close, before


def test_outside_the_scope_nothing_is_kept(tiny_cnn, batch):
    x, target = batch
    assert _images(tiny_cnn, x, target) == 5 * 64
    assert _images(tiny_cnn, x, target) == 5 * 64
    with sweeps_shared():
        assert _images(tiny_cnn, x, target) == 5 * 64
        assert _images(tiny_cnn, x, target) == 0
    assert _images(tiny_cnn, x, target) == 5 * 64                                 # the block's memo is gone


def test_memory_is_bounded_least_recently_used_first(tiny_cnn, batch):
    x, target = batch
    one = 5 * 64 * 4                                                              # bytes of one float32 sweep
    with sweeps_shared(max_bytes=2 * one) as memo:
        for shift in (0.0, 1.0, 2.0):
            _images(tiny_cnn, x + shift, target)
        assert memo.nbytes == 2 * one and len(memo.entries) == 2
        assert _images(tiny_cnn, x + 2.0, target) == 0
        assert _images(tiny_cnn, x + 1.0, target) == 0
        assert _images(tiny_cnn, x, target) == 5 * 64                             # the oldest was dropped
    with sweeps_shared(max_bytes=0) as memo:
        _images(tiny_cnn, x, target)
        assert _images(tiny_cnn, x, target) == 5 * 64 and memo.nbytes == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1G"])
def test_bad_budget_is_a_clear_value_error(bad):
    with pytest.raises(ValueError, match="max_bytes must be a non-negative integer"):
        with sweeps_shared(max_bytes=bad):
            pass


@pytest.mark.slow
def test_the_runner_computes_each_batchs_sweep_once(tmp_path, caplog, one_thread):
    from bench.run import run

    overrides = ["model=small_cnn", "model.net.width=4", "model.train.epochs=1", "model.train.n_train=96",
                 "model.train.n_test=32", "dataset.n_samples=6", "dataset.size=16", "batch_size=4",
                 "method=[saliency,random,edge]", "metric=[faithfulness_estimate,non_sensitivity]",
                 f"cache_dir={tmp_path / 'cache'}"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with caplog.at_level(logging.INFO, logger="bench.run"):
        manifest = run(cfg, out_dir=tmp_path / "out")
    assert manifest["status"] == "complete" and len(manifest["cells"]) == 6
    # the two-sample probe and 2 batches: one sweep each, reused by the 3 methods x 2 metrics' other 5 calls
    assert "sweeps computed 3 times, reused 15 times" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sweep_agrees_with_cpu_and_is_shared(tiny_cnn, batch):
    x, target = batch
    model = copy.deepcopy(tiny_cnn).cuda()
    with sweeps_shared() as memo:
        on_gpu = pixel_sweep(model, x.cuda(), target.cuda(), baseline="uniform", seed=3)
        assert torch.equal(pixel_sweep(model, x.cuda(), target.cuda(), baseline="uniform", seed=3), on_gpu)
    assert on_gpu.device.type == "cuda" and memo.hits == 1
    torch.testing.assert_close(on_gpu.cpu(), pixel_sweep(tiny_cnn, x, target, baseline="uniform", seed=3),
                               rtol=1e-4, atol=1e-5)
