"""bench.perf's `floor` workload (issue 22): the default `python -m bench` against its model-pass floor.

The floor is the time the run's model passes alone would take at the model's best throughput. The run
is `python -m bench ARGS` itself, in a child process (`python -m bench.perf_floor --passes FILE ARGS`)
that counts every pass through the model by batch size: a forward hook on the model (deep copies, as
MPRT's randomized stages, keep it) and a tensor hook on its output, which marks the passes a backward
went through. Passes are labelled by the (method, metric) being computed or by the run's stage (model
check, probe, report maps, tuning probe). After the run, this process times each model (random weights:
the same architecture runs as fast) at batch sizes 1, 2, 4, ... for inference and for forward+backward,
on the wall clock and on CPU time, and prices every pass at the best per-image time of its kind:
floor = sum over passes of images x best seconds per image. The machine's speed drifts (the same
sustained 64-image pass of resnet read 0.76-1.49 ms per image within minutes), so a floor priced by a
sweep at another moment is off by as much; runs after the first also sample in-window: right after each
label, the child times SAMPLE_S of the model's own passes at the sweep's best sizes (an unhooked copy),
and the `window` columns price each label's passes at those samples (floor_window_wall_s; the samples'
seconds are taken off the run's, its labels' and its jobs'). The price is sustained: each size runs
back-to-back calls for STRETCH_S, and its cost per image is their total over their images, as the run's
passes follow one another; the `peak` columns price at the fastest single call instead, which on this
machine's noise is 1.2-1.3x below the sustained cost (back_to_back). Wall ratios are loaded-machine
figures; the CPU-time ratio (the run's CPU seconds over the floor's) is what other load inflates least.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from copy import deepcopy
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch
from torch import Tensor, nn

from bench.tuning import pass_step

_WHERE: ContextVar[tuple[str, str]] = ContextVar("floor_where", default=("(run)", "(other)"))
_PASSES: list[list[Any]] = []                    # [model, method, metric, batch, backward?] per model call
_SPANS: list[tuple[str, float, float, float]] = []   # (model, start, end, seconds of _sample in it) per job
_MODELS: dict[str, dict[str, Any]] = {}          # model name -> its net config, classes and input shape
_SPENT: dict[str, list[float]] = {}              # "model|method|metric" -> [wall, CPU seconds] under that label
_MODEL: ContextVar[str] = ContextVar("floor_model", default="")
_SAMPLE_AT: dict[str, dict[str, int]] = {}      # model -> kind -> batch: floor() hands it to child() (FLOOR_SAMPLE_AT)
_COPIES: dict[str, nn.Module] = {}              # model name -> an unhooked copy, for _sample
_INPUTS: dict[str, Tensor] = {}                  # model name -> _sample's inputs
_PRICES: dict[str, list[list[Any]]] = {}         # "model|method|metric" -> [kind, images, wall, CPU] per sample
_SAMPLING = [0.0, 0.0]                           # wall, CPU seconds spent sampling (taken off the run's)
SAMPLE_S = 0.05                                  # seconds of back-to-back passes per kind and sample


@contextmanager
def _sampling() -> Iterator[None]:
    """Count the block's wall and CPU seconds in _SAMPLING: time the run would not have spent."""
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        _SAMPLING[0] += time.perf_counter() - w0
        _SAMPLING[1] += time.process_time() - c0


def _sample(key: str, since: int) -> None:
    """Time the model's own passes at its best sizes (_SAMPLE_AT) right after the label `key` ran, of each
    kind it made (its _PASSES from `since` on): the price of that label's passes in the machine's state of
    the moment (floor(): in-window floor)."""
    name = key.split("|")[0]
    kinds = {"backward" if p[4] else "forward" for p in _PASSES[since:] if p[0] == name}
    if name not in _COPIES or name not in _MODELS or not kinds:
        return
    with _sampling():
        model = _COPIES[name]
        if name not in _INPUTS:
            _INPUTS[name] = torch.randn(max(_SAMPLE_AT[name].values()), *_MODELS[name]["shape"],
                                        generator=torch.Generator().manual_seed(2)).to(next(model.parameters()).device)
        x = _INPUTS[name]
        for kind in sorted(kinds):
            b = _SAMPLE_AT[name][kind]
            calls = back_to_back(pass_step(model, x[:b], backward=kind == "backward", device=x.device),
                                 seconds=SAMPLE_S, calls=2)
            _PRICES.setdefault(key, []).append([kind, b * len(calls), *(sum(c[i] for c in calls) for i in (0, 1))])


def _count(model: nn.Module, name: str, net: dict[str, Any]) -> None:
    """Record every call of `model` in _PASSES under the current _WHERE label (and keep an unhooked copy
    for _sample where the run samples in-window)."""
    if name in _SAMPLE_AT and name not in _COPIES:
        with _sampling():
            _COPIES[name] = deepcopy(model)                          # before the hook: _sample's own passes

    def hook(_m: nn.Module, args: tuple, output: Any) -> None:
        entry = [name, *_WHERE.get(), len(args[0]), False]
        _PASSES.append(entry)
        if name not in _MODELS and isinstance(output, Tensor):
            _MODELS[name] = {"net": net, "classes": output.shape[1], "shape": list(args[0].shape[1:])}
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(lambda g: entry.__setitem__(4, True) or g)
    model.register_forward_hook(hook)


@contextmanager
def _label(method: str, metric: str) -> Iterator[None]:
    token, w0, c0 = _WHERE.set((method, metric)), time.perf_counter(), time.process_time()
    s0, n0 = list(_SAMPLING), len(_PASSES)
    try:
        yield
    finally:
        _WHERE.reset(token)
        key = f"{_MODEL.get()}|{method}|{metric}"
        spent = _SPENT.setdefault(key, [0.0, 0.0])
        spent[0] += time.perf_counter() - w0 - (_SAMPLING[0] - s0[0])        # less samples of labels inside
        spent[1] += time.process_time() - c0 - (_SAMPLING[1] - s0[1])
        _sample(key, n0)


def _labelled(fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _label("(run)", stage):
            return fn(*args, **kwargs)
    return wrapped


def _instrument() -> None:
    """Hook the runner (bench.run) of this process: models counted as loaded, passes labelled, jobs timed."""
    import bench.keep
    import bench.run as runner
    from omegaconf import OmegaConf

    load, record, run = runner.load_model, runner.recording, runner.run

    def load_model(model_cfg: Any, *args: Any, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
        model, info = load(model_cfg, *args, **kwargs)
        _count(model, str(model_cfg.name), OmegaConf.to_container(model_cfg.net, resolve=True))
        return model, info

    @contextmanager
    def recording(retries: list, **where: Any) -> Iterator[None]:
        with _label(str(where.get("method")), str(where.get("metric") or "(attribution)")), record(retries, **where):
            yield

    def timed_run(cfg: Any, **kwargs: Any) -> dict[str, Any]:
        t0, token, s0 = time.time(), _MODEL.set(str(cfg.model.name)), _SAMPLING[0]
        try:
            return run(cfg, **kwargs)
        finally:
            _MODEL.reset(token)
            _SPANS.append((str(cfg.model.name), t0, time.time(), _SAMPLING[0] - s0))   # and its samples' seconds

    runner.load_model, runner.recording, runner.run = load_model, recording, timed_run
    for name, stage in (("check_model", "(model check)"), ("probe", "(probe)"), ("tune", "(tuning probe)")):
        setattr(runner, name, _labelled(getattr(runner, name), stage))
    bench.keep.keep_report_maps = _labelled(bench.keep.keep_report_maps, "(report maps)")


def child(argv: list[str]) -> None:
    """`python -m bench.perf_floor --passes FILE ARGS`: `python -m bench ARGS` with the counting hooks; the
    counts and job spans go to FILE as JSON, whatever the run's exit."""
    path, argv = Path(argv[2]), argv[3:]
    try:
        _SAMPLE_AT.update(json.loads(os.environ.get("FLOOR_SAMPLE_AT") or "{}"))
    except ValueError as e:
        raise SystemExit(f"FLOOR_SAMPLE_AT is not JSON ({e}); floor() sets it, unset it to run without samples")
    _instrument()
    from bench.__main__ import cli
    try:
        code = cli(argv)
    finally:
        counts = Counter(tuple(p) for p in _PASSES)
        path.write_text(json.dumps({"passes": [[*k, v] for k, v in counts.items()], "spans": _SPANS, "models": _MODELS,
                                    "spent": _SPENT, "end": time.time(), "prices": _PRICES, "sampling": _SAMPLING}))
    if code:
        raise SystemExit(code)


STRETCH_S = 0.25                                 # seconds of back-to-back calls per size (at least MIN_CALLS)
MIN_CALLS = 3


def back_to_back(step: Callable[[], Any], *, seconds: float = STRETCH_S, calls: int = MIN_CALLS
                 ) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each of at least `calls` back-to-back calls of step(), for `seconds` of wall time
    in all: their sum is the sustained cost, what a workload of only such calls takes; the fastest call is
    the peak, which the machine's noise lifts (small_cnn's 64-image backward, two threads, quiet: 40 calls
    spread 1.09-2.02 ms per image, median 1.42)."""
    out: list[tuple[float, float]] = []
    while len(out) < calls or sum(w for w, _ in out) < seconds:
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        out.append((time.perf_counter() - w0, time.process_time() - c0))
    return out


def best_per_image(model: nn.Module, shape: tuple[int, ...], *, limit: int, seconds: float = STRETCH_S
                   ) -> dict[str, dict[str, float]]:
    """Seconds per image at the model's best batch size (powers of two up to `limit`; half that with a
    backward), per kind ("forward", "backward"): sustained ("wall", "cpu": the total of back-to-back
    calls over their images, the best size by wall) and peak ("peak_wall", "peak_cpu": the fastest call)."""
    x = torch.randn(limit, *shape, generator=torch.Generator().manual_seed(1))
    best: dict[str, dict[str, float]] = {k: dict.fromkeys(("wall", "cpu", "peak_wall", "peak_cpu"), float("inf"))
                                         | {"batch": 0} for k in ("forward", "backward")}
    for kind, got in best.items():
        top = limit // 2 if kind == "backward" else limit
        for b in (2 ** i for i in range(top.bit_length()) if 2 ** i <= top):
            calls = back_to_back(pass_step(model, x[:b], backward=kind == "backward", device=x.device), seconds=seconds)
            wall, cpu = (sum(c[i] for c in calls) / (b * len(calls)) for i in (0, 1))
            if wall < got["wall"]:
                got.update(wall=wall, batch=b)
            got["cpu"] = min(got["cpu"], cpu)
            got["peak_wall"] = min(got["peak_wall"], min(w for w, _ in calls) / b)
            got["peak_cpu"] = min(got["peak_cpu"], min(c for _, c in calls) / b)
    return best


def _run_child(args: list[str], env: dict[str, str]) -> tuple[dict[str, Any], float, float, float]:
    """The counted run: its JSON, start time, wall seconds and CPU seconds (user + system, children)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "passes.json"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        done = subprocess.run([sys.executable, "-m", "bench.perf_floor", "--passes", str(path), *args], env=env,
                              capture_output=True, text=True)
        wall = time.time() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(f"the counted run `python -m bench {' '.join(args)}` failed (exit {done.returncode}):"
                               f"\n{done.stderr[-3000:]}")
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return json.loads(path.read_text()), t0, wall, cpu


def floor(out: Path, *, overrides: tuple[str, ...] = (), repeat: int = 2, cache_dir: str | None = None,
          limit: int = 256, threads: int | None = None) -> pd.DataFrame:
    """Run `python -m bench OVERRIDES` `repeat` times (fresh results folders, cached models), count its
    passes, price them (module docstring); write OUT/floor.csv (per model and in total: wall and CPU
    seconds of the run and of its scoring phase, floor, ratios), OUT/floor_passes.csv (every
    (model, method, metric, kind, batch) with its count and priced seconds, costliest first) and
    OUT/floor_labels.csv (_labels: where the run's time beyond the floor goes). The scoring phase is the
    seconds under the methods' and metrics' labels (less their samples). `threads`:
    torch's threads in the run (OMP_NUM_THREADS) and in the timing; one thread's CPU time is what a
    loaded machine inflates least (two threads spin while one waits for a core)."""
    from hydra.utils import instantiate

    env = {**os.environ, **({"SALIENCY_BENCH_CACHE": str(cache_dir)} if cache_dir else {}),
           **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if threads:
        torch.set_num_threads(threads)
    runs, prices = [], {}
    for r in range(repeat):                                         # interleaved: a run, then the models' sweep
        at = {name: {k: p[k]["batch"] for k in ("forward", "backward")} for name, p in prices.items()}
        with tempfile.TemporaryDirectory(prefix="floor-") as results:   # runs after the first sample in-window
            data, t0, wall, cpu = _run_child([f"results_dir={results}", *overrides],
                                             {**env, "FLOOR_SAMPLE_AT": json.dumps(at)})
            sampled_wall, sampled_cpu = data["sampling"]
            runs.append({"wall": wall - sampled_wall, "cpu": cpu - sampled_cpu, "sampling": sampled_wall,
                         "scoring": sum(w for k, (w, _) in data["spent"].items() if k.split("|")[1] != "(run)"),
                         "data": data, "t0": t0})
        print(f"floor: run {r + 1}/{repeat}: {wall:.1f} s wall, {cpu:.1f} s CPU, {sampled_wall:.1f} s of it "
              "in-window samples", flush=True)
        for name, spec in sorted(data["models"].items()):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = instantiate(spec["net"], num_classes=spec["classes"]).eval()
            got = best_per_image(model, tuple(spec["shape"]), limit=limit)
            old = prices.setdefault(name, got)
            for kind, new in got.items():
                if new["wall"] < old[kind]["wall"]:
                    old[kind].update(wall=new["wall"], batch=new["batch"])
                for clock in ("cpu", "peak_wall", "peak_cpu"):
                    old[kind][clock] = min(old[kind][clock], new[clock])
    best = min(runs, key=lambda r: r["wall"])
    passes = _passes(best["data"])
    for clock in ("wall", "cpu", "peak_wall", "peak_cpu"):
        per = passes.apply(lambda p: prices[p.model][p.kind][clock], axis=1)
        passes[f"floor_{clock}_s"] = passes.images * per
    passes = passes.sort_values("floor_wall_s", ascending=False)
    sampled = [r for r in runs if r["data"]["prices"]]
    window = min(sampled, key=lambda r: r["wall"]) if sampled else None
    in_window = _window_floor(window["data"]) if window else None
    labels = _labels(passes, best["data"]["spent"])
    scoring = passes[passes.method != "(run)"]
    spans = best["data"]["spans"]
    rows = []
    for name, group in passes.groupby("model"):
        job = sum(e - s - x for m, s, e, x in spans if m == name)
        rows.append({"model": name, "job_wall_s": round(job, 2), "floor_wall_s": group.floor_wall_s.sum(),
                     "floor_cpu_s": group.floor_cpu_s.sum(), "ratio_job": job / group.floor_wall_s.sum(),
                     **{f"best_{k}_batch": prices[name][k]["batch"] for k in ("forward", "backward")},
                     **{f"best_{k}_ms_per_image": 1e3 * prices[name][k]["wall"] for k in ("forward", "backward")}})
        if window:
            w_job = sum(e - s - x for m, s, e, x in window["data"]["spans"] if m == name)
            w_floor = in_window[in_window.model == name].floor_window_wall_s.sum()
            rows[-1].update(job_window_run_s=round(w_job, 2), floor_window_wall_s=w_floor,
                            ratio_job_window=w_job / w_floor)
    f_wall, f_cpu = passes.floor_wall_s.sum(), passes.floor_cpu_s.sum()
    first, last = min(s for _, s, _, _ in spans), max(e for _, _, e, _ in spans)
    outside = best["sampling"] - sum(x for *_, x in spans)          # samples after the jobs (the report's maps)
    rows.append({"model": "total", "threads": torch.get_num_threads(), "run_wall_s": best["wall"],
                 "run_walls_s": " ".join(f"{r['wall']:.1f}" for r in runs),
                 "run_cpu_s": best["cpu"], "startup_s": first - best["t0"],
                 "jobs_wall_s": sum(e - s - x for _, s, e, x in spans),
                 "report_s": best["data"]["end"] - last - outside, "scoring_s": best["scoring"], "floor_wall_s": f_wall,
                 "floor_cpu_s": f_cpu, "ratio_run": best["wall"] / f_wall,
                 "ratio_scoring": best["scoring"] / scoring.floor_wall_s.sum(),
                 "ratio_cpu": best["cpu"] / f_cpu, "floor_peak_wall_s": passes.floor_peak_wall_s.sum(),
                 "ratio_run_peak": best["wall"] / passes.floor_peak_wall_s.sum(),
                 "ratio_cpu_peak": best["cpu"] / passes.floor_peak_cpu_s.sum(),
                 **({"window_run_wall_s": window["wall"], "window_sampling_s": window["sampling"],
                     "floor_window_wall_s": in_window.floor_window_wall_s.sum(),
                     "ratio_window": window["wall"] / in_window.floor_window_wall_s.sum(),
                     "ratio_cpu_window": window["cpu"] / in_window.floor_window_cpu_s.sum(),
                     "window_unpriced_images": int(in_window.images[in_window.floor_window_wall_s.isna()].sum())}
                    if window else {}),
                 "forward_passes": int(passes[passes.kind == "forward"]["count"].sum()),
                 "backward_passes": int(passes[passes.kind == "backward"]["count"].sum())})
    if window:                                                      # the same, for the sampled run in-window
        renamed = {"floor_window_wall_s": "floor_wall_s", "floor_window_cpu_s": "floor_cpu_s"}
        w = _labels(in_window.rename(columns=renamed), window["data"]["spent"])
        labels = labels.merge(w, on=["model", "method", "metric"], how="outer", suffixes=("", "_window"))
        labels = labels.sort_values("excess_cpu_s_window", ascending=False)
    table = pd.DataFrame(rows).round(6)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "floor.csv", index=False)
    passes.round(4).to_csv(out / "floor_passes.csv", index=False)
    labels.round(4).to_csv(out / "floor_labels.csv", index=False)
    print("\n\n".join(t.to_string(index=False) for t in (table, passes.head(15).round(3), labels.head(20).round(3))),
          flush=True)
    return table


def _passes(data: dict[str, Any]) -> pd.DataFrame:
    """A counted run's passes: model, method, metric, batch, count, kind ("forward" / "backward"), images."""
    passes = pd.DataFrame(data["passes"], columns=["model", "method", "metric", "batch", "backward", "count"])
    passes["kind"] = passes.backward.map({True: "backward", False: "forward"})
    passes["images"] = passes.batch * passes["count"]
    return passes.drop(columns="backward")


def _window_floor(data: dict[str, Any]) -> pd.DataFrame:
    """A sampled run's passes priced in-window: each label's passes at the seconds per image of the samples
    taken right after it (_sample), a label without samples (passes outside any) at its model's mean, and
    NaN where the model has no sample of that kind."""
    samples = pd.DataFrame([(*k.split("|"), *p) for k, ps in data["prices"].items() for p in ps],
                           columns=["model", "method", "metric", "kind", "images", "wall", "cpu"])
    by_label = samples.groupby(["model", "method", "metric", "kind"])[["images", "wall", "cpu"]].sum()
    by_model = samples.groupby(["model", "kind"])[["images", "wall", "cpu"]].sum()
    passes = _passes(data)
    for clock in ("wall", "cpu"):
        def price(p: pd.Series) -> float:
            for table, key in ((by_label, (p.model, p.method, p.metric, p.kind)), (by_model, (p.model, p.kind))):
                if key in table.index:
                    return table.loc[key, clock] / table.loc[key, "images"]
            return float("nan")
        passes[f"floor_window_{clock}_s"] = passes.images * passes.apply(price, axis=1)
    return passes


def _labels(passes: pd.DataFrame, spent: dict[str, list[float]]) -> pd.DataFrame:
    """Per (model, method, metric) label: the wall and CPU seconds the run spent under it, its floor, the
    CPU seconds over the floor's and the excess (seconds beyond the floor), largest excess first."""
    floors = passes.groupby(["model", "method", "metric"])[["floor_wall_s", "floor_cpu_s"]].sum()
    used = pd.DataFrame([(*k.split("|"), *v) for k, v in spent.items()],
                        columns=["model", "method", "metric", "wall_s", "cpu_s"]).set_index(["model", "method", "metric"])
    out = used.join(floors, how="outer").fillna(0.0).reset_index()
    out["ratio_cpu"] = out.cpu_s / out.floor_cpu_s.where(out.floor_cpu_s > 0)
    out["excess_cpu_s"] = out.cpu_s - out.floor_cpu_s
    return out.sort_values("excess_cpu_s", ascending=False)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "--passes":
        raise SystemExit("usage: python -m bench.perf_floor --passes FILE [python -m bench's overrides]")
    child(sys.argv)
