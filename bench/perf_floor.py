"""bench.perf's `floor` workload (issue 22): the default `python -m bench` against its model-pass floor.

The floor is the time the run's model passes alone would take at the model's best throughput. The run
is `python -m bench ARGS` itself, in a child process (`python -m bench.perf_floor --passes FILE ARGS`)
that counts every pass through the model by batch size: a forward hook on the model (deep copies, as
MPRT's randomized stages, keep it) and a tensor hook on its output, which marks the passes a backward
went through. Passes are labelled by the (method, metric) being computed or by the run's stage (model
check, probe, report maps, tuning probe). After the run, this process times each model (random weights:
the same architecture runs as fast) at batch sizes 1, 2, 4, ... for inference and for forward+backward,
on the wall clock and on CPU time, and prices every pass at the best per-image time of its kind:
floor = sum over passes of images x best seconds per image. The price is sustained: each size runs
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
_SPANS: list[tuple[str, float, float]] = []      # (model, start, end) of each job, time.time()
_MODELS: dict[str, dict[str, Any]] = {}          # model name -> its net config, classes and input shape
_SPENT: dict[str, list[float]] = {}              # "model|method|metric" -> [wall, CPU seconds] under that label
_MODEL: ContextVar[str] = ContextVar("floor_model", default="")


def _count(model: nn.Module, name: str, net: dict[str, Any]) -> None:
    """Record every call of `model` in _PASSES under the current _WHERE label."""
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
    try:
        yield
    finally:
        _WHERE.reset(token)
        spent = _SPENT.setdefault(f"{_MODEL.get()}|{method}|{metric}", [0.0, 0.0])
        spent[0] += time.perf_counter() - w0
        spent[1] += time.process_time() - c0


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
        t0, token = time.time(), _MODEL.set(str(cfg.model.name))
        try:
            return run(cfg, **kwargs)
        finally:
            _MODEL.reset(token)
            _SPANS.append((str(cfg.model.name), t0, time.time()))

    runner.load_model, runner.recording, runner.run = load_model, recording, timed_run
    for name, stage in (("check_model", "(model check)"), ("probe", "(probe)"), ("tune", "(tuning probe)")):
        setattr(runner, name, _labelled(getattr(runner, name), stage))
    bench.keep.keep_report_maps = _labelled(bench.keep.keep_report_maps, "(report maps)")


def child(argv: list[str]) -> None:
    """`python -m bench.perf_floor --passes FILE ARGS`: `python -m bench ARGS` with the counting hooks; the
    counts and job spans go to FILE as JSON, whatever the run's exit."""
    path, argv = Path(argv[2]), argv[3:]
    _instrument()
    from bench.__main__ import cli
    try:
        code = cli(argv)
    finally:
        counts = Counter(tuple(p) for p in _PASSES)
        path.write_text(json.dumps({"passes": [[*k, v] for k, v in counts.items()], "spans": _SPANS, "models": _MODELS, "spent": _SPENT,
                                    "end": time.time()}))
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


def _scoring_seconds(results_dir: Path) -> float:
    """Seconds the runs spent in methods and metrics (the manifests' method/ and metric/ timings)."""
    total = 0.0
    for path in results_dir.rglob("manifest.json"):
        timings = json.loads(path.read_text()).get("timings", {})
        total += sum(v for k, v in timings.items() if k.startswith(("method/", "metric/")))
    return total


def floor(out: Path, *, overrides: tuple[str, ...] = (), repeat: int = 2, cache_dir: str | None = None,
          limit: int = 256, threads: int | None = None) -> pd.DataFrame:
    """Run `python -m bench OVERRIDES` `repeat` times (fresh results folders, cached models), count its
    passes, price them (module docstring); write OUT/floor.csv (per model and in total: wall and CPU
    seconds of the run and of its scoring phase, floor, ratios), OUT/floor_passes.csv (every
    (model, method, metric, kind, batch) with its count and priced seconds, costliest first) and
    OUT/floor_labels.csv (_labels: where the run's time beyond the floor goes). `threads`:
    torch's threads in the run (OMP_NUM_THREADS) and in the timing; one thread's CPU time is what a
    loaded machine inflates least (two threads spin while one waits for a core)."""
    from hydra.utils import instantiate

    env = {**os.environ, **({"SALIENCY_BENCH_CACHE": str(cache_dir)} if cache_dir else {}),
           **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if threads:
        torch.set_num_threads(threads)
    runs, prices = [], {}
    for r in range(repeat):                                         # interleaved: a run, then the models' sweep
        with tempfile.TemporaryDirectory(prefix="floor-") as results:
            data, t0, wall, cpu = _run_child([f"results_dir={results}", *overrides], env)
            runs.append({"wall": wall, "cpu": cpu, "scoring": _scoring_seconds(Path(results)), "data": data, "t0": t0})
        print(f"floor: run {r + 1}/{repeat}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
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
    passes = pd.DataFrame(runs[0]["data"]["passes"], columns=["model", "method", "metric", "batch", "backward",
                                                              "count"])
    passes["kind"] = passes.backward.map({True: "backward", False: "forward"})
    passes["images"] = passes.batch * passes["count"]
    for clock in ("wall", "cpu", "peak_wall", "peak_cpu"):
        per = passes.apply(lambda p: prices[p.model][p.kind][clock], axis=1)
        passes[f"floor_{clock}_s"] = passes.images * per
    passes = passes.drop(columns="backward").sort_values("floor_wall_s", ascending=False)
    best = min(runs, key=lambda r: r["wall"])
    labels = _labels(passes, best["data"]["spent"])
    scoring = passes[passes.method != "(run)"]
    spans = best["data"]["spans"]
    rows = []
    for name, group in passes.groupby("model"):
        job = sum(e - s for m, s, e in spans if m == name)
        rows.append({"model": name, "job_wall_s": round(job, 2), "floor_wall_s": group.floor_wall_s.sum(),
                     "floor_cpu_s": group.floor_cpu_s.sum(), "ratio_job": job / group.floor_wall_s.sum(),
                     **{f"best_{k}_batch": prices[name][k]["batch"] for k in ("forward", "backward")},
                     **{f"best_{k}_ms_per_image": 1e3 * prices[name][k]["wall"] for k in ("forward", "backward")}})
    f_wall, f_cpu = passes.floor_wall_s.sum(), passes.floor_cpu_s.sum()
    first, last = min(s for _, s, _ in spans), max(e for _, _, e in spans)
    rows.append({"model": "total", "threads": torch.get_num_threads(), "run_wall_s": best["wall"], "run_walls_s": " ".join(f"{r['wall']:.1f}" for r in runs),
                 "run_cpu_s": best["cpu"], "startup_s": first - best["t0"], "jobs_wall_s": sum(e - s for _, s, e in spans),
                 "report_s": best["data"]["end"] - last, "scoring_s": best["scoring"], "floor_wall_s": f_wall,
                 "floor_cpu_s": f_cpu, "ratio_run": best["wall"] / f_wall,
                 "ratio_scoring": best["scoring"] / scoring.floor_wall_s.sum(),
                 "ratio_cpu": best["cpu"] / f_cpu, "floor_peak_wall_s": passes.floor_peak_wall_s.sum(),
                 "ratio_run_peak": best["wall"] / passes.floor_peak_wall_s.sum(),
                 "ratio_cpu_peak": best["cpu"] / passes.floor_peak_cpu_s.sum(), "forward_passes": int(passes[passes.kind == "forward"]["count"].sum()),
                 "backward_passes": int(passes[passes.kind == "backward"]["count"].sum())})
    table = pd.DataFrame(rows).round(4)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "floor.csv", index=False)
    passes.round(4).to_csv(out / "floor_passes.csv", index=False)
    labels.round(4).to_csv(out / "floor_labels.csv", index=False)
    print("\n\n".join(t.to_string(index=False) for t in (table, passes.head(15).round(3), labels.head(20).round(3))),
          flush=True)
    return table


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
