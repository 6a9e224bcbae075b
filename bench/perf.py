"""A benchmark of the benchmark: `python -m bench.perf [--device cuda] [--sizes 32 64 224] ...`.

Workloads, each on the same model, inputs, maps and number of forward passes as its Quantus
counterpart (Quantus 0.6, the `test` extra; skipped with a message where absent):
  pixel_flipping  MoRF curve, 16 steps (ours also MoRF + LeRF); beside the model's own best
                  batched inference throughput, the physical limit of a metric made of forward passes
  mprt            cascading top-down over every module Quantus would re-draw, Spearman, saliency maps
  random_logit    SSIM between the target's and a random other class's saliency map
  localization    every localization metric on the same maps and masks
  grid            the default experiment's 7 methods x 4 metrics, batch by batch as `bench.run` runs them,
                  on the default model's 64 px and --grid-n samples (no scaling: it takes minutes)
  methods         every method of conf/method/ with its YAML defaults: seconds per 64 images
  metrics         each metric of bench.perf_metrics.PAIRS (issue 20's) beside its Quantus pair on the same
                  work, one row pair per metric (--metrics picks some; the workload column names the metric)
  tuned           pass sizes tuned to the model (issue 22): bench.perf_tuning's table, OUT/tuned.csv
  floor           the default `python -m bench` (cached models) against its model-pass floor: bench.perf_floor
Models: the zoo's small_cnn at 32 and 64 px and torchvision's resnet18 at 224 px, randomly
initialised (timing does not need trained weights). Every figure is the best of `--repeat` runs
after a warm-up. Peak memory is measured in a fresh process per (workload, size, n): the rise of
the process's peak RSS (CPU) or of torch's peak allocation (CUDA) over what the inputs took.
Writes `OUT/perf.csv` (tidy: one row per workload, size, n, implementation) and `OUT/scaling.png`.
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import resource
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from bench.checks import PRECISIONS, autocast
from bench.perf_metrics import PAIRS, metric_workload
import methods
from metrics import localization, mprt, pixel_flipping, random_logit, to_map

WORKLOADS = ("pixel_flipping", "mprt", "random_logit", "localization", "grid", "methods", "metrics", "tuned", "floor")
OWN = ("methods", "metrics", "tuned", "floor")                  # workloads with their own tables, not perf.csv rows
STEPS = 16                                                     # pixel-flipping steps
QUANTUS_LOCALIZATION = {                                        # ours -> Quantus class name
    "pointing_game": "PointingGame", "relevance_mass_accuracy": "RelevanceMassAccuracy",
    "relevance_rank_accuracy": "RelevanceRankAccuracy", "localization_auc": "AUC",
    "top_k_intersection": "TopKIntersection", "attribution_localisation": "AttributionLocalisation",
}


def _quantus():
    try:
        import quantus
    except ImportError:
        return None
    return quantus


def make_model(size: int, device: torch.device, channels_last: bool = False) -> nn.Module:
    """small_cnn (6 classes) below 224 px, torchvision's resnet18 (1000 classes) at 224; seeded random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if size >= 224:
            import torchvision
            model = torchvision.models.resnet18(weights=None)
        else:
            from bench.zoo import SmallCNN
            model = SmallCNN(num_classes=6)
    model = model.eval().to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def make_inputs(model: nn.Module, size: int, n: int, device: torch.device, *, saliency: bool = True) -> dict[str, Tensor]:
    """Seeded inputs, targets, maps (B, H, W: saliency, or uniform noise) and disk masks (B, H, W) of n samples."""
    g = torch.Generator().manual_seed(n * 1000 + size)
    x = torch.randn(n, 3, size, size, generator=g).to(device)
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    target = torch.randint(0, classes, (n,), generator=g).to(device)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * size
    radius = size * (0.1 + 0.15 * torch.rand(n, generator=g))
    mask = ((yy - centre[:, :1, None]) ** 2 + (xx - centre[:, 1:, None]) ** 2 < radius[:, None, None] ** 2)
    if saliency:
        maps = torch.cat([to_map(methods.saliency(model, xb, tb), "abs_sum")
                          for xb, tb in zip(x.split(64), target.split(64))])
    else:                                                       # timing a map-only metric: any map will do
        maps = torch.rand(n, size, size, generator=g).to(device)
    return {"x": x, "target": target, "map": maps, "mask": mask.to(device)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Seconds of the fastest of `repeat` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def model_throughput(model: nn.Module, size: int, device: torch.device, repeat: int,
                     precision: str = "float32") -> tuple[float, int]:
    """The model's best batched inference throughput (images/s) over batch sizes 32..512, and that batch size."""
    best = (0.0, 0)
    for batch in (32, 64, 128, 256, 512):
        x = torch.randn(batch, 3, size, size, device=device)

        def forward() -> None:
            with torch.inference_mode(), autocast(device, precision):
                model(x)
        best = max(best, (batch / best_time(forward, device, repeat), batch))
    return best


def _quantus_call(metric, model, d: dict[str, Tensor], **extra) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(metric(model=model, x_batch=d["x"].cpu().numpy(), y_batch=d["target"].cpu().numpy(),
                                 a_batch=d["map"][:, None].cpu().numpy(), channel_first=True,
                                 device=str(d["x"].device), **extra))


def _explainer(method: Callable[..., Tensor], reduce: str = "abs_sum") -> Callable[..., np.ndarray]:
    """Quantus' explain_func for one of our methods: its maps, reduced, as (B, 1, H, W) numpy arrays."""
    def explain(model, inputs, targets, **_):
        device = next(model.parameters()).device
        x, t = torch.as_tensor(inputs, device=device), torch.as_tensor(targets, device=device)
        return to_map(method(model, x, t), reduce)[:, None].cpu().numpy()
    return explain


def workload(name: str, model: nn.Module, d: dict[str, Tensor], impl: str) -> tuple[Callable[[], Any], int]:
    """A callable running the workload once for `impl` (ours | quantus), and its forward passes per
    sample where the workload is nothing but forward passes (pixel flipping), else 0."""
    if name in PAIRS:                                          # one metric beside its Quantus pair
        return metric_workload(name, model, d, impl), 0
    if name not in WORKLOADS or name in OWN[1:]:
        raise ValueError(f"unknown workload {name!r}; choose among {list(WORKLOADS)} or a metric of {sorted(PAIRS)}")
    quantus = _quantus() if impl == "quantus" else None
    size = d["x"].shape[-1]
    layers = [n for n, m in model.named_modules() if hasattr(m, "reset_parameters")]
    if name == "pixel_flipping":
        if impl == "ours":
            return (lambda: pixel_flipping(model, d["x"], d["target"], d["map"], steps=STEPS, order="both",
                                           baseline="image_min")), 1 + 2 * STEPS
        metric = quantus.PixelFlipping(features_in_step=size * size // STEPS, perturb_baseline="black",
                                       normalise=False, disable_warnings=True)
        return (lambda: _quantus_call(metric, model, d, softmax=False)), STEPS
    if name == "mprt":
        if impl == "ours":
            return (lambda: mprt(model, d["x"], d["target"], methods.saliency, layers=layers,
                                 layer_seed="shared", measures=["spearman"])), 0
        metric = quantus.MPRT(layer_order="top_down", abs=True, normalise=True, disable_warnings=True)
        return (lambda: _quantus_call(metric, model, d, explain_func=_explainer(methods.saliency), batch_size=64)), 0
    if name == "random_logit":
        if impl == "ours":
            return (lambda: random_logit(model, d["x"], d["target"], methods.saliency,
                                         measures=["ssim"])), 0
        with torch.no_grad():
            classes = model(d["x"][:1]).shape[1]
        metric = quantus.RandomLogit(num_classes=classes, abs=True, normalise=True, disable_warnings=True)
        return (lambda: _quantus_call(metric, model, d, explain_func=_explainer(methods.saliency))), 0
    if name == "localization":
        if impl == "ours":
            fns = [getattr(localization, n) for n in localization.__all__]
            return (lambda: [fn(d["map"], d["mask"]) for fn in fns]), 0
        metrics = [getattr(quantus, cls)(normalise=False, disable_warnings=True) for cls in QUANTUS_LOCALIZATION.values()]
        s = d["mask"][:, None].float().cpu().numpy()
        return (lambda: [_quantus_call(m, None, d, s_batch=s) for m in metrics]), 0
    return _grid(model, d, impl), 0


def _grid(model: nn.Module, d: dict[str, Tensor], impl: str) -> Callable[[], Any]:
    """The default experiment's methods x metrics on these inputs, batch by batch as `bench.run` does:
    each method's maps once per batch, then every metric. Ours goes through the runner's own
    `_call_metric`; Quantus gets the same maps (and the method as explain_func for MPRT). MPRT
    re-draws every module Quantus would, so both make the same number of stages; Quantus computes
    one similarity (Spearman) where ours computes the YAML's five."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from bench.config import CONF, derive_seeds
    from bench.provenance import without_meta

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = derive_seeds(compose("config"))                              # seeds as a run derives them
    layers = [n for n, m in model.named_modules() if hasattr(m, "reset_parameters")]
    methods_ = {k: instantiate(v) for k, v in cfg.method.items()}
    metrics_ = {k: instantiate(without_meta(v)) for k, v in cfg.metric.items()}   # less the report's _sanity_
    if "mprt" in metrics_:
        metrics_["mprt"] = functools.partial(metrics_["mprt"], layers=layers)
    batches = list(zip(*(d[k].split(cfg.batch_size) for k in ("x", "target", "mask"))))
    if impl == "ours":
        from bench.calls import call_metric as _call_metric, metric_inputs as _inputs

        def run() -> None:
            for method in methods_.values():
                for xb, tb, mb in batches:
                    a = method(model, xb, tb)                       # raw; each metric gets the form it consumes
                    for metric in metrics_.values():
                        _call_metric(metric, _inputs(metric, model, {"x": xb, "target": tb, "mask": mb}, a, method,
                                                     cfg.reduce, {}))
        return run
    quantus, size = _quantus(), d["x"].shape[-1]
    pf = cfg.metric.get("pixel_flipping", {})
    known = {
        "pixel_flipping": quantus.PixelFlipping(features_in_step=size * size // pf.get("steps", STEPS),
                                                perturb_baseline=pf.get("baseline", 0.0), normalise=False,
                                                disable_warnings=True),
        "mprt": quantus.MPRT(layer_order="top_down", abs=True, normalise=True, disable_warnings=True),
        "pointing_game": quantus.PointingGame(normalise=False, disable_warnings=True),
        "relevance_mass_accuracy": quantus.RelevanceMassAccuracy(normalise=False, disable_warnings=True),
    }
    missing = sorted(set(metrics_) - set(known))
    if missing:
        raise ValueError(f"no Quantus counterpart in the grid workload for {missing}")

    def run() -> None:
        for method in methods_.values():
            explain = _explainer(method, cfg.reduce)
            for xb, tb, mb in batches:
                q = {"x": xb, "target": tb, "map": to_map(method(model, xb, tb), cfg.reduce)}
                s = mb[:, None].float().cpu().numpy()
                extra = {"pixel_flipping": {"softmax": False}, "mprt": {"explain_func": explain, "batch_size": len(xb)},
                         "pointing_game": {"s_batch": s}, "relevance_mass_accuracy": {"s_batch": s}}
                for name in metrics_:
                    _quantus_call(known[name], model, q, **extra[name])
    return run


def method_costs(size: int, n: int, device: str, repeat: int, threads: int) -> pd.DataFrame:
    """Seconds per 64 images of every method in conf/method/ (YAML defaults) on the model of `size`."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    torch.set_num_threads(threads)
    dev = torch.device(device)
    model = make_model(size, dev)
    d = make_inputs(model, size, n, dev)
    from bench.config import CONF as conf
    from bench.config import derive_seeds
    rows = []
    for name in sorted(p.stem for p in (conf / "method").glob("*.yaml")):
        with initialize_config_dir(str(conf), version_base="1.3"):
            method = instantiate(derive_seeds(compose("config", overrides=[f"method=[{name}]"])).method[name])
        try:
            seconds = best_time(lambda: method(model, d["x"], d["target"]), dev, repeat)
        except ValueError as e:                                     # cannot run on this model: say why
            rows.append({"workload": "methods", "method": name, "size": size, "n": n, "error": str(e)})
            continue
        rows.append({"workload": "methods", "method": name, "size": size, "n": n, "device": device,
                     "seconds": seconds, "seconds_per_64": 64 * seconds / n, "samples_per_s": n / seconds})
        print(f"method {name:24s} {size:4d} px: {64 * seconds / n:8.3f} s per 64 images", flush=True)
    return pd.DataFrame(rows)


def measure(name: str, impl: str, size: int, n: int, device: str, repeat: int, threads: int,
            channels_last: bool = False, precision: str = "float32") -> dict[str, Any]:
    """One row: wall time, samples/s, forward passes/s and peak memory of one workload (run in a fresh process)."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    model = make_model(size, dev, channels_last)
    d = make_inputs(model, size, n, dev, saliency=name != "localization" and name not in PAIRS)
    run, passes = workload(name, model, d, impl)

    def fn() -> Any:
        with autocast(dev, precision):
            return run()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = best_time(fn, dev, repeat)
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - before
    return {"workload": name, "impl": impl, "size": size, "n": n, "device": device, "channels_last": channels_last,
            "precision": precision, "seconds": seconds,
            "samples_per_s": n / seconds, "forward_per_s": n * passes / seconds if passes else np.nan,
            "peak_mb": max(peak, 0) / 2 ** 20}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n")[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 224])
    p.add_argument("--n", type=int, default=64, help="samples at scale 1x")
    p.add_argument("--scales", nargs="+", type=int, default=[1, 4, 16], help="multiples of n (time and memory growth)")
    p.add_argument("--metrics", nargs="+", default=sorted(PAIRS), choices=sorted(PAIRS), metavar="METRIC",
                   help="metrics of the metrics workload (default: every one with a Quantus pair)")
    p.add_argument("--localization-n", type=int, default=1000, help="maps for the localization workload at 1x")
    p.add_argument("--grid-n", type=int, default=128, help="samples of the grid workload (run at 64 px only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--channels-last", action="store_true", help="models in channels-last memory format")
    p.add_argument("--precision", default="float32", choices=list(PRECISIONS), help="autocast dtype of model passes")
    p.add_argument("--no-quantus", action="store_true", help="time ours only")
    p.add_argument("--quantus-max-n", type=int, default=256, help="largest n given to Quantus (it is slow)")
    p.add_argument("--out", type=Path, default=Path("results/perf"))
    a = p.parse_args(argv)
    quantus = None if a.no_quantus else _quantus()
    if not a.no_quantus and quantus is None:
        print("quantus is not installed (pip install 'saliency-bench[test]'): timing ours only")
    jobs = []
    names = [w for w in a.workloads if w not in OWN]
    names += a.metrics if "metrics" in a.workloads else []
    for name in names:
        if name == "grid":                                       # the default model's size, once: it takes minutes
            size = 64 if 64 in a.sizes else a.sizes[0]
            jobs += [("grid", impl, size, a.grid_n) for impl in ("ours", "quantus") if impl == "ours" or quantus]
            continue
        for size in a.sizes:
            base = a.localization_n if name == "localization" else a.n
            for scale in a.scales:
                jobs.append((name, "ours", size, base * scale))
            if quantus is not None:
                jobs.append((name, "quantus", size, min(base, a.quantus_max_n)))
    rows = []
    ctx = mp.get_context("spawn")
    for name, impl, size, n in jobs:
        with ctx.Pool(1) as pool:                                # a fresh process: its own peak memory
            row = pool.apply(measure, (name, impl, size, n, a.device, a.repeat, a.threads, a.channels_last,
                                       a.precision))
        print(f"{name:15s} {impl:8s} {size:4d} px n={n:6d}: {row['seconds']:8.3f} s  "
              f"{row['samples_per_s']:9.1f} samples/s  peak +{row['peak_mb']:.0f} MB", flush=True)
        rows.append(row)
    if "pixel_flipping" in a.workloads:
        for size in a.sizes:
            torch.set_num_threads(a.threads)
            dev = torch.device(a.device)
            tput, batch = model_throughput(make_model(size, dev, a.channels_last), size, dev, a.repeat, a.precision)
            rows.append({"workload": "model_inference", "impl": "model", "size": size, "n": batch, "device": a.device,
                         "channels_last": a.channels_last, "precision": a.precision, "seconds": batch / tput,
                         "samples_per_s": tput, "forward_per_s": tput})
    if "methods" in a.workloads:
        rows += method_costs(64 if 64 in a.sizes else a.sizes[0], a.n, a.device, a.repeat, a.threads).to_dict("records")
    df = pd.DataFrame(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    if "tuned" in a.workloads:                                   # each model's workloads against its best
        from bench.perf_tuning import MODELS, table
        table(list(MODELS), n=a.n, n_224=2, repeat=a.repeat, device=a.device, threads=a.threads).to_csv(
            a.out / "tuned.csv", index=False)
    if "floor" in a.workloads:                                   # OUT/floor.csv, OUT/floor_passes.csv
        from bench.perf_floor import floor
        floor(a.out, repeat=a.repeat, threads=a.threads)
    df.to_csv(a.out / "perf.csv", index=False)
    timed = df[df.workload != "methods"] if len(df) else df
    if not timed.empty:
        print("\n" + summary(timed).to_string())
    _plot(df, a.out / "scaling.png")
    return df


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (workload, size): our seconds per sample, Quantus's, their ratio (per forward pass where the
    two make different numbers of them: ours runs MoRF and LeRF), and pixel flipping's share of the
    model's own throughput."""
    per = df.assign(s_per_sample=df.seconds / df.n,
                    s_per_unit=(1 / df.forward_per_s).where(df.forward_per_s > 0, df.seconds / df.n))
    ours = per[per.impl == "ours"].sort_values("n").groupby(["workload", "size"]).last()
    out = pd.DataFrame({"ours_s_per_sample": ours.s_per_sample, "ours_n": ours.n})
    out["quantus_s_per_sample"] = per[per.impl == "quantus"].groupby(["workload", "size"]).s_per_sample.min()
    out["speedup"] = (per[per.impl == "quantus"].groupby(["workload", "size"]).s_per_unit.min()
                      / ours.s_per_unit)
    limit = df[df.workload == "model_inference"].set_index("size").forward_per_s
    pf = per[(per.workload == "pixel_flipping") & (per.impl == "ours")].groupby("size").forward_per_s.max()
    out["of_model_limit"] = pd.Series({("pixel_flipping", s): pf[s] / limit[s] for s in pf.index if s in limit.index})
    return out


def _plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import seaborn as sns

    ours = df[(df.impl == "ours") & df.seconds.notna()] if "impl" in df else df.iloc[:0]
    if ours.empty:
        return
    grid = sns.relplot(data=ours, x="n", y="seconds", hue="workload", style="size", col="device", kind="line",
                       markers=True, height=3.5, aspect=1.3)
    grid.set(xscale="log", yscale="log")
    grid.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
