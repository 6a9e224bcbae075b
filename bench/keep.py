"""The maps a report draws, kept by the run that computed them (DESIGN: "a report reads only the store").

At the end of a complete run the runner calls `keep_report_maps`: for a few samples (one per class in
turn, `pick_samples`) it stores every method's map (the run's reduction) and, per mprt metric of the
run, the maps of the original model and after each of `metrics.mprt_stages` with their Spearman
similarity to the original (`mprt_grid`: what mprt scores). The file lies in the run's folder,
``report_maps/<key>.pt``, written atomically; `key` is the run's cell key base plus the picked samples
and the method and mprt configs, recorded in the manifest (``report_maps``) and inside the file, so
`read_report_maps` never hands a stale run's maps to another run. A run whose key is unchanged reuses
its file (resume), and a run beside it (results/<dataset>/<model>/*) with the same key gives its copy, as
stored cells are reused.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from bench.files import write_atomic
from metrics import model_free, mprt_stages, similarities, to_map

log = logging.getLogger(__name__)

SAMPLES = 6                    # samples kept per run: one per class in turn (shapes has six classes)
FOLDER = "report_maps"
_STAGE_KEYS = set(inspect.signature(mprt_stages).parameters) - {"model"}


@dataclass(frozen=True)
class MprtGrid:
    """Maps of each method on the original model and after every MPRT stage."""

    order: str                                # mprt's order: cascading_top_down, cascading_bottom_up, independent
    labels: list[str]                         # S layer names, in the stages' order
    maps: dict[str, Tensor]                   # method -> (S + 1, G, H, W), stage 0 = original model
    spearman: dict[str, Tensor]               # method -> (S, G), as mprt's "spearman@<layer>" scores


def pick_samples(target: Tensor, n: int) -> Tensor:
    """Indices of n samples, one per class in turn: every class's first sample, then every second, ...

    Ordered by (occurrence of the sample's class so far, index), so the gallery shows as many
    classes as it has columns.
    """
    if n < 1:
        raise ValueError(f"samples must be a positive integer, got {n}")
    onehot = torch.nn.functional.one_hot(target.cpu())                               # (N, K)
    occurrence = (onehot.cumsum(dim=0) * onehot).sum(dim=1) - 1                     # (N,) 0 for a class's first
    key = occurrence * len(target) + torch.arange(len(target))
    return key.argsort()[:n]


def method_maps(model: nn.Module, x: Tensor, target: Tensor, methods: dict[str, Callable[..., Tensor]], *,
                reduce: str) -> dict[str, Tensor]:
    """Each method's map (B, H, W) with the run's reduction; a method that raises is logged and left out."""
    out = {}
    for name, method in methods.items():
        try:
            out[name] = to_map(method(model, x, target), reduce).detach()
        except Exception as e:                                         # noqa: BLE001 - one row missing, not the figure
            log.warning("gallery: %s failed: %s: %s", name, type(e).__name__, e)
    return out


def mprt_grid(model: nn.Module, x: Tensor, target: Tensor, methods: dict[str, Callable[..., Tensor]], *,
              reduce: str, constant: Literal["zero", "nan"] = "zero", **stages: Any) -> MprtGrid:
    """Maps of every method at every stage of `metrics.mprt_stages(model, **stages)`, and their Spearman
    similarity to the original map by `metrics.similarities` (absolute maps, `constant` rule), i.e. what
    `mprt` with the same arguments scores. One pass over the stages serves every method; a method declared
    `model_free` (metrics.model_free: a map of x alone) is computed once and shown at every stage, as mprt does.
    """
    maps: dict[str, list[Tensor]] = {}                                  # raw attributions (G, C, H, W), as mprt
    for name, method in methods.items():
        try:
            maps[name] = [method(model, x, target).detach()]
        except Exception as e:                                         # noqa: BLE001
            log.warning("mprt grid: %s failed: %s: %s", name, type(e).__name__, e)
    labels, fixed = [], {name for name in maps if model_free(methods[name])}
    for layer, randomized in mprt_stages(model, **stages):
        labels.append(layer)
        for name in list(maps):
            try:
                maps[name].append(maps[name][0] if name in fixed else methods[name](randomized, x, target).detach())
            except Exception as e:                                     # noqa: BLE001
                log.warning("mprt grid: %s failed at %s: %s: %s", name, layer, type(e).__name__, e)
                del maps[name]
    rho = {name: torch.stack([similarities(m[0], s, measures=["spearman"], constant=constant)["spearman"]
                              for s in m[1:]]) for name, m in maps.items()}            # (S, G), of sum_c |E_c|
    stacked = {name: torch.stack([to_map(a, reduce) for a in m]) for name, m in maps.items()}   # (S + 1, G, H, W)
    return MprtGrid(stages.get("order", "cascading_top_down"), labels, stacked, rho)


def mprt_configs(cfg: DictConfig, *, default: bool = True) -> dict[str, dict[str, Any]]:
    """The run's mprt metric configs by name (`_target_: metrics.mprt`); if none, {"mprt": {}} (defaults) with
    `default`, else {}."""
    out = {}
    for name, node in cfg.metric.items():
        node = OmegaConf.to_container(node, resolve=True)
        if isinstance(node, dict) and node.get("_target_") == "metrics.mprt":
            out[name] = {k: v for k, v in node.items() if k in _STAGE_KEYS | {"constant"}}
    return out or ({"mprt": {}} if default else {})


def keep_report_maps(out_dir: Path, cfg: DictConfig, model: nn.Module, dataset: Any,
                     methods: dict[str, Callable[..., Tensor]], targets: Tensor, key: str) -> dict[str, str] | None:
    """Store the maps the report draws (module docstring) and return the manifest's entry {file, key};
    None when `cfg.gallery` is false. `targets` (n, 2) holds each sample's id and class (the runner's scan),
    `key` the run's cell key base; the file is reused when its key is unchanged."""
    if not cfg.get("gallery", True):
        return None
    index = pick_samples(targets[:, 1], min(SAMPLES, len(targets)))
    grids = mprt_configs(cfg, default=False)                       # the grids of the run's own mprt metrics
    key = _digest([key, targets[index, 0].tolist(), OmegaConf.to_container(cfg.method, resolve=True), grids])
    path = Path(out_dir) / FOLDER / f"{key}.pt"
    entry = {"file": f"{FOLDER}/{key}.pt", "key": key}
    if _load(path, key) is not None:
        return entry
    for other in sorted(Path(out_dir).parent.glob(f"*/{FOLDER}/{key}.pt")):   # a run beside it kept the same maps
        if other.parent != path.parent and _load(other, key) is not None:
            write_atomic(path, lambda tmp: shutil.copyfile(other, tmp))
            return entry
    try:
        kept = compute_report_maps(cfg, model, dataset, methods, index, grids)
        write_atomic(path, lambda tmp: torch.save({"key": key, **kept}, tmp))
    except (OSError, RuntimeError, ValueError) as e:              # the cells are stored: the run stands without them
        log.warning("no report maps kept in %s: %s: %s", path.parent, type(e).__name__, e)
        return None
    for stale in path.parent.glob("*.pt"):                      # an older key's maps: never drawn again
        if stale != path:
            stale.unlink(missing_ok=True)
    return entry


def compute_report_maps(cfg: DictConfig, model: nn.Module, dataset: Any, methods: dict[str, Callable[..., Tensor]],
             index: Tensor, grids: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The kept samples (x, target, sample_id, mask), each method's map and each mprt metric's grid, on CPU."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    items = [dataset[i] for i in index.tolist()]
    data = {k: torch.stack([torch.as_tensor(item[k]) for item in items]).to(device)
            for k in ("x", "target", "sample_id", "mask") if k in items[0]}
    with torch.random.fork_rng(devices=[]):                       # as the run: global seed set, global RNG left alone
        torch.manual_seed(cfg.seed)
        maps = method_maps(model, data["x"], data["target"], methods, reduce=cfg.reduce)
        drawn = {name: mprt_grid(model, data["x"], data["target"], methods, reduce=cfg.reduce, **kwargs)
                 for name, kwargs in grids.items()}
    classes = getattr(dataset, "classes", None)
    return {"reduce": str(cfg.reduce), "classes": [str(c) for c in classes] if classes is not None else None,
            **{k: v.detach().cpu() for k, v in data.items()},
            "maps": {name: m.float().cpu() for name, m in maps.items()},
            "grids": {name: {"order": g.order, "labels": list(g.labels),
                             "maps": {m: v.half().cpu() for m, v in g.maps.items()},      # display only
                             "spearman": {m: v.float().cpu() for m, v in g.spearman.items()}}
                      for name, g in drawn.items()}}


def read_report_maps(manifest_path: Path, manifest: dict) -> dict[str, Any] | None:
    """The maps a run kept for the report, or None when it kept none (an older runner, `gallery=false`) or
    its file is missing, unreadable or of another key (never a stale run's maps). Loaded with
    weights_only=True: a results file cannot run code."""
    entry = manifest.get("report_maps")
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        return None
    folder = Path(manifest_path).parent.resolve()
    path = (folder / entry["file"]).resolve()
    if not path.is_relative_to(folder):
        raise ValueError(f"{manifest_path} lists the map file {entry['file']!r}, outside its folder; remove the manifest")
    kept = _load(path, str(entry.get("key")))
    if kept is None:
        log.warning("run %s: its report maps %s are missing or of another key; no gallery for it (rerun it, or "
                    "`python -m bench.gallery` from the cached model)", manifest.get("run_id"), path)
    return kept


def grid_of(kept: dict[str, Any], name: str) -> MprtGrid:
    """One stored MPRT grid as an `MprtGrid`, maps back in float32."""
    g = kept["grids"][name]
    return MprtGrid(g["order"], list(g["labels"]), {m: v.float() for m, v in g["maps"].items()}, dict(g["spearman"]))


def _load(path: Path, key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        kept = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:                                             # noqa: BLE001 - unreadable: recomputed / not drawn
        return None
    return kept if isinstance(kept, dict) and kept.get("key") == key else None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
