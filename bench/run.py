"""The evaluation loop: dataset -> model -> methods -> metrics -> store (DESIGN.md, "The flow of one run").

A run has two phases. Validation refuses, before any expensive work and with the key to fix,
everything a user can get wrong: options, `_target_`s and names, the results folder (writable,
space), the dataset (every item streamed once: shape, NaN/Inf, targets, duplicate ids, named by
sample id), the model (input shape, number of classes), metrics that need inputs the dataset
lacks, and every method and metric parameter: each method and metric that has a cell to compute
is called once on a two-sample probe, so the checks the functions themselves make (steps against
the image size, baselines, layers of this very model) run on the real model and data, with no
hand-kept copy of them here (the other checks live in bench/checks.py; the probe, bench/probe.py, also
tells a misconfiguration, which stops the run, from a method or metric that cannot run on this model,
recorded as an `unsupported` cell with its reason while every other cell runs). Then, per method, the
batches stream one at a time (each item decoded once per run: bench/data/stream.py keeps the decoded
batches of the scan on disk for the later passes): one batch of images and maps is in memory at a
time, each metric appends the batch's rows to its cell's part file, and a cell is committed by
rename when its last batch is done, so a method's cells are committed together. A progress bar per
method counts its batches (on a terminal; progress=false turns it off); the manifest's timings hold
seconds per method (attribution), per metric and per (method, metric) cell.

Faults are per sample: a method or metric that raises, or a method that returns NaN/Inf or the
wrong shape, is re-run on halves of the batch until the failing samples are isolated; those
samples are recorded (with the reason) in the cell's failures table and every other sample is
scored. Ctrl-C stops after the current batch's writes: completed cells stay, the manifest says
`interrupted`, and the next run resumes.
"""
from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

from bench import keep, store
from bench.calls import (METRIC_INPUTS, RunContext, attribute, call_metric, determinism, isolate,
                         label_randomized_inputs, metric_inputs, missing_inputs, provided_inputs, recording, take)
from bench.checks import (autocast, check_cache_dir, check_model, check_name, check_names, check_options,
                          check_targets, instantiate_checked, need_bytes, scan)
from bench.config import derive_seeds
from bench.data.contract import missing_members
from bench.data.stream import Batches
from bench.probe import PROBE, probe, unsupported_entries  # noqa: F401 - PROBE: the probe's size, for tests
from bench.provenance import (check_folder_identity, checkpoint_hash, computed, digest, git_commit, identity,
                              metric_meta, suite_version, summarise, versions, without_meta)
from bench.tuning import tune
from bench.zoo import cache_key, load_model
from metrics import MetricResult, consumed
from metrics.batching import CHUNK_BYTES, pass_sizes
from metrics.sweep import sweeps_shared

log = logging.getLogger(__name__)

FORMAT = 3                    # part of every cell key: bump when the runner changes what a stored cell holds
                              # (3: each metric gets the form of the attribution it declares, metrics._map)


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
    cfg = derive_seeds(cfg)                                        # seed: null -> from the run seed
    job = computed(OmegaConf.to_container(cfg, resolve=True))       # less the metrics' report metadata
    described = {name: metric_meta(name, node) for name, node in cfg.metric.items()}
    previous_run = check_folder_identity(out_dir, ident, job)             # this folder's earlier manifest
    store.check_writable(out_dir)
    if "train" in cfg.model:                                       # the trained model is cached there
        check_cache_dir(cfg.cache_dir)
    store.remove_parts(out_dir)                                    # killed runs' leftovers, never a live run's
    torch.manual_seed(cfg.seed)
    dataset = instantiate_checked("dataset", cfg.dataset)
    if missing := missing_members(dataset):
        raise ValueError(f"dataset {cfg.dataset.get('_target_')!r} lacks {missing}: a dataset provides what "
                         "bench.data.contract.BenchDataset lists (see bench/data/shapes.py for one)")
    methods = {name: instantiate_checked(f"method.{name}", node) for name, node in cfg.method.items()}
    metrics = {name: instantiate_checked(f"metric.{name}", without_meta(node)) for name, node in cfg.metric.items()}
    names = {"dataset": str(cfg.dataset.name), "model": str(cfg.model.name)}
    batches = Batches(dataset, cfg.batch_size)                    # each item decoded once per run
    data = scan(batches)

    extra: dict[str, Any] = label_randomized_inputs(cfg, metrics, device)   # run-wide metric inputs beyond the batch
    provided = provided_inputs(data["has_mask"], extra)
    for name in list(metrics):
        if missing := missing_inputs(metrics[name], provided):
            why = (f"metric.{name} needs {missing}, which dataset {names['dataset']} does not provide"
                   + (" (it has no ground-truth masks)" if "mask" in missing else ""))
            if cfg.get("unavailable_metrics", "error") == "skip":
                log.warning("%s: skipped (unavailable_metrics=skip)", why)
                del metrics[name]
            else:
                raise ValueError(f"{why}: drop it from metric=[...] or set unavailable_metrics=skip to skip such "
                                 f"metrics with a warning" + ("" if set(missing) <= set(METRIC_INPUTS) else
                                 f" (a metric's inputs are named from {list(METRIC_INPUTS)}; give others a default)"))

    t0 = time.perf_counter()
    model, model_info = load_model(cfg.model, cfg.dataset, cache_dir=cfg.cache_dir, device=device)
    model_info["load_seconds"] = round(time.perf_counter() - t0, 2)
    model_info["evaluated_accuracy"] = check_model(model, batches, device, data, names)
    precision, channels_last = cfg.get("precision", "float32"), cfg.get("channels_last", False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # images per model pass, tuned to this model, shape and device (bench/tuning.py; cached in cache_dir);
    # deterministic=true keeps the byte budget: tuned sizes differ between machines, and so would sums' rounding
    if cfg.get("deterministic", False):
        sizes, tuned = None, {"source": "budget", "bytes": CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])}
    else:
        sizes, tuned = tune(model, data["shape"], device, precision=precision, channels_last=channels_last,
                            cache_dir=cfg.get("cache_dir"))
    fast = {k: v for k, v in (("channels_last", channels_last), ("precision", precision))
            if v not in (False, "float32")}                        # in the cell keys only when switched on,
                                                                   # so default runs keep their stored cells

    run_id = f"{names['dataset']}-{names['model']}-{ident['name']}"
    # datasets read from files key cells by their bytes (bench/data/folder.py); generated ones by their config
    content = dataset.content_digest(cache_dir=cfg.get("cache_dir")) if hasattr(dataset, "content_digest") else None
    keys = (previous_run or {}).get("keys")
    previous = keys.get("content") if isinstance(keys, dict) else None
    if content and previous and previous != content:
        log.warning("%s: the data changed since the previous run in %s (content digest %s -> %s): its cells are "
                    "computed again", names["dataset"], out_dir, previous, content)
    base = {"dataset": job["dataset"], "sample_ids": data["sample_ids"], "model": cache_key(cfg.model, cfg.dataset),
            "checkpoint": checkpoint_hash(model, model_info), "reduce": cfg.reduce, "seed": cfg.seed,
            "batch_size": cfg.batch_size, "suite": suite_version(), "format": FORMAT, **fast,
            **({"content": content} if content else {})}
    method_keys = {m: digest({**base, "method": job["method"][m]}) for m in methods}
    keys = {(m, k): digest({**base, "method": job["method"][m], "metric": job["metric"][k]})
            for m in methods for k in metrics}
    paths = {mk: store.cell_paths(out_dir, *mk, key) for mk, key in keys.items()}
    todo = {m: [k for k in metrics if not store.stored_cell(*paths[m, k], n_samples=data["n"])] for m in methods}
    reused = store.reuse_stored_cells(out_dir, paths, todo, data["n"])
    n_todo = sum(map(len, todo.values()))
    log.info("%s: %d samples on %s, model accuracy %.4f; %d of %d cells already stored (skipped; %d of them copied "
             "from runs beside this one), %d to compute", run_id, data["n"], device, model_info["evaluated_accuracy"],
             len(keys) - n_todo, len(keys), reused, n_todo)

    ctx = RunContext(model=model, batches=batches, device=device, reduce=cfg.reduce, extra=extra,
                     maps_dir=out_dir.parent / "maps" if cfg.get("cache_maps", False) else None,
                     keys={"run_id": run_id, **names}, timings={}, retries=[], progress=cfg.get("progress", True))
    lost: list[dict[str, Any]] = []                                # failures of cells with no scored sample
    interrupted, write_error = False, None
    if precision != "float32" and device.type == "cpu":
        log.warning("precision=%s on CPU: autocast is meant for GPUs; on a CPU without %s units it is much "
                    "slower (48x for pixel flipping on the suite's reference CPU)", precision, precision)
    # sweeps_shared: each batch's per-pixel removal sweep computed once for every method (probe included)
    with determinism(bool(cfg.get("deterministic", False))), autocast(device, precision), pass_sizes(sizes), \
            sweeps_shared() as sweeps:
        rows_per_sample, unsupported = probe(ctx, methods=methods, metrics=metrics, todo=todo)
        runnable = {m: f for m, f in methods.items() if not todo[m] or any((m, k) not in unsupported for k in todo[m])}
        by_reason: dict[tuple[str, str], list[str]] = {}                  # recorded, not computed (bench/probe.py)
        for (method_name, metric_name), why in unsupported.items():
            todo[method_name].remove(metric_name)
            by_reason.setdefault((method_name, why), []).append(metric_name)
        for (method_name, why), cells in by_reason.items():
            log.warning("%s x %s: unsupported on %s, not scored: %s", method_name, ", ".join(cells), names["model"], why)
        store.check_space(out_dir, need_bytes=need_bytes(data["n"], data["shape"], rows_per_sample, len(methods),
                                                          bool(cfg.get("cache_maps", False))))
        try:
            for method_name, method in methods.items():
                if todo[method_name]:
                    lost += _run_method(ctx, name=method_name, method=method, key=method_keys[method_name],
                                        metrics={k: metrics[k] for k in todo[method_name]},
                                        paths={k: paths[method_name, k] for k in todo[method_name]})
            if sweeps.hits or sweeps.misses:
                log.info("%s: per-pixel removal sweeps computed %d times, reused %d times (metrics.sweep)", run_id,
                         sweeps.misses, sweeps.hits)
        except KeyboardInterrupt:
            interrupted = True
        except OSError as e:                                       # a full disk: keep the manifest of what completed
            write_error = e
        if not (interrupted or write_error):                       # the maps the report draws, under the run's keys
            report_maps = keep.keep_report_maps(out_dir, cfg, model, dataset, runnable, data["targets"],
                                                digest(base))      # and settings (determinism, precision)
    batches.close()

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
        "config": job, "versions": versions(), "git_commit": git_commit(),
        "model_info": model_info, "cells": cells, "skipped": len(keys) - n_todo, "failures": summarise(failed),
        "unsupported": unsupported_entries(unsupported),          # cells that cannot run here, with the reason
        "samples": "samples.parquet",                               # each sample's class, for class means
        "retries": ctx.retries,
        "pass_sizes": tuned,                                        # images per forward / gradient pass
        "consumes": {name: consumed(metric) for name, metric in metrics.items()},   # which form each metric saw
        "metrics": {name: described[name] for name in metrics},    # the YAMLs' _sanity_ and _staged_, for the report
        "score_meta": [{"metric": m, "score": s, "higher_is_better": hib} for (m, s), hib in sorted(meta.items())],
        "timings": {**{k: round(v, 3) for k, v in ctx.timings.items()}, "total": round(time.perf_counter() - started, 2)},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if not (interrupted or write_error):
        manifest["report_maps"] = report_maps
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
    log.info("%s done in %.1f s: %d cells (%d skipped as already stored), %d unsupported, %d failed samples -> %s",
             run_id, manifest["timings"]["total"], len(cells), len(keys) - n_todo, len(unsupported), len(failed), out_dir)
    return manifest


def _add_time(ctx: RunContext, t0: float, *keys: str) -> None:
    """Add the seconds since `t0` to each of `keys` in the run's timings."""
    seconds = time.perf_counter() - t0
    for key in keys:
        ctx.timings[key] = ctx.timings.get(key, 0.0) + seconds


def _run_method(ctx: RunContext, *, name: str, method: Callable[..., Tensor], key: str,
                metrics: dict[str, Callable[..., MetricResult]], paths: dict[str, tuple[Path, Path]]
                ) -> list[dict[str, Any]]:
    """Stream the batches through method `name` (its map cache key `key`) and its todo metrics; commit each
    cell at the end.

    Each cell is claimed first (store.CellWriter.claim: a cell another process computes is waited
    for, and skipped when that process stored it). Returns the failures of cells that scored no
    sample (those cells are not stored, so a rerun retries them).
    """
    writers: dict[str, store.CellWriter] = {}
    model, device = ctx.model, ctx.device
    try:
        for m in sorted(metrics, key=lambda m: paths[m][0].name):  # one lock order for all processes: no deadlock
            writer = store.CellWriter(*paths[m], n_samples=ctx.batches.n, **ctx.keys, method=name, metric=m)
            if writer.claim():
                writers[m] = writer
        metrics = {m: f for m, f in metrics.items() if m in writers}
        # one bar per method over batches, the metric being scored as its postfix; on a terminal only
        bar = tqdm(total=-(-ctx.batches.n // ctx.batches.batch_size) if writers else 0, desc=name, unit="batch",
                   disable=None if ctx.progress else True, leave=False, dynamic_ncols=True)
        for start, batch in ctx.batches.stream(device) if writers else ():
            bar.set_postfix_str("attribution", refresh=False)
            t0 = time.perf_counter()
            cached = store.read_maps(store.map_path(ctx.maps_dir, name, key, start)) if ctx.maps_dir else None
            if cached is not None and cached[0].shape == batch["x"].shape:
                attributions, ok, errors = cached[0].to(device), cached[1].to(device), cached[2]
            else:
                with recording(ctx.retries, method=name, metric=None, batch_start=start):
                    attributions, ok, errors = attribute(method, model, batch["x"], batch["target"])
                _add_time(ctx, t0, f"method/{name}")
                if ctx.maps_dir:
                    store.write_maps(store.map_path(ctx.maps_dir, name, key, start), attributions, ok, errors)
            sample_id = batch["sample_id"]
            for pos in (~ok).nonzero().flatten().tolist():
                log.warning("%s failed on sample_id %d: %s", name, int(sample_id[pos]), errors[pos])
                for w in writers.values():
                    w.fail(int(sample_id[pos]), "method", errors[pos])
            if not ok.any():
                bar.update()
                continue
            kept = ok.nonzero().flatten()
            sub = {k: take(v, kept) for k, v in batch.items()}
            attribution = take(attributions, kept)                           # raw (b, C, H, W)
            for metric_name, metric in metrics.items():
                t0 = time.perf_counter()
                bar.set_postfix_str(metric_name)

                def call(idx: Tensor, metric: Callable[..., MetricResult] = metric) -> MetricResult:
                    part = {k: take(v, idx) for k, v in sub.items()}
                    return call_metric(metric, metric_inputs(metric, model, part, take(attribution, idx), method,
                                                             ctx.reduce, ctx.extra))

                with recording(ctx.retries, method=name, metric=metric_name, batch_start=start):
                    pieces, failed = isolate(call, torch.arange(len(kept), device=device))
                for idx, result in pieces:
                    writers[metric_name].append(result, take(sub["sample_id"], idx))
                for pos, err in failed:
                    log.warning("%s x %s failed on sample_id %d: %s", name, metric_name, int(sub["sample_id"][pos]), err)
                    writers[metric_name].fail(int(sub["sample_id"][pos]), "metric", err)
                _add_time(ctx, t0, f"metric/{metric_name}", f"cell/{name}/{metric_name}")   # cell: on this method's maps
            bar.update()
        bar.close()
        lost, committed = [], 0
        for metric_name, writer in writers.items():
            if writer.commit():
                committed += 1
            else:
                lost += writer.failures
        log.info("%s: %d/%d metrics stored (%d computed now)", name, committed + len(paths) - len(metrics),
                 len(paths), committed)
        return lost
    finally:
        for writer in writers.values():
            writer.abort()                                         # no-op for committed cells
