"""Pass sizes tuned to the model (bench.tuning, metrics.batching.pass_sizes): every chunked pass takes them,
an explicit size wins, the probe picks the fastest size and stops at out-of-memory, and the cache keeps them."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import methods
from bench import tuning
from metrics import mprt, pixel_flipping
from metrics.batching import PassSizes, auto_chunk_size, pass_sizes

SIZES = PassSizes((3, 8, 8), "cpu", forward=7, backward=6)


def _passes(model: nn.Module, run) -> list[int]:
    """The batch size of every model call made by run() (deep copies, as MPRT's stages, keep the hook)."""
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.fixture
def data(batch):
    x, target = batch
    return x[:2], target[:2], x[:2].abs().sum(dim=1)                  # B = 2, (3, 8, 8), map (2, 8, 8)


# (workload, the tuned size it takes): forward-only passes take SIZES.forward (7), gradient passes
# SIZES.backward (6, i.e. 3 draws of the batch of 2)
WORKLOADS = {
    "pixel_flipping": (lambda m, x, t, a: pixel_flipping(m, x, t, a, steps=8, order="both"), 7),
    "rise": (lambda m, x, t, a: methods.rise(m, x, t, masks=20, cells=2), 7),
    "score_cam": (lambda m, x, t, a: methods.score_cam(m, x, t), 7),
    "integrated_gradients": (lambda m, x, t, a: methods.integrated_gradients(m, x, t, steps=8), 6),
    "smoothgrad": (lambda m, x, t, a: methods.smoothgrad(m, x, t, samples=9), 6),
    "expected_gradients": (lambda m, x, t, a: methods.expected_gradients(m, x, t, samples=9), 6),
    "mprt_stage_maps": (lambda m, x, t, a: mprt(m, x, t, lambda m_, x_, t_: methods.integrated_gradients(
        m_, x_, t_, steps=8), measures=["spearman"]), 6),
}


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_chunked_pass_takes_the_tuned_size(name, tiny_cnn, data):
    run, size = WORKLOADS[name]
    with pass_sizes(SIZES):
        seen = _passes(tiny_cnn, lambda: run(tiny_cnn, *data))
    chunked = [n for n in seen if n > len(data[0])]                   # less whole-batch passes (f(x), g0, CAM)
    assert chunked and set(chunked) <= {size, *range(len(data[0]) + 1, size)} and size in chunked, seen
    untuned = _passes(tiny_cnn, lambda: run(tiny_cnn, *data))        # outside the context: the byte budget
    assert max(untuned) > size


def test_ig_passes_below_the_batch_take_groups_of_samples(tiny_cnn, batch):
    # a tuned gradient pass of 3 images and a batch of 5: groups of 3 and 2 samples, one IG node per pass
    # (captum puts every sample of a call in each pass), and the same map as whole-batch passes
    x, target = batch
    with pass_sizes(PassSizes((3, 8, 8), "cpu", forward=7, backward=3)):
        seen = _passes(tiny_cnn, lambda: methods.integrated_gradients(tiny_cnn, x, target, steps=4))
        got = methods.integrated_gradients(tiny_cnn, x, target, steps=4)
    assert len(x) == 5 and sorted(seen) == [2] * 4 + [3] * 4
    expected = methods.integrated_gradients(tiny_cnn, x, target, steps=4, internal_batch_size=4 * len(x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_an_explicit_size_wins(tiny_cnn, data):
    x, target, a = data
    with pass_sizes(SIZES):
        assert max(_passes(tiny_cnn, lambda: pixel_flipping(tiny_cnn, x, target, a, steps=8, chunk_size=3))) == 3
        assert max(_passes(tiny_cnn, lambda: methods.smoothgrad(tiny_cnn, x, target, samples=9,
                                                                  chunk_size=4))) == 4
        assert max(_passes(tiny_cnn, lambda: methods.integrated_gradients(tiny_cnn, x, target, steps=8,
                                                                            internal_batch_size=2))) == 2


def test_sizes_apply_only_to_their_shape_and_device():
    with pass_sizes(SIZES):
        assert auto_chunk_size(torch.zeros(1, 3, 8, 8)) == 7
        assert auto_chunk_size(torch.zeros(1, 3, 8, 8), backward=True) == 6
        assert auto_chunk_size(torch.zeros(1, 3, 16, 16)) == (2 << 20) // (3 * 16 * 16 * 4)   # the byte budget
    assert auto_chunk_size(torch.zeros(1, 3, 8, 8)) == (2 << 20) // (3 * 8 * 8 * 4)
    with pytest.raises(ValueError, match="PassSizes.forward must be a positive integer"):
        PassSizes((3, 8, 8), "cpu", forward=0, backward=1)


class Costly(nn.Module):
    """Costs cost(b) seconds of the probe's clock per forward of b images: on one thread it spins for that
    much CPU time, on several it sleeps that long (the wall clock; no CPU burnt on a shared machine). With
    `fail_at`, batches of that size or more raise CUDA's out-of-memory message; with `contended`
    (size, factor, calls), the first calls at that size take `factor` times as long (a busy moment)."""

    def __init__(self, cost, fail_at: int | None = None, contended: tuple[int, float, int] | None = None):
        super().__init__()
        self.cost, self.fail_at, self.contended = cost, fail_at, contended
        self.w = nn.Parameter(torch.ones(2))
        self.calls: dict[int, int] = {}

    def forward(self, x):
        b = len(x)
        if self.fail_at is not None and b >= self.fail_at:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.calls[b] = self.calls.get(b, 0) + 1
        slow = self.contended is not None and b == self.contended[0] and self.calls[b] <= self.contended[2]
        seconds = self.cost(b) * (self.contended[1] if slow else 1.0)
        if torch.get_num_threads() > 1:
            time.sleep(seconds)
        else:
            t0 = time.thread_time()
            while time.thread_time() - t0 < seconds:
                pass
        return x.mean(dim=(1, 2, 3))[:, None] * self.w                  # (b, 2)


@pytest.fixture
def quiet(monkeypatch):
    """Two threads on a quiet machine: no thread of the process ever waits for a core."""
    monkeypatch.setattr(tuning, "_waited", lambda: 0.0)
    torch.set_num_threads(2)                                                  # conftest restores the count


def test_the_probe_picks_the_fastest_size_and_stops_when_it_falls(quiet):
    # seconds per call: 4 ms + 1 ms per image up to 8 images (8 images: 667/s, the best), 4 ms per image beyond
    model = Costly(lambda b: 0.004 + 0.001 * b if b <= 8 else 0.004 * b)
    record = tuning.probe(model, (1, 2, 2), "cpu", budget=20)
    assert record["forward"] == record["backward"] == 8
    assert list(record["throughput"]["forward"]) == ["1", "2", "4", "8", "16", "32"]   # two sizes past the best
    assert record["rounds"]["forward"] == tuning.MAX_ROUNDS                   # the budget allows every round
    assert record["threads"] == 2 and record["timed_threads"] == {"forward": 2, "backward": 2}


@pytest.mark.parametrize("threads", [1, 2])
def test_the_probe_times_the_runs_own_thread_count(threads, quiet):
    # a model whose best size depends on its threads (as small_cnn's: one thread 16-32, two 64-128 images):
    # one thread: 2 ms + 1 ms per image to 8, then 3 ms per image (8: 800/s); two: 2 ms + 0.25 ms per image
    # to 32, then 1 ms per image (32: 3200/s; 16: 2667/s, not within 10 %)
    def cost(b):
        if torch.get_num_threads() == 1:
            return 0.002 + 0.001 * b if b <= 8 else 0.003 * b
        return 0.002 + 0.00025 * b if b <= 32 else 0.001 * b
    torch.set_num_threads(threads)
    record = tuning.probe(Costly(cost), (1, 2, 2), "cpu", budget=20)
    assert record["forward"] == record["backward"] == {1: 8, 2: 32}[threads]
    assert record["threads"] == threads == torch.get_num_threads() and not record["contended"]


def test_two_threads_waiting_for_cores_are_timed_on_one(monkeypatch, tmp_path):
    # every call's threads wait for a core as long as it runs (a loaded machine): two threads would time the
    # scheduler, so the probe times one thread (whose best is 8 images here, two threads' 32), marks the
    # record contended, and tune() keeps it for the process only
    cost = {1: lambda b: 0.002 + 0.001 * b if b <= 8 else 0.003 * b, 2: lambda b: 0.002 + 0.00025 * b}
    monkeypatch.setattr(tuning, "_waited", time.perf_counter)
    monkeypatch.setattr(tuning, "_MEMO", {})
    torch.set_num_threads(2)
    model = Costly(lambda b: cost[torch.get_num_threads()](b))
    sizes, record = tuning.tune(model, (1, 2, 2), "cpu", cache_dir=tmp_path, budget=2)
    assert (sizes.forward, sizes.backward) == (8, 8) and torch.get_num_threads() == 2
    assert record["contended"] and record["threads"] == 2 and record["timed_threads"] == {"forward": 1, "backward": 1}
    assert not (tmp_path / tuning.CACHE_FILE).exists()                        # a quieter run probes again
    assert tuning.tune(model, (1, 2, 2), "cpu", cache_dir=tmp_path)[1]["source"] == "memory"


def test_contention_on_the_first_timings_does_not_decide(quiet):
    # 16 images are best (800/s; 8: 667/s), but a busy moment doubles its first three calls (400/s), all of
    # the sweep's timing of 16: the sweep alone would pick 8; the interleaved rounds time 16 again, and its
    # fastest call stands
    model = Costly(lambda b: 0.004 + 0.001 * b if b <= 16 else 0.004 * b, contended=(16, 2.0, 3))
    record = tuning.probe(model, (1, 2, 2), "cpu", budget=20)
    assert record["forward"] == record["backward"] == 16
    assert record["throughput"]["forward"]["16"] > 1.1 * record["throughput"]["forward"]["8"]


def test_a_one_size_outlier_does_not_decide(quiet):
    # 500 images/s at every size but 8, which reads 1000/s (a reading the clock got wrong): the raw best
    # would pick 8; the median over neighbours sees a flat curve and picks the largest timed size
    model = Costly(lambda b: 0.001 * b if b == 8 else 0.002 * b)
    record = tuning.probe(model, (1, 2, 2), "cpu", budget=20)
    assert record["throughput"]["forward"]["8"] > 1.5 * record["throughput"]["forward"]["16"]
    assert record["forward"] == record["backward"] == max(map(int, record["throughput"]["forward"])) == 32


def test_out_of_memory_ends_the_sweep_other_errors_are_raised(quiet):
    record = tuning.probe(Costly(lambda b: 0.004, fail_at=16), (1, 2, 2), "cpu", budget=20)
    assert record["forward"] == record["backward"] == 8                      # rate grows with b until OOM
    with pytest.raises(RuntimeError, match="out of memory"):                 # not even one size fits
        tuning.probe(Costly(lambda b: 0.004, fail_at=1), (1, 2, 2), "cpu", budget=20)


def test_tune_probes_once_then_reads_the_cache(tiny_cnn, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "_MEMO", {})
    monkeypatch.setattr(tuning, "_waited", lambda: 0.0)                     # never contended: always cached
    sizes, record = tuning.tune(tiny_cnn, (3, 8, 8), "cpu", cache_dir=tmp_path)
    assert record["source"] == "probe" and (tmp_path / tuning.CACHE_FILE).exists()
    assert sizes == PassSizes((3, 8, 8), "cpu", record["forward"], record["backward"])
    monkeypatch.setattr(tuning, "_MEMO", {})                                  # a new process: the JSON file
    seen = _passes(tiny_cnn, lambda: tuning.tune(tiny_cnn, (3, 8, 8), "cpu", cache_dir=tmp_path))
    again, record2 = tuning.tune(tiny_cnn, (3, 8, 8), "cpu", cache_dir=tmp_path)
    assert seen == [] and again == sizes and record2["source"] == "memory"
    cached = tuning.key(tiny_cnn, (3, 8, 8), "cpu")
    torch.set_num_threads(1 if torch.get_num_threads() > 1 else 2)           # conftest restores the count
    assert tuning.key(tiny_cnn, (3, 8, 8), "cpu") != cached                   # the threads carried in the key
    monkeypatch.setattr(tuning, "_MEMO", {})
    assert tuning.tune(tiny_cnn, (3, 8, 8), "cpu", cache_dir=tmp_path)[1]["source"] == "probe"
    keys = {tuning.key(tiny_cnn, (3, 8, 8), "cpu"), tuning.key(tiny_cnn, (3, 16, 16), "cpu"),
            tuning.key(tiny_cnn, (3, 8, 8), "cpu", channels_last=True),
            tuning.key(tiny_cnn, (3, 8, 8), "cpu", precision="bfloat16"),
            tuning.key(nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten()), (3, 8, 8), "cpu")}
    assert len(keys) == 5
    weights_only = type(tiny_cnn)()                                           # same architecture, other weights
    assert tuning.key(weights_only, (3, 8, 8), "cpu") == tuning.key(tiny_cnn, (3, 8, 8), "cpu")


def test_the_probe_leaves_model_and_rng_alone(tiny_cnn):
    state = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    rng = torch.get_rng_state()
    tuning.probe(tiny_cnn, (3, 8, 8), "cpu", budget=0.2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, tiny_cnn.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in tiny_cnn.parameters())


def test_gradients_get_the_larger_share_of_the_budget():
    # the same cost both ways, rising slowly with the batch (1 ms per call, 2 ms per image), on one thread: its
    # CPU time, which load does not stretch, so where a sweep stops is exact: 32 images on 0.48 s (64 would
    # cost 0.56 s), 64 on 0.72 s (128: 1.07 s)
    torch.set_num_threads(1)                                                  # conftest restores the count
    record = tuning.probe(Costly(lambda b: 0.001 + 0.002 * b), (1, 2, 2), "cpu", budget=1.2)
    fwd, bwd = (max(map(int, record["throughput"][d])) for d in ("forward", "backward"))
    assert bwd == 2 * fwd and record["forward"] == fwd and record["backward"] == bwd


def test_a_sweep_still_gaining_goes_past_its_budget():
    # one thread (its CPU time: exact under load); 20 ms per call whatever the batch, so every doubling
    # doubles the throughput (a 224 px mobilenet gains 12-41 % per doubling): each size costs two calls, 40 ms; the
    # forward share of 0.215 s (86 ms) ends at 4 images (MIN_BUDGETED), four times it (344 ms) at 64 (7
    # sizes: 280 ms; 128 would end at 360)
    torch.set_num_threads(1)                                                  # conftest restores the count
    steep = tuning.probe(Costly(lambda b: 0.02), (1, 2, 2), "cpu", budget=0.215)
    assert max(map(int, steep["throughput"]["forward"])) == 64 == steep["forward"]
    # the same budget on a flat curve (20 ms per image: no size gains) stops at the budget
    flat = tuning.probe(Costly(lambda b: 0.02 * b), (1, 2, 2), "cpu", budget=0.215)
    assert max(map(int, flat["throughput"]["forward"])) == tuning.MIN_BUDGETED


def test_a_record_of_another_probe_version_is_probed_again(tiny_cnn, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "_MEMO", {})
    monkeypatch.setattr(tuning, "_waited", lambda: 0.0)
    k = tuning.key(tiny_cnn, (3, 8, 8), "cpu")
    (tmp_path / tuning.CACHE_FILE).write_text(f'{{"{k}": {{"forward": 42, "backward": 42, "seconds": 7.0}}}}')
    _, record = tuning.tune(tiny_cnn, (3, 8, 8), "cpu", cache_dir=tmp_path)
    assert record["source"] == "probe" and record["probe"] == tuning.PROBE
    monkeypatch.setattr(tuning, "_MEMO", {})
    assert tuning.tune(tiny_cnn, (3, 8, 8), "cpu", cache_dir=tmp_path)[1]["source"] == "cache"
