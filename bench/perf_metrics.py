"""bench.perf's per-metric workloads: a metric of conf/metric/ beside its Quantus 0.6 counterpart on the same work.

One generic workload over one table (PAIRS): our YAML, with overrides that fix the amount of work, and the
Quantus class with the arguments that make it do the same work: the same number of forward passes per
sample (pixel groups, draws, subsets), of re-explained inputs (robustness: the method is the same
saliency for both) and the same maps. Maps go to Quantus in the form ours consumes (metrics.consumed):
raw (B, C, H, W), or the signed / abs-summed channel map (B, 1, H, W). Quantus' normalisation is off
(ours has none). Where the two define a score differently the work still matches; the note says how.
IROF and non-sensitivity have no row: Quantus 0.6's IROF stops on its own SLIC masks here ("The shape
of arr must be the same as the mask shape"), its NonSensitivity on (B, 1, H, W) maps ("operands could
not be broadcast"); their agreement tests (tests/metrics/) call Quantus with given segments or maps.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

import methods

REDUCE = "abs_sum"
GROUP = 16                      # pixels per group (a 4 x 4 patch): 64 groups at 32 px


@dataclass(frozen=True)
class Pair:
    """Quantus class name and constructor arguments beside our YAML overrides, for the same work."""

    quantus: str
    init: dict[str, Any] = field(default_factory=dict)
    ours: dict[str, Any] = field(default_factory=dict)
    explain: bool = False       # Quantus re-explains perturbed inputs through explain_func
    note: str = ""


def _per_group(size: int) -> int:
    return size * size // GROUP


PAIRS: dict[str, Callable[[int], Pair]] = {       # metric (conf/metric/<name>.yaml) -> its pair at image size s
    "focus": lambda s: Pair("Focus", note="mask: seeded 2-of-4 quadrant layouts (custom_batch for Quantus)"),
    "sparseness": lambda s: Pair("Sparseness"),
    "complexity": lambda s: Pair("Complexity"),
    "effective_complexity": lambda s: Pair("EffectiveComplexity", {"eps": 1e-5, "normalise": True},
                                           note="Quantus divides by the max, ours compares eps to it"),
    "faithfulness_estimate": lambda s: Pair("FaithfulnessEstimate", {"features_in_step": GROUP,
                                            "perturb_baseline": 0.0}, {"steps": _per_group(s)}),
    "monotonicity": lambda s: Pair("Monotonicity", {"features_in_step": GROUP, "perturb_baseline": 0.0},
                                   {"steps": _per_group(s)}),
    "monotonicity_correlation": lambda s: Pair("MonotonicityCorrelation", {
        "features_in_step": GROUP, "nr_samples": 16, "perturb_baseline": "uniform"}, {"steps": _per_group(s),
                                                                                      "samples": 16}),
    "sensitivity_n": lambda s: Pair("SensitivityN", {"features_in_step": 4, "n_max_percentage": 0.8,
                                                     "perturb_baseline": 0.0}, {"sizes": 8, "subsets": s * s // 40},
                                    note="~0.2 H W passes each: Quantus one nested subset per n, ours sizes x subsets"),
    "sufficiency": lambda s: Pair("Sufficiency", {"threshold": 0.6}),
    "selectivity": lambda s: Pair("Selectivity", {"patch_size": 4, "perturb_baseline": "black"}),
    "max_sensitivity": lambda s: Pair("MaxSensitivity", {"nr_samples": 16, "lower_bound": 0.2}, {"samples": 16},
                                      explain=True),
    "avg_sensitivity": lambda s: Pair("AvgSensitivity", {"nr_samples": 16, "lower_bound": 0.2}, {"samples": 16},
                                      explain=True),
    "local_lipschitz_estimate": lambda s: Pair("LocalLipschitzEstimate", {"nr_samples": 16, "perturb_std": 0.1},
                                               {"samples": 16}, explain=True),
    "continuity": lambda s: Pair("Continuity", {"nr_steps": 2 * round(0.125 * s)}, {"max_shift": 0.125},
                                 explain=True, note="2 round(W / 8) translations each"),
    "consistency": lambda s: Pair("Consistency"),
    "relative_input_stability": lambda s: Pair("RelativeInputStability", {"nr_samples": 16}, {"samples": 16},
                                               explain=True),
    "relative_output_stability": lambda s: Pair("RelativeOutputStability", {"nr_samples": 16}, {"samples": 16},
                                                explain=True),
    "relative_representation_stability": lambda s: Pair("RelativeRepresentationStability", {"nr_samples": 16},
                                                        {"samples": 16}, explain=True),
    "completeness": lambda s: Pair("Completeness", {"perturb_baseline": 0.0}),
}


def _form(raw: Tensor, kind: str) -> Tensor:
    """The attribution as a metric consuming `kind` gets it: raw (B, C, H, W) or a map (B, H, W)."""
    from metrics import metric_input
    return metric_input(raw, kind, REDUCE)


def _layouts(n: int, size: int, device: torch.device) -> tuple[Tensor, list[tuple[int, ...]]]:
    """Seeded 2-of-4 target quadrants: the mask (n, size, size) and Quantus' (tl, tr, bl, br) tuples."""
    g = torch.Generator().manual_seed(n)
    layout = torch.stack([torch.randperm(4, generator=g) < 2 for _ in range(n)])          # (n, 4)
    mask = layout.view(n, 2, 2).repeat_interleave(size // 2, 1).repeat_interleave(size // 2, 2)
    return mask.to(device), [tuple(int(v) for v in row) for row in layout]


def metric_workload(name: str, model: nn.Module, d: dict[str, Tensor], impl: str) -> Callable[[], Any]:
    """A callable running metric `name` once on d's samples: ours from conf/metric/<name>.yaml through the
    runner's own call, or its Quantus pair."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from bench.calls import call_metric, metric_inputs
    from bench.config import CONF, derive_seeds
    from bench.provenance import without_meta
    from metrics import consumed

    if name not in PAIRS:
        raise ValueError(f"no Quantus pair for metric {name!r}; choose among {sorted(PAIRS)}")
    size = d["x"].shape[-1]
    pair = PAIRS[name](size)
    overrides = [f"metric.{name}.{k}={v}" for k, v in pair.ours.items()]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = derive_seeds(compose("config", overrides=[f"metric=[{name}]", *overrides]))
    metric = instantiate(without_meta(cfg.metric[name]))                    # less the report's _sanity_ keys
    method = methods.saliency
    raw = method(model, d["x"], d["target"])                                  # (B, C, H, W)
    mask, layout = _layouts(len(d["x"]), size, d["x"].device) if name == "focus" else (d["mask"], None)
    if impl == "ours":
        inputs = metric_inputs(metric, model, {"x": d["x"], "target": d["target"], "mask": mask}, raw, method,
                               REDUCE, {})
        return lambda: call_metric(metric, inputs)
    import quantus

    kind = consumed(metric)
    a = _form(raw, kind)
    a = a if kind == "raw" else a[:, None]                                  # Quantus: (B, 1, H, W) maps

    def explain(model, inputs, targets, **_):
        dev = next(model.parameters()).device
        out = _form(method(model, torch.as_tensor(inputs, device=dev), torch.as_tensor(targets, device=dev)), kind)
        return (out if kind == "raw" else out[:, None]).cpu().numpy()

    q = getattr(quantus, pair.quantus)(**{"normalise": False, "abs": False, "disable_warnings": True, **pair.init})
    call: dict[str, Any] = {"a_batch": a.cpu().numpy(), "s_batch": mask[:, None].float().cpu().numpy(),
                            "channel_first": True, "device": str(d["x"].device)}
    if pair.explain:
        call["explain_func"] = explain
    if layout is not None:
        call["custom_batch"] = layout
    x, y = d["x"].cpu().numpy(), d["target"].cpu().numpy()

    def run() -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(q(model=model, x_batch=x, y_batch=y, **call), dtype=object)
    return run
