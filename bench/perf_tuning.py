"""bench.perf's `tuned` workload (issue 22): with the pass sizes bench.tuning picks, each workload's model
passes per second as a fraction of the model's best throughput measured in the same process.

Models (random weights; timing needs no training): the embedded zoo at 64 px as its YAML builds it, a
second small CNN of our own at 32 px (OtherCNN), torchvision's resnet18 and mobilenet_v3_small at 224.
Per model, interleaved `repeat` times: the best inference and forward+backward throughput over batch
sizes 1, 2, 4, ... (the limit; sustained over back-to-back calls, as the workloads' passes run, and
`ratio_peak` against the fastest single call, which the machine's noise lifts), pixel flipping (MoRF +
LeRF, 16 steps), RISE, IG and SmoothGrad with default settings but for the counts given (masks, samples),
under the tuned sizes. Images are counted with a forward pre-hook; each figure is the best of the
repeats, `spread` 1 - worst / best; `ratio_at_chosen` sets the workload against the model's own passes at
the chosen size (what is left once the size is right). The clock is the
probe's (bench.tuning.clock): on one CPU thread its CPU time, on several the wall clock, which another
process's load inflates (two OpenMP threads wait at every barrier for a core): measure two threads on a
quiet machine; the row's probe_threads says whether the probe found it contended.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import pandas as pd
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

import methods
from bench import tuning
from bench.config import CONF
from bench.perf_floor import back_to_back
from metrics import pixel_flipping
from metrics.batching import pass_sizes


class OtherCNN(nn.Module):
    """A second small CNN (not the zoo's), for 32 px inputs: three conv-ReLU layers, two max pools, a head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


def _zoo(name: str) -> nn.Module:
    from hydra.utils import instantiate
    return instantiate(OmegaConf.load(CONF / "model" / f"{name}.yaml").net, num_classes=6)


def _torchvision(arch: str) -> nn.Module:
    import torchvision
    return torchvision.models.get_model(arch, weights=None)


MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    **{name: (lambda name=name: _zoo(name), 64) for name in ("small_cnn", "resnet", "vgg", "vgg_silu", "vit")},
    "other_cnn": (OtherCNN, 32),
    "resnet18": (lambda: _torchvision("resnet18"), 224),
    "mobilenet_v3_small": (lambda: _torchvision("mobilenet_v3_small"), 224),
}


def _timed(model: nn.Module, run: Callable[[], Any], device: torch.device) -> float:
    """Images through `model` per second of the probe's clock while run() runs (a forward pre-hook counts)."""
    seen = [0]
    handle = model.register_forward_pre_hook(lambda _m, args: seen.__setitem__(0, seen[0] + len(args[0])))
    now = tuning.clock(device)
    try:
        tuning._sync(device)
        t0 = now()
        run()
        tuning._sync(device)
        return seen[0] / max(now() - t0, 1e-9)
    finally:
        handle.remove()


def _reference(model: nn.Module, shape: tuple[int, ...], device: torch.device, limit: int,
               backward: bool) -> dict[int, tuple[float, float]]:
    """(sustained, peak) images/s at every power-of-two batch size up to `limit`, on the probe's clock:
    sustained over back-to-back calls (bench.perf_floor.back_to_back), as a workload's passes follow one
    another; peak from the fastest call, which noise lifts."""
    x = torch.randn(limit, *shape, generator=torch.Generator().manual_seed(1)).to(device)
    cpu = tuning.clock(device) is time.thread_time                 # one CPU thread: its CPU time, else wall
    rates = {}
    for b in (2 ** i for i in range(limit.bit_length()) if 2 ** i <= limit):
        step = tuning.pass_step(model, x[:b], backward=backward, device=device)
        calls = [c[cpu] for c in back_to_back(lambda: (step(), tuning._sync(device)))]
        rates[b] = b * len(calls) / sum(calls), b / min(calls)
    return rates


def measure(name: str, *, n: int, repeat: int, device: str = "cpu", masks: int = 128, samples: int = 50,
            limit: int | None = None) -> list[dict[str, Any]]:
    """One row per workload of model `name`: best throughput, the reference's best batch, chosen batch, ratio."""
    build, size = MODELS[name]
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build().eval().to(dev)
    shape = (3, size, size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g).to(dev)
    with torch.no_grad():
        target = model(x[:1]).argmax(1).expand(n).contiguous()
    a = torch.rand(n, size, size, generator=g).to(dev)
    sizes, record = tuning.tune(model, shape, dev)
    limit = limit or (32 if size >= 224 else 256)
    work = {
        "pixel_flipping": (False, lambda: pixel_flipping(model, x, target, a, steps=16, order="both")),
        "rise": (False, lambda: methods.rise(model, x, target, masks=masks)),
        "integrated_gradients": (True, lambda: methods.integrated_gradients(model, x, target)),
        "smoothgrad": (True, lambda: methods.smoothgrad(model, x, target, samples=samples)),
    }
    seen: dict[str, list[float]] = {w: [] for w in work}
    ref: dict[bool, dict[int, float]] = {False: {}, True: {}}        # sustained images/s per size
    peak: dict[bool, float] = {False: 0.0, True: 0.0}                # the fastest call's, over every size
    for _ in range(repeat):                                          # interleaved: every figure once per round
        for backward in (False, True):
            for b, (r, p) in _reference(model, shape, dev, limit // (2 if backward else 1), backward).items():
                ref[backward][b] = max(ref[backward].get(b, 0.0), r)
                peak[backward] = max(peak[backward], p)
        with pass_sizes(sizes):
            for w, (_, run) in work.items():
                seen[w].append(_timed(model, run, dev))
    best = {w: max(v) for w, v in seen.items()}
    rows = []
    for w, (backward, _) in work.items():
        top = max(ref[backward], key=ref[backward].get)
        chosen = sizes.backward if backward else sizes.forward
        rows.append({"model": name, "size": size, "n": n, "workload": w, "pass": "backward" if backward else "forward",
                     "best_batch": top, "chosen_batch": chosen,
                     "images_per_s": round(best[w], 1), "best_images_per_s": round(ref[backward][top], 1),
                     "ratio": round(best[w] / ref[backward][top], 3),
                     "ratio_at_chosen": round(best[w] / ref[backward][chosen], 3) if chosen in ref[backward] else None,
                     "peak_images_per_s": round(peak[backward], 1), "ratio_peak": round(best[w] / peak[backward], 3),
                     "probe_s": record["seconds"],
                     "threads": record["threads"],
                     "probe_threads": record["timed_threads"]["backward" if backward else "forward"],
                     "spread": round(1 - min(seen[w]) / best[w], 3)})
    return rows


def table(models: list[str], *, n: int, n_224: int, repeat: int, device: str = "cpu",
          threads: int | None = None) -> pd.DataFrame:
    """measure() for every model: 224 px models with n_224 samples, fewer masks and SmoothGrad samples."""
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for name in models:
        big = MODELS[name][1] >= 224
        rows += measure(name, n=n_224 if big else n, repeat=repeat, device=device, masks=32 if big else 64,
                        samples=16 if big else 50)
        print(pd.DataFrame(rows[-4:]).to_string(index=False), flush=True)
    return pd.DataFrame(rows)
