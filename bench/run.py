"""The evaluation loop: dataset -> model -> methods -> metrics -> store (DESIGN.md, "The flow of one run").

A run has two phases. Validation refuses, before any expensive work and with the key to fix,
everything a user can get wrong: options, `_target_`s and names, the results folder (writable,
space), the dataset (every item streamed once: shape, NaN/Inf, targets, duplicate ids, named by
sample id), the model (input shape, number of classes), metrics that need inputs the dataset
lacks, and every method and metric parameter: each method and metric that has a cell to compute
is called once on a two-sample probe, so the checks the functions themselves make (steps against
the image size, baselines, layers of this very model) run on the real model and data, with no
hand-kept copy of them here (the other checks live in bench/checks.py). Then, per method, the
dataset streams batch by batch: one batch of images and maps is in memory at a time, each metric
appends the batch's rows to its cell's part file, and a cell is committed by rename when its last
batch is done.

Faults are per sample: a method or metric that raises, or a method that returns NaN/Inf or the
wrong shape, is re-run on halves of the batch until the failing samples are isolated; those
samples are recorded (with the reason) in the cell's failures table and every other sample is
scored. Ctrl-C stops after the current batch's writes: completed cells stay, the manifest says
`interrupted`, and the next run resumes.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import platform
import subprocess
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from bench import keep, store
from bench.checks import (autocast, check_cache_dir, check_model, check_name, check_names, check_options,
                          check_targets, error_text, instantiate_checked, need_bytes, scan, stream)
from bench.zoo import cache_key, load_model
from bench.zoo.sources import sha256
from metrics import MetricResult, consumed, metric_input
from metrics.batching import ChunkRetryWarning

log = logging.getLogger(__name__)

PACKAGES = ("saliency-bench", "torch", "torchvision", "captum", "hydra-core", "omegaconf", "numpy", "pandas", "pyarrow", "scipy")
FORMAT = 3                    # part of every cell key: bump when the runner changes what a stored cell holds
                              # (3: each metric gets the form of the attribution it declares, metrics._map)
PROBE = 2                     # samples each method and metric is tried on before the run
# Exceptions that mean "this configuration cannot work" when a probe raises them (STYLE: bad input is a
# ValueError/TypeError; an unknown layer or key a LookupError). Anything else (RuntimeError, OOM) is a
# fault of the samples it hits and is recorded per sample during the run.
CONFIG_ERRORS = (ValueError, TypeError, LookupError, AttributeError, NotImplementedError)


def _digest(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


PLUMBING = ("results_dir", "cache_dir", "report", "gallery", "allowed_targets", "run_tag")   # where a run writes
                                                                                        # and reports, not what it computes


def identity(cfg: DictConfig, *, tag: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A run's identity (DESIGN: "A run has an identity ... and its own folder").

    tag: `run_tag`, else `tag` (the CLI passes the experiment's name), else "default"; config: a digest of
    everything that determines the run's numbers (the resolved config less PLUMBING); name: `<tag>-<config>`,
    the run's folder below results/<dataset>/<model>/, so runs of different configurations never share a
    folder; group: `<tag>-<digest>` of the same without dataset and model, which the report shows side by side
    (the models of one experiment); overrides: the command line's values (sweeps included), for the record.
    """
    job = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in PLUMBING}
    tag = str(cfg.get("run_tag") or tag or "default")
    check_name("run_tag", tag)
    config = _digest(job)
    group = f"{tag}-{_digest({k: v for k, v in job.items() if k not in ('dataset', 'model')})}"
    return {"tag": tag, "name": f"{tag}-{config}", "config": config, "group": group, "overrides": list(overrides)}


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Dotted keys at which two resolved configs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))]
    return [] if a == b else [where or "(root)"]


def _check_folder_identity(out_dir: Path, ident: dict[str, Any], job: dict[str, Any]) -> None:
    """Refuse a folder whose manifest records a run of another configuration: a folder is never reused across
    configurations (its cells and manifest would mix two runs)."""
    path = out_dir / "manifest.json"
    if not path.exists():
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        recorded = previous.get("identity", {}).get("config")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path} cannot be read ({e}); remove the folder {str(out_dir)!r} or run into another one") \
            from e
    if recorded != ident["config"]:
        old = {k: v for k, v in (previous.get("config") or {}).items() if k not in PLUMBING}
        diff = _differences(old, {k: v for k, v in job.items() if k not in PLUMBING})
        raise ValueError(f"results folder {str(out_dir)!r} holds run {previous.get('run_id')!r} of another configuration "
                         f"(it differs in {', '.join(diff[:6]) or 'its identity'}{', ...' if len(diff) > 6 else ''}); a "
                         "folder is never reused across configurations: let `python -m bench` pick the run's folder, "
                         "or pass another out_dir")


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
    missing = _missing(metric, available)
    if missing:
        raise ValueError(f"needs {missing}, which this dataset does not provide")
    params = inspect.signature(metric).parameters
    return metric(**{k: v for k, v in available.items() if k in params})


def _missing(metric: Callable[..., Any], available: Any) -> list[str]:
    """Required parameters of `metric` that are not among the names in `available`."""
    params = inspect.signature(metric).parameters
    return [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in available
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _checkpoint_hash(model: nn.Module, info: dict[str, Any]) -> str:
    """sha256 of the checkpoint file the weights came from (as load_model recorded it), else of the weights."""
    path = Path(str(info.get("checkpoint", "")))
    if info.get("sha256") or path.is_file():
        return (info.get("sha256") or sha256(path))[:16]
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode() + v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ---- faults ----------------------------------------------------------------------------------------
def _isolate(call: Callable[[Tensor], Any], idx: Tensor) -> tuple[list[tuple[Tensor, Any]], list[tuple[int, str]]]:
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
    a, b = _isolate(call, idx[:h]), _isolate(call, idx[h:])
    return a[0] + b[0], a[1] + b[1]


def _take(t: Tensor, idx: Tensor) -> Tensor:
    return t if len(idx) == len(t) else t[idx]


def _attribute(method: Callable[..., Tensor], model: nn.Module, x: Tensor,
               target: Tensor) -> tuple[Tensor, Tensor, list[str]]:
    """Raw attributions (B, C, H, W), ok (B,) and each sample's failure reason ('' when ok): a sample fails
    when the method raises on it, returns the wrong shape, or gives NaN/Inf. Each metric then gets the form
    of it that it declares (`metrics.consumed`), reduced or not."""
    B = x.shape[0]

    def call(idx: Tensor) -> Tensor:
        a = method(model, _take(x, idx), _take(target, idx))
        if not isinstance(a, Tensor) or a.shape != (len(idx), *x.shape[1:]):
            raise ValueError(f"returned shape {tuple(getattr(a, 'shape', ()))}, expected {(len(idx), *x.shape[1:])}")
        return a

    pieces, failed = _isolate(call, torch.arange(B, device=x.device))
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


def _inputs(metric: Callable[..., MetricResult], model: nn.Module, batch: dict[str, Tensor], attribution: Tensor,
            method: Callable[..., Tensor], reduce: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Everything a metric may name in its signature; `attribution` is the raw (B, C, H, W) one, handed on in
    the form the metric consumes; `extra` holds run-wide inputs (e.g. other models)."""
    return {"model": model, "x": batch["x"], "target": batch["target"],
            "attribution": metric_input(attribution, consumed(metric), reduce),
            "method": method, "reduce": reduce, **({"mask": batch["mask"]} if "mask" in batch else {}), **extra}


@contextlib.contextmanager
def _recording(retries: list[dict[str, Any]], **where: Any) -> Iterator[None]:
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
def _determinism(on: bool) -> Iterator[None]:
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


def _suite_version() -> str:
    try:
        return metadata.version("saliency-bench")
    except metadata.PackageNotFoundError:
        return "unknown"


def _label_randomized_inputs(cfg: DictConfig, metrics: dict[str, Any], device: torch.device) -> dict[str, Any]:
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


# ---- the run ---------------------------------------------------------------------------------------
def run(cfg: DictConfig, *, out_dir: str | Path, tag: str | None = None, overrides: list[str] | tuple[str, ...] = ()
        ) -> dict[str, Any]:
    """Run one (dataset, model) job of the experiment `cfg` and write its cells and manifest into `out_dir`.

    `out_dir` is the run's own folder: one that holds a run of another configuration is refused (the CLI
    names it results/<dataset>/<model>/<identity name>, see `identity`; `tag` and `overrides` as there).

    Cells already stored under the same key (a hash of dataset config, sample ids and content digest
    (datasets read from files), model config and checkpoint hash, method and metric config, reduction,
    seed, batch size and suite version) are skipped, so an interrupted run resumes where it stopped and
    a changed parameter or file recomputes only its cells. Failed samples are recorded per cell and in the manifest.
    Returns the manifest.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    device = check_options(cfg)
    for group in ("method", "metric"):
        if not cfg.get(group):
            raise ValueError(f"no {group} selected: pass {group}=[name,...] with names from conf/{group}/")
        for name in cfg[group]:
            check_name(group, name)
    check_names(cfg)                                               # dataset.name, model.name: file names, what runs
    check_targets(cfg)
    ident = identity(cfg, tag=tag, overrides=overrides)
    job = OmegaConf.to_container(cfg, resolve=True)
    _check_folder_identity(out_dir, ident, job)
    store.check_writable(out_dir)
    if "train" in cfg.model:                                       # the trained model is cached there
        check_cache_dir(cfg.cache_dir)
    store.remove_parts(out_dir)                                    # killed runs' leftovers, never a live run's
    torch.manual_seed(cfg.seed)
    dataset = instantiate_checked("dataset", cfg.dataset)
    methods = {name: instantiate_checked(f"method.{name}", node) for name, node in cfg.method.items()}
    metrics = {name: instantiate_checked(f"metric.{name}", node) for name, node in cfg.metric.items()}
    names = {"dataset": str(cfg.dataset.name), "model": str(cfg.model.name)}
    data = scan(dataset, cfg.batch_size)

    provided = {"model", "x", "target", "attribution", "method", "reduce", *(("mask",) if data["has_mask"] else ())}
    extra: dict[str, Any] = _label_randomized_inputs(cfg, metrics, device)   # run-wide metric inputs beyond the batch
    provided |= set(extra)
    for name in list(metrics):
        if missing := _missing(metrics[name], provided):
            why = (f"metric.{name} needs {missing}, which dataset {names['dataset']} does not provide"
                   + (" (it has no ground-truth masks)" if "mask" in missing else ""))
            if cfg.get("unavailable_metrics", "error") == "skip":
                log.warning("%s: skipped (unavailable_metrics=skip)", why)
                del metrics[name]
            else:
                raise ValueError(f"{why}: drop it from metric=[...] or set unavailable_metrics=skip to skip such "
                                 "metrics with a warning")

    t0 = time.perf_counter()
    model, model_info = load_model(cfg.model, cfg.dataset, cache_dir=cfg.cache_dir, device=device)
    model_info["load_seconds"] = round(time.perf_counter() - t0, 2)
    model_info["evaluated_accuracy"] = check_model(model, dataset, cfg.batch_size, device, data, names)
    precision, channels_last = cfg.get("precision", "float32"), cfg.get("channels_last", False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    fast = {k: v for k, v in (("channels_last", channels_last), ("precision", precision))
            if v not in (False, "float32")}                        # in the cell keys only when switched on,
                                                                   # so default runs keep their stored cells

    run_id = f"{names['dataset']}-{names['model']}-{ident['name']}"
    # datasets read from files key cells by their bytes (bench/data/folder.py); generated ones by their config
    content = dataset.content_digest(cache_dir=cfg.get("cache_dir")) if hasattr(dataset, "content_digest") else None
    try:
        previous = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))["keys"].get("content")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        previous = None
    if content and previous and previous != content:
        log.warning("%s: the data changed since the previous run in %s (content digest %s -> %s): its cells are "
                    "computed again", names["dataset"], out_dir, previous, content)
    base = {"dataset": job["dataset"], "sample_ids": data["sample_ids"], "model": cache_key(cfg.model, cfg.dataset),
            "checkpoint": _checkpoint_hash(model, model_info), "reduce": cfg.reduce, "seed": cfg.seed,
            "batch_size": cfg.batch_size, "suite": _suite_version(), "format": FORMAT, **fast,
            **({"content": content} if content else {})}
    method_keys = {m: _digest({**base, "method": job["method"][m]}) for m in methods}
    keys = {(m, k): _digest({**base, "method": job["method"][m], "metric": job["metric"][k]})
            for m in methods for k in metrics}
    paths = {mk: store.cell_paths(out_dir, *mk, key) for mk, key in keys.items()}
    todo = {m: [k for k in metrics if not store.stored_cell(*paths[m, k], n_samples=data["n"])] for m in methods}
    reused = _reuse_stored_cells(out_dir, paths, todo, data["n"])
    n_todo = sum(map(len, todo.values()))
    log.info("%s: %d samples on %s, model accuracy %.4f; %d of %d cells already stored (skipped; %d of them copied "
             "from runs beside this one), %d to compute", run_id, data["n"], device, model_info["evaluated_accuracy"],
             len(keys) - n_todo, len(keys), reused, n_todo)

    timings: dict[str, float] = {}
    retries: list[dict[str, Any]] = []
    lost: list[dict[str, Any]] = []                                # failures of cells with no scored sample
    interrupted, write_error = False, None
    if precision != "float32" and device.type == "cpu":
        log.warning("precision=%s on CPU: autocast is meant for GPUs; on a CPU without %s units it is much "
                    "slower (48x for pixel flipping on the suite's reference CPU)", precision, precision)
    with _determinism(bool(cfg.get("deterministic", False))), autocast(device, precision):
        rows_per_sample = _probe(model, dataset, methods, metrics, todo, cfg.reduce, extra, device)
        store.check_space(out_dir, need_bytes=need_bytes(data["n"], data["shape"], rows_per_sample, len(methods),
                                                          bool(cfg.get("cache_maps", False))))
        try:
            for method_name, method in methods.items():
                if todo[method_name]:
                    lost += _run_method(method_name, method, model, dataset, {k: metrics[k] for k in todo[method_name]},
                                        {k: paths[method_name, k] for k in todo[method_name]}, cfg, device, extra,
                                        out_dir.parent / "maps" if cfg.get("cache_maps", False) else None,
                                        method_keys[method_name], timings, retries, {"run_id": run_id, **names},
                                        n_samples=data["n"])
        except KeyboardInterrupt:
            interrupted = True
        except OSError as e:                                       # a full disk: keep the manifest of what completed
            write_error = e

    cells, meta, failures = [], {}, [pd.DataFrame(lost, columns=store.FAILURE_COLUMNS)]
    for (method_name, metric_name), (scores_path, curves_path) in paths.items():
        if store.verify_cell(scores_path, curves_path, n_samples=data["n"]) is None:
            meta.update({(metric_name, s): hib for s, hib in store.read_metadata(scores_path)["higher_is_better"].items()})
            failures.append(store.read_failures(scores_path))
            cells.append({"method": method_name, "metric": metric_name, "key": keys[method_name, metric_name],
                          "scores": str(scores_path.relative_to(out_dir)),
                          "curves": str(curves_path.relative_to(out_dir)) if curves_path.exists() else None})
    failed = pd.concat([f for f in failures if len(f)], ignore_index=True) if any(map(len, failures)) else \
        pd.DataFrame(columns=store.FAILURE_COLUMNS)
    manifest = {
        "run_id": run_id, **names, "identity": ident,
        "status": "failed" if write_error else "interrupted" if interrupted else "complete",
        **({"error": store.write_error_text(out_dir, write_error)} if write_error else {}),
        "n_samples": data["n"], "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or None,
        "seed": cfg.seed, "reduce": cfg.reduce, "deterministic": bool(cfg.get("deterministic", False)),
        "precision": precision, "channels_last": channels_last,
        "keys": {"sample_ids": data["sample_ids"], "checkpoint": base["checkpoint"], "suite": base["suite"],
                 "format": FORMAT, "content": content},
        "config": job, "versions": _versions(), "git_commit": _git_commit(),
        "model_info": model_info, "cells": cells, "skipped": len(keys) - n_todo, "failures": _summarise(failed),
        "samples": "samples.parquet",                               # each sample's class, for class means
        "retries": retries,
        "consumes": {name: consumed(metric) for name, metric in metrics.items()},   # which form each metric saw
        "score_meta": [{"metric": m, "score": s, "higher_is_better": hib} for (m, s), hib in sorted(meta.items())],
        "timings": {**{k: round(v, 3) for k, v in timings.items()}, "total": round(time.perf_counter() - started, 2)},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if not (interrupted or write_error):          # the maps the report draws, kept under this run's keys
        manifest["report_maps"] = keep.keep_report_maps(out_dir, cfg, model, dataset, methods, data["targets"],
                                                        _digest(base))
    try:
        if len(failed):
            store.write_table(failed.assign(run_id=run_id, **names), out_dir / "failures.parquet")
        else:
            (out_dir / "failures.parquet").unlink(missing_ok=True)
        store.write_table(pd.DataFrame(data["targets"].numpy(), columns=["sample_id", "target"]),
                          out_dir / "samples.parquet")
        store.write_json(manifest, out_dir / "manifest.json")
    except OSError as e:
        raise ValueError(f"{store.write_error_text(out_dir, write_error or e)}; the manifest could not be written "
                         f"either ({e.strerror or e}): free space and run the same command again") from e
    if write_error:
        raise ValueError(f"{manifest['error']}: {len(cells)} of {len(keys)} cells are stored and listed in "
                         f"{out_dir / 'manifest.json'} (status 'failed'); free space or set results_dir to another "
                         "disk, then run the same command again to resume") from write_error
    if interrupted:
        log.warning("%s interrupted: %d of %d cells stored; run the same command again to resume", run_id,
                    len(cells), len(keys))
        raise KeyboardInterrupt
    log.info("%s done in %.1f s: %d cells (%d skipped as already stored), %d failed samples -> %s", run_id,
             manifest["timings"]["total"], len(cells), len(keys) - n_todo, len(failed), out_dir)
    return manifest


def _reuse_stored_cells(out_dir: Path, paths: dict[tuple[str, str], tuple[Path, Path]], todo: dict[str, list[str]],
                        n_samples: int) -> int:
    """Copy into this run the cells that a run folder beside it (results/<dataset>/<model>/*) stored under the
    same key, verified whole (the key hashes everything that determines a cell), and drop them from `todo`: a
    run of a changed configuration gets its own folder yet recomputes only the cells the change touches."""
    copied = 0
    for method_name, metric_names in todo.items():
        for metric_name in list(metric_names):
            scores, curves = paths[method_name, metric_name]
            for other in sorted(out_dir.parent.glob(f"*/cells/{scores.name}")):
                if other.parent.parent == out_dir or not store.stored_cell(
                        other, other.with_name(curves.name), n_samples=n_samples):
                    continue
                store.copy_cell(other, other.with_name(curves.name), scores, curves)
                if store.stored_cell(scores, curves, n_samples=n_samples):
                    metric_names.remove(metric_name)
                    copied += 1
                    break
    return copied


def _probe(model: nn.Module, dataset: Any, methods: dict, metrics: dict, todo: dict[str, list[str]], reduce: str,
           extra: dict[str, Any], device: torch.device) -> int:
    """Call each method and metric with a cell to compute on the first PROBE samples; a CONFIG_ERRORS
    exception refuses the run with the config key. Returns the stored values per sample (for the space check)."""
    _, batch = next(stream(dataset, PROBE, device, stop=PROBE))
    values = 0
    for method_name, todo_metrics in todo.items():
        if not todo_metrics:
            continue
        method = methods[method_name]
        try:
            a = method(model, batch["x"], batch["target"])
        except CONFIG_ERRORS as e:
            raise ValueError(f"method.{method_name}: {error_text(e)}; fix it in conf/method/{method_name}.yaml or with "
                             f"method.{method_name}.<key>=... on the command line") from e
        except Exception:                                          # noqa: BLE001 - a fault, handled per sample
            a = None
        usable = isinstance(a, Tensor) and a.shape == batch["x"].shape and bool(torch.isfinite(a).all())
        # a faulty method (recorded per sample during the run) leaves the metrics to be probed on a stand-in map
        raw = a if usable else batch["x"]
        for metric_name in todo_metrics:
            try:
                result = _call_metric(metrics[metric_name], _inputs(metrics[metric_name], model, batch, raw, method,
                                                                    reduce, extra))
            except CONFIG_ERRORS as e:
                raise ValueError(f"metric.{metric_name} (with method {method_name}): {error_text(e)}; fix it in "
                                 f"conf/metric/{metric_name}.yaml or with metric.{metric_name}.<key>=...") from e
            except Exception:                                      # noqa: BLE001 - a fault, handled per sample
                continue
            values += len(result.scores) + sum(c.y.shape[1] for c in result.curves.values())
    return values


def _run_method(method_name: str, method: Callable[..., Tensor], model: nn.Module, dataset: Any, metrics: dict,
                paths: dict[str, tuple[Path, Path]], cfg: DictConfig, device: torch.device, extra: dict[str, Any],
                maps_dir: Path | None, method_key: str, timings: dict[str, float], retries: list[dict[str, Any]],
                keys: dict[str, str], *, n_samples: int) -> list[dict[str, Any]]:
    """Stream the dataset through one method and its todo metrics; commit each cell at the end.

    Each cell is claimed first (store.CellWriter.claim: a cell another process computes is waited
    for, and skipped when that process stored it). Returns the failures of cells that scored no
    sample (those cells are not stored, so a rerun retries them).
    """
    writers: dict[str, store.CellWriter] = {}
    try:
        for m in sorted(metrics, key=lambda m: paths[m][0].name):  # one lock order for all processes: no deadlock
            writer = store.CellWriter(*paths[m], n_samples=n_samples, **keys, method=method_name, metric=m)
            if writer.claim():
                writers[m] = writer
        metrics = {m: f for m, f in metrics.items() if m in writers}
        for start, batch in stream(dataset, cfg.batch_size, device) if writers else ():
            t0 = time.perf_counter()
            cached = store.read_maps(store.map_path(maps_dir, method_name, method_key, start)) if maps_dir else None
            if cached is not None and cached[0].shape == batch["x"].shape:
                attributions, ok, errors = cached[0].to(device), cached[1].to(device), cached[2]
            else:
                with _recording(retries, method=method_name, metric=None, batch_start=start):
                    attributions, ok, errors = _attribute(method, model, batch["x"], batch["target"])
                timings[f"method/{method_name}"] = timings.get(f"method/{method_name}", 0.0) + time.perf_counter() - t0
                if maps_dir:
                    store.write_maps(store.map_path(maps_dir, method_name, method_key, start), attributions, ok,
                                     errors)
            sample_id = batch["sample_id"]
            for pos in (~ok).nonzero().flatten().tolist():
                log.warning("%s failed on sample_id %d: %s", method_name, int(sample_id[pos]), errors[pos])
                for w in writers.values():
                    w.fail(int(sample_id[pos]), "method", errors[pos])
            if not ok.any():
                continue
            keep = ok.nonzero().flatten()
            sub = {k: _take(v, keep) for k, v in batch.items()}
            attribution = _take(attributions, keep)                           # raw (b, C, H, W)
            for metric_name, metric in metrics.items():
                t0 = time.perf_counter()

                def call(idx: Tensor, metric: Callable[..., MetricResult] = metric) -> MetricResult:
                    part = {k: _take(v, idx) for k, v in sub.items()}
                    return _call_metric(metric, _inputs(metric, model, part, _take(attribution, idx), method, cfg.reduce,
                                                        extra))

                with _recording(retries, method=method_name, metric=metric_name, batch_start=start):
                    pieces, failed = _isolate(call, torch.arange(len(keep), device=device))
                for idx, result in pieces:
                    writers[metric_name].append(result, _take(sub["sample_id"], idx))
                for pos, err in failed:
                    log.warning("%s x %s failed on sample_id %d: %s", method_name, metric_name,
                                int(sub["sample_id"][pos]), err)
                    writers[metric_name].fail(int(sub["sample_id"][pos]), "metric", err)
                timings[f"metric/{metric_name}"] = timings.get(f"metric/{metric_name}", 0.0) + time.perf_counter() - t0
        lost, committed = [], 0
        for metric_name, writer in writers.items():
            if writer.commit():
                committed += 1
            else:
                lost += writer.failures
        log.info("%s: %d/%d metrics stored (%d computed now)", method_name, committed + len(paths) - len(metrics),
                 len(paths), committed)
        return lost
    finally:
        for writer in writers.values():
            writer.abort()                                         # no-op for committed cells


def _summarise(failed: pd.DataFrame) -> list[dict[str, Any]]:
    """One manifest entry per (method, metric, error): method-stage failures once, with metric None."""
    if not len(failed):
        return []
    f = failed.copy()
    f["metric"] = f["metric"].where(f["stage"] == "metric", None)
    out = []
    for (method, metric, stage, error), g in f.groupby(["method", "metric", "stage", "error"], dropna=False, sort=True):
        ids = sorted(set(g["sample_id"].astype(int).tolist()))
        out.append({"method": method, "metric": None if pd.isna(metric) else metric, "stage": stage, "error": error,
                    "n_samples": len(ids), "sample_ids": ids})
    return out
