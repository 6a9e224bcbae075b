"""The shared per-pixel removal sweep (issue 18), before and after: `python -m bench.perf_sweep [--n 4] [--out DIR]`.

Scores methods x {faithfulness_estimate, non_sensitivity} with their YAML defaults (one pixel per group,
patch=1) as bench.run does (methods outer, batches inner, each metric on each map), once plainly and
once inside metrics.sweep.sweeps_shared(), alternating A B A B in one process so that a loaded machine
slows both alike. Model: bench.perf's small_cnn (seeded random weights: timing needs no training) at
--size px. Checks that both give bit-identical scores; prints and writes OUT/perf_sweep.csv (wall and
CPU seconds per sample, forward passes per sample).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from metrics.sweep import sweeps_shared


class _Passes:
    """Images through the model's forward (a pre-hook)."""

    def __init__(self, model: torch.nn.Module):
        self.images = 0
        model.register_forward_pre_hook(lambda m, args: setattr(self, "images", self.images + len(args[0])))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["saliency", "gradient_x_input", "integrated_gradients"])
    p.add_argument("--n", type=int, default=4, help="samples")
    p.add_argument("--batch-size", type=int, default=2, help="samples per batch (the runner's batch_size)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels")
    p.add_argument("--repeat", type=int, default=2, help="alternating before/after rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("results/perf"))
    a = p.parse_args(argv)
    from hydra import compose, initialize_config_dir

    from bench.calls import call_metric, metric_inputs
    from bench.config import CONF, derive_seeds
    from bench.perf import make_inputs, make_model
    from bench.provenance import without_meta
    from hydra.utils import instantiate

    torch.set_num_threads(a.threads)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = derive_seeds(compose("config", overrides=[f"method=[{','.join(a.methods)}]",
                                                         "metric=[faithfulness_estimate,non_sensitivity]"]))
    methods = {k: instantiate(v) for k, v in cfg.method.items()}
    metrics = {k: instantiate(without_meta(v)) for k, v in cfg.metric.items()}
    device = torch.device("cpu")
    model = make_model(a.size, device)
    d = make_inputs(model, a.size, a.n, device)
    batches = list(zip(d["x"].split(a.batch_size), d["target"].split(a.batch_size)))
    maps = {m: [f(model, x, t) for x, t in batches] for m, f in methods.items()}   # outside the timing
    passes = _Passes(model)

    def score() -> list[torch.Tensor]:
        out = []
        for m, f in methods.items():
            for (x, t), attribution in zip(batches, maps[m]):
                for metric in metrics.values():
                    r = call_metric(metric, metric_inputs(metric, model, {"x": x, "target": t}, attribution, f,
                                                          cfg.reduce, {}))
                    out += list(r.scores.values())
        return out

    rows, results = [], {}
    for r in range(a.repeat):
        for shared in (False, True):
            passes.images, wall, cpu = 0, time.perf_counter(), time.process_time()
            if shared:
                with sweeps_shared() as memo:
                    scores = score()
                hits, misses = memo.hits, memo.misses
            else:
                scores, hits, misses = score(), 0, 0
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            results.setdefault(shared, scores)
            rows.append({"round": r, "shared": shared, "methods": len(methods), "n": a.n, "size": a.size,
                         "wall_s_per_sample": wall / a.n, "cpu_s_per_sample": cpu / a.n,
                         "passes_per_sample": passes.images / a.n, "sweeps_computed": misses, "sweeps_reused": hits})
    if not all(torch.equal(u, v) for u, v in zip(results[False], results[True])):
        raise AssertionError("scores differ with and without sweeps_shared()")
    df = pd.DataFrame(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out / "perf_sweep.csv", index=False)
    print(df.to_string(index=False))
    best = df.groupby("shared").wall_s_per_sample.min()
    print(f"best of {a.repeat}: {best[False]:.2f} -> {best[True]:.2f} wall s/sample ({best[False] / best[True]:.1f}x); "
          "scores bit-identical")
    return df


if __name__ == "__main__":
    main()
