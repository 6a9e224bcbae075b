"""The evaluation loop: dataset -> model -> methods -> metrics -> store (DESIGN.md, "The flow of one run")."""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import platform
import subprocess
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bench import store
from bench.zoo import accuracy, cache_key, load_model
from metrics import REDUCTIONS, MetricResult, to_map

log = logging.getLogger(__name__)

ALLOWED_TARGETS = ("methods.", "metrics.", "bench.", "torchvision.models.")
PACKAGES = ("saliency-bench", "torch", "torchvision", "captum", "hydra-core", "omegaconf", "numpy", "pandas", "pyarrow", "scipy")


def check_targets(cfg: DictConfig) -> None:
    """Refuse any `_target_` outside the suite's packages and the user's `allowed_targets`, before importing it."""
    allowed = ALLOWED_TARGETS + tuple(cfg.get("allowed_targets") or ())
    for group in ("dataset", "model", "method", "metric"):
        container = OmegaConf.to_container(cfg[group], resolve=False)
        stack = [(group, container)]
        while stack:
            where, node = stack.pop()
            if isinstance(node, dict):
                target = node.get("_target_")
                if target is not None and not str(target).startswith(allowed):
                    raise ValueError(
                        f"{where}._target_={target!r} (conf/{group}/...yaml) is not an allowed target; "
                        f"allowed prefixes are {list(allowed)}: add yours to `allowed_targets`"
                    )
                stack += [(f"{where}.{k}", v) for k, v in node.items()]


def _digest(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _call_metric(metric: Callable[..., MetricResult], available: dict[str, Any]) -> MetricResult:
    """Call `metric` with the inputs its signature names (model, x, target, attribution, mask, method, reduce)."""
    params = inspect.signature(metric).parameters
    kwargs = {k: v for k, v in available.items() if k in params}
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise ValueError(f"needs {missing}, which this dataset does not provide")
    return metric(**kwargs)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def run(cfg: DictConfig, *, out_dir: str | Path) -> dict[str, Any]:
    """Run one (dataset, model) job of the experiment `cfg` and write its cells and manifest into `out_dir`.

    Cells already stored under the same key (a hash of everything that determines
    them) are skipped, so an interrupted run resumes where it stopped. A method or
    metric that raises is recorded in the manifest's failures and the run goes on.
    Returns the manifest.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    check_targets(cfg)
    if cfg.reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {list(REDUCTIONS)}, got {cfg.reduce!r}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {cfg.batch_size}")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    torch.manual_seed(cfg.seed)
    dataset = instantiate(cfg.dataset)
    data = {k: v.to(device) for k, v in dataset.tensors().items()}
    t0 = time.perf_counter()
    model, model_info = load_model(cfg.model, cfg.dataset, cache_dir=cfg.cache_dir, device=device)
    model_info["load_seconds"] = round(time.perf_counter() - t0, 2)
    model_info["evaluated_accuracy"] = accuracy(model, data["x"], data["target"])
    methods = {name: instantiate(node) for name, node in cfg.method.items()}
    metrics = {name: instantiate(node) for name, node in cfg.metric.items()}

    names = {"dataset": cfg.dataset.name, "model": cfg.model.name}
    job = OmegaConf.to_container(cfg, resolve=True)
    run_id = f"{names['dataset']}-{names['model']}-{_digest(job)}"
    base = {"dataset": job["dataset"], "model": cache_key(cfg.model, cfg.dataset), "reduce": cfg.reduce,
            "seed": cfg.seed, "batch_size": cfg.batch_size, "format": 1}
    log.info("%s: %d samples on %s, model accuracy %.4f", run_id, len(dataset), device, model_info["evaluated_accuracy"])

    cells, failures, meta = [], [], {}
    timings: dict[str, float] = {}
    batches = [{k: v[i:i + cfg.batch_size] for k, v in data.items()} for i in range(0, len(dataset), cfg.batch_size)]
    for method_name, method in methods.items():
        keys = {m: _digest({**base, "method": job["method"][method_name], "metric": job["metric"][m]}) for m in metrics}
        paths = {m: store.cell_paths(out_dir, method_name, m, keys[m]) for m in metrics}
        todo = [m for m in metrics if not paths[m][0].exists()]
        results: dict[str, list] = {m: [] for m in todo}
        errors: dict[str, str] = {}
        for batch in batches:
            if not todo:
                break
            t0 = time.perf_counter()
            try:
                attribution = method(model, batch["x"], batch["target"])
                if attribution.shape != batch["x"].shape:
                    raise ValueError(f"returned shape {tuple(attribution.shape)}, expected {tuple(batch['x'].shape)}")
                attr_map = to_map(attribution, cfg.reduce)
                if not torch.isfinite(attr_map).all():
                    raise ValueError("returned NaN or Inf")
            except Exception as e:                                          # noqa: BLE001 - recorded, run goes on
                failures.append({"method": method_name, "metric": None, "error": _error(e)})
                log.warning("%s failed: %s\n%s", method_name, _error(e), traceback.format_exc(limit=3))
                todo = []
                break
            timings[f"method/{method_name}"] = timings.get(f"method/{method_name}", 0.0) + time.perf_counter() - t0
            available = {"model": model, "x": batch["x"], "target": batch["target"], "attribution": attr_map,
                         "method": method, "reduce": cfg.reduce, **({"mask": batch["mask"]} if "mask" in batch else {})}
            for metric_name in [m for m in todo if m not in errors]:
                t0 = time.perf_counter()
                try:
                    results[metric_name].append((_call_metric(metrics[metric_name], available), batch["sample_id"]))
                except Exception as e:                                      # noqa: BLE001
                    errors[metric_name] = _error(e)
                    log.warning("%s x %s failed: %s", method_name, metric_name, _error(e))
                timings[f"metric/{metric_name}"] = timings.get(f"metric/{metric_name}", 0.0) + time.perf_counter() - t0
        failures += [{"method": method_name, "metric": m, "error": err} for m, err in errors.items()]
        for metric_name in [m for m in todo if m not in errors]:
            result = MetricResult.concat([r for r, _ in results[metric_name]])
            sample_id = torch.cat([i for _, i in results[metric_name]])
            store.write_cell(*paths[metric_name], result, sample_id,
                             run_id=run_id, **names, method=method_name, metric=metric_name)
        for metric_name in metrics:
            scores_path, curves_path = paths[metric_name]
            if scores_path.exists():
                directions = store.read_metadata(scores_path)["higher_is_better"]
                meta.update({(metric_name, s): hib for s, hib in directions.items()})
                cells.append({"method": method_name, "metric": metric_name, "key": keys[metric_name],
                              "scores": str(scores_path.relative_to(out_dir)),
                              "curves": str(curves_path.relative_to(out_dir)) if curves_path.exists() else None})
        log.info("%s: %d/%d metrics stored (%d computed now)", method_name,
                 sum(c["method"] == method_name for c in cells), len(metrics), len(todo) - len(errors))

    manifest = {
        "run_id": run_id, **names, "n_samples": len(dataset), "device": str(device), "seed": cfg.seed,
        "reduce": cfg.reduce, "config": job, "versions": _versions(), "git_commit": _git_commit(),
        "model_info": model_info, "cells": cells, "failures": failures,
        "score_meta": [{"metric": m, "score": s, "higher_is_better": hib} for (m, s), hib in sorted(meta.items())],
        "timings": {**{k: round(v, 3) for k, v in timings.items()}, "total": round(time.perf_counter() - started, 2)},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    store.write_json(manifest, out_dir / "manifest.json")
    log.info("%s done in %.1f s: %d cells, %d failures -> %s", run_id, manifest["timings"]["total"],
             len(cells), len(failures), out_dir)
    return manifest
