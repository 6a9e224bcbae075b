"""How the runner calls methods and metrics: what a run's passes share (RunContext), the inputs a metric may
take, faults isolated per sample, out-of-memory retries recorded, determinism switched on and off (bench/run.py
and bench/probe.py use them)."""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from bench.checks import error_text
from bench.data.stream import Batches
from bench.zoo import load_model
from metrics import MetricResult, consumed, metric_input
from metrics.batching import ChunkRetryWarning

log = logging.getLogger(__name__)

# Every input a metric may name in its signature, and what the runner hands it: the one list the runner
# (metric_inputs, provided_inputs) and the contract test (tests/test_contracts.py) read.
METRIC_INPUTS: dict[str, str] = {
    "model": "the run's model, in eval mode",
    "x": "the batch's images (B, C, H, W), normalised",
    "target": "the batch's classes (B,)",
    "attribution": "the method's attribution, in the form the metric declares (metrics.consumed)",
    "mask": "the batch's ground-truth masks (B, H, W) bool, where the dataset has them",
    "method": "the method being scored, for metrics that compute maps again",
    "reduce": "the run's channel reduction (abs_sum, sum, max_abs, l2)",
    "label_randomized_model": "the run's model retrained on permuted labels (label_randomized_inputs)",
}
RUN_INPUTS = ("label_randomized_model",)          # loaded once per run, only for the metrics that name them


@dataclass(frozen=True, kw_only=True)
class RunContext:
    """What the probe and every method's pass share, fixed for the run (timings and retries accumulate)."""

    model: nn.Module
    batches: Batches                          # the dataset's batches, decoded once (bench/data/stream.py)
    device: torch.device
    reduce: str                               # the run's channel reduction
    extra: dict[str, Any]                     # run-wide metric inputs (RUN_INPUTS)
    maps_dir: Path | None                     # the map cache (cache_maps), else None
    keys: dict[str, str]                      # run_id, dataset, model: in every stored row
    timings: dict[str, float]                 # seconds per method/<name>, metric/<name>, cell/<method>/<metric>
    retries: list[dict[str, Any]]             # out-of-memory chunk retries, for the manifest
    progress: bool = True                     # progress bars while scoring (on a terminal only)


def provided_inputs(has_mask: bool, extra: dict[str, Any]) -> set[str]:
    """The inputs of METRIC_INPUTS a run provides: masks where the dataset has them, run-wide inputs loaded."""
    return {k for k in METRIC_INPUTS if (k != "mask" or has_mask) and (k not in RUN_INPUTS or k in extra)}


def missing_inputs(metric: Callable[..., Any], available: Any) -> list[str]:
    """Required parameters of `metric` that are not among the names in `available`."""
    params = inspect.signature(metric).parameters
    return [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in available
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def call_metric(metric: Callable[..., MetricResult], available: dict[str, Any]) -> MetricResult:
    """Call `metric` with the inputs its signature names (of METRIC_INPUTS)."""
    missing = missing_inputs(metric, available)
    if missing:
        raise ValueError(f"needs {missing}, which this dataset does not provide")
    params = inspect.signature(metric).parameters
    return metric(**{k: v for k, v in available.items() if k in params})


def metric_inputs(metric: Callable[..., MetricResult], model: nn.Module, batch: dict[str, Tensor], attribution: Tensor,
                  method: Callable[..., Tensor], reduce: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The METRIC_INPUTS of one call; `attribution` is the raw (B, C, H, W) one, handed on in the form the
    metric consumes; `extra` holds run-wide inputs (RUN_INPUTS)."""
    if unknown := sorted(set(extra) - set(RUN_INPUTS)):
        raise ValueError(f"run-wide metric inputs {unknown} are not in bench.calls.RUN_INPUTS {list(RUN_INPUTS)}")
    return {"model": model, "x": batch["x"], "target": batch["target"],
            "attribution": metric_input(attribution, consumed(metric), reduce),
            "method": method, "reduce": reduce, **({"mask": batch["mask"]} if "mask" in batch else {}), **extra}


def label_randomized_inputs(cfg: DictConfig, metrics: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """`label_randomized_model` for the metrics whose signature asks for it (data randomization, Adebayo et
    al. 2018): the run's zoo model retrained on permuted labels (train option `permute_labels`) with the
    metric's `retrain` overrides of `model.train`, loaded once per run (trained and cached like any zoo model)."""
    wanted = [n for n, m in metrics.items() if "label_randomized_model" in inspect.signature(m).parameters]
    if not wanted:
        return {}
    if "train" not in cfg.model:
        if cfg.get("unavailable_metrics", "error") == "skip":
            return {}                                               # the missing-input check skips the metrics
        raise ValueError(f"metric.{wanted[0]} needs the model retrained on permuted labels, but model "
                         f"{cfg.model.name} has no `train` section (not trained by the suite): drop the metric "
                         "or set unavailable_metrics=skip")
    overrides = {n: OmegaConf.to_container(cfg.metric[n].get("retrain") or {}, resolve=True) for n in wanted}
    retrain = overrides[wanted[0]]
    if any(o != retrain for o in overrides.values()):
        raise ValueError(f"metrics {wanted} ask for differently retrained label-randomized models ({overrides}); "
                         "give them the same `retrain`")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if unknown := sorted(set(retrain) - set(model_cfg["train"])):
        raise ValueError(f"metric.{wanted[0]}.retrain has {unknown}, which model.train of {cfg.model.name} does not "
                         f"have; it takes {sorted(model_cfg['train'])}")
    model_cfg["train"] |= {**retrain, "permute_labels": True}
    model, info = load_model(OmegaConf.create(model_cfg), cfg.dataset, cache_dir=cfg.cache_dir, device=device)
    log.info("label-randomized %s for %s: train accuracy on permuted labels %.4f (n=%s), test accuracy %.4f, %s",
             cfg.model.name, wanted, info["train_accuracy"], info.get("n_train"), info["test_accuracy"],
             info["checkpoint"])
    return {"label_randomized_model": model}


# ---- faults ----------------------------------------------------------------------------------------
def isolate(call: Callable[[Tensor], Any], idx: Tensor) -> tuple[list[tuple[Tensor, Any]], list[tuple[int, str]]]:
    """Run `call` on the positions `idx`; on an exception, bisect until the failing positions are alone.

    Returns the (positions, result) pieces that ran, in order, and (position, reason) of every failure.
    k failing samples in a batch of B cost at most 2 k log2(B) extra calls; a batch without faults, one.
    """
    try:
        return [(idx, call(idx))], []
    except Exception as e:                                          # noqa: BLE001 - recorded by the caller
        if len(idx) == 1:
            return [], [(int(idx[0]), error_text(e))]
    h = len(idx) // 2
    a, b = isolate(call, idx[:h]), isolate(call, idx[h:])
    return a[0] + b[0], a[1] + b[1]


def take(t: Tensor, idx: Tensor) -> Tensor:
    """Rows `idx` of `t` (`t` itself when they are all of them)."""
    return t if len(idx) == len(t) else t[idx]


def attribute(method: Callable[..., Tensor], model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, list[str]]:
    """Raw attributions (B, C, H, W), ok (B,) and each sample's failure reason ('' when ok): a sample fails
    when the method raises on it, returns the wrong shape, or gives NaN/Inf. Each metric then gets the form
    of it that it declares (`metrics.consumed`), reduced or not."""
    B = x.shape[0]

    def call(idx: Tensor) -> Tensor:
        a = method(model, take(x, idx), take(target, idx))
        if not isinstance(a, Tensor) or a.shape != (len(idx), *x.shape[1:]):
            raise ValueError(f"returned shape {tuple(getattr(a, 'shape', ()))}, expected {(len(idx), *x.shape[1:])}")
        return a

    pieces, failed = isolate(call, torch.arange(B, device=x.device))
    attributions = torch.full(x.shape, torch.nan, device=x.device, dtype=x.dtype)
    ok = torch.zeros(B, dtype=torch.bool, device=x.device)
    for idx, m in pieces:
        attributions[idx], ok[idx] = m.to(x.dtype), True
    errors = [""] * B
    for pos, err in failed:
        errors[pos] = err
    nonfinite = ok & ~torch.isfinite(attributions).flatten(1).all(dim=1)
    for pos in nonfinite.nonzero().flatten().tolist():
        errors[pos] = "ValueError: returned NaN or Inf"
    return attributions, ok & ~nonfinite, errors


@contextlib.contextmanager
def recording(retries: list[dict[str, Any]], **where: Any) -> Iterator[None]:
    """Record chunk retries after out-of-memory (metrics.batching) into `retries`; other warnings pass on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ChunkRetryWarning)
        yield
    for w in caught:
        if issubclass(w.category, ChunkRetryWarning):
            retries.append({**where, "message": str(w.message)})
            log.warning("%s: %s", where, w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@contextlib.contextmanager
def determinism(on: bool) -> Iterator[None]:
    """torch's deterministic algorithms (where it has them: warn_only) and cuDNN settings, restored on exit."""
    if not on:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")       # cuBLAS needs it for reproducible GEMMs
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
