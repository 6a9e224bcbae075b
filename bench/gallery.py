"""The gallery of maps and the MPRT grid (Adebayo et al. 2018's signature figure), drawn from maps.

A report draws them from the maps each run kept in the store (bench.keep: a few samples, one per
class, every method, and each mprt metric's stages), without loading a model. `python -m bench.gallery
RUN_DIR [--samples N] [--grid-samples G] [--out DIR]` draws more samples on demand: it reloads each
run's dataset and zoo model from the cache (its manifest's resolved `config`), recomputes the same maps
(bench.keep.compute_report_maps) and writes, per run (PNG and PDF):

- ``gallery_<dataset>_<model>``: rows = methods, columns = samples picked one per class in turn
  (the input with its mask outline on top);
- ``mprt_grid_<dataset>_<model>_<metric>_<sample_id>``: rows = methods, columns = the map of the
  original model and after each MPRT stage, from `metrics.mprt_stages` with the run's mprt config
  (same layer order, seeds and reduction as the stored scores), each panel annotated with the
  Spearman similarity mprt reports for it.

Display scale, per map and sample: m / q99(|m|), clipped to [-1, 1] (q99 = 99th percentile of
|m| over the pixels; the maximum where that is 0; a zero map stays 0), so one hot pixel does
not blank the rest. Signed maps (a method with any negative value) use a diverging colormap
centred on 0, unsigned ones a sequential one; the MPRT grid shows |map|, which mprt ranks.
"""
from __future__ import annotations

import argparse
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from bench.checks import check_targets
from bench import figures
from bench.files import find_manifests, read_manifest
from bench.keep import (MprtGrid, compute_report_maps, grid_of, method_maps, mprt_configs, mprt_grid,
                        pick_samples)

__all__ = ["MprtGrid", "Run", "display_scale", "draw", "load_items", "load_run", "main", "method_maps", "mprt_configs",
           "mprt_grid", "pick_samples", "write_gallery"]
log = logging.getLogger(__name__)

_SIGNED, _UNSIGNED = "RdBu_r", "magma"
_SCAN = 256                               # first samples whose classes are read to pick one per class


@dataclass(frozen=True)
class Run:
    """What the gallery needs of one stored run, reloaded: config, model, dataset and methods."""

    manifest: dict
    cfg: DictConfig
    model: nn.Module
    dataset: Any                              # items {x (C, H, W), target, sample_id, mask (H, W) if any}
    methods: dict[str, Callable[..., Tensor]]
    device: torch.device


def load_run(manifest_path: str | Path, *, cache_dir: str | Path | None = None,
             device: str | None = None) -> Run:
    """Reload one run from its manifest: the dataset, the zoo model (a trained one only from the cache,
    never retrained) and its methods.

    `cache_dir` overrides the run's cache_dir (e.g. results copied from another machine);
    `device` its device ("auto" = cuda if available).
    """
    from hydra.utils import instantiate                              # the model's stack only when a model is loaded

    from bench.zoo import cache_key, load_model

    path = Path(manifest_path)
    manifest = read_manifest(path)
    if "config" not in manifest:
        raise ValueError(f"{path} has no resolved `config`; it was not written by `python -m bench`: re-run it")
    cfg = OmegaConf.create(manifest["config"])
    check_targets(cfg)                                               # a manifest is input: refuse foreign targets
    cache = Path(cache_dir if cache_dir is not None else cfg.cache_dir).expanduser()
    checkpoint = cache / f"{cfg.model.name}-{cache_key(cfg.model, cfg.dataset)}.pt"
    if "train" in cfg.model and not checkpoint.exists():
        raise ValueError(f"the model of run {manifest.get('run_id')} is not in the cache ({checkpoint}); pass "
                         "--cache-dir where `python -m bench` cached it, or re-run the experiment to retrain it")
    device = device or cfg.get("device", "auto")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run {manifest.get('run_id')} ran on {device}, but CUDA is not available here: "
                         "pass --device cpu")
    model, _ = load_model(cfg.model, cfg.dataset, cache_dir=cache, device=device, retrain=False)   # never retrains
    methods = {name: instantiate(node) for name, node in cfg.method.items()}
    return Run(manifest, cfg, model, instantiate(cfg.dataset), methods, device)


def load_items(run: Run, index: Tensor) -> dict[str, Tensor]:
    """The dataset items `index` stacked as the runner does: x (B, C, H, W), target, sample_id (B,), mask."""
    items = [run.dataset[i] for i in index.tolist()]
    keys = [k for k in ("x", "target", "sample_id", "mask") if k in items[0]]
    return {k: torch.stack([torch.as_tensor(item[k]) for item in items]).to(run.device) for k in keys}


def display_scale(maps: Tensor) -> Tensor:
    """Per-sample display scale of (B, H, W) maps: m / q99(|m|) clipped to [-1, 1] (module docstring)."""
    a = maps.abs().flatten(1).double()                                                 # (B, HW)
    scale = torch.quantile(a, 0.99, dim=1)
    scale = torch.where(scale > 0, scale, a.amax(dim=1))
    scale = torch.where(scale > 0, scale, 1.0)
    return (maps.double() / scale[:, None, None]).clamp(-1, 1).float()


def _image(x: Tensor) -> Tensor:
    """(C, H, W) model input -> (H, W, C) or (H, W) in [0, 1], min-max over the whole image (any normalisation)."""
    x = x.detach().double().cpu()
    span = x.max() - x.min()
    x = (x - x.min()) / (span if span > 0 else 1)
    return x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)


def _show_input(ax, kept: dict[str, Any], j: int) -> None:
    """Sample j of `kept`: the image, its mask outline (where the dataset has masks), id and class as title."""
    gray = kept["x"].shape[1] == 1
    ax.imshow(_image(kept["x"][j]).numpy(), cmap="gray" if gray else None, interpolation="nearest")
    if kept.get("mask") is not None:
        ax.contour(kept["mask"][j].cpu().numpy().astype(float), levels=[0.5], colors="lime", linewidths=0.8)
    t = int(kept["target"][j])
    classes = kept.get("classes")
    name = classes[t] if classes is not None and t < len(classes) else f"class {t}"
    ax.set_title(f"#{int(kept['sample_id'][j])} {name}", fontsize=8)


def _bare(ax) -> None:
    ax.set_xticks([]), ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _gallery_figure(kept: dict[str, Any], manifest: dict):
    """Figure of the gallery of `kept` (bench.keep): (1 + methods) x samples panels; returns (figure, axes)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    maps = kept["maps"]
    M, N = len(maps), len(kept["x"])
    fig = figures.new_figure(figsize=(1.4 * N + 1.8, 1.4 * (1 + M) + 0.6))
    axes = fig.subplots(1 + M, N, squeeze=False)
    for j in range(N):
        _show_input(axes[0, j], kept, j)
    axes[0, 0].set_ylabel("input", rotation=0, ha="right", va="center", fontsize=8)
    kinds = set()
    for r, (name, m) in enumerate(maps.items(), start=1):
        signed = bool((m < 0).any())                          # one colormap per row: the method's kind
        kinds.add(signed)
        shown = display_scale(m).cpu()
        for j in range(N):
            axes[r, j].imshow(shown[j].numpy(), cmap=_SIGNED if signed else _UNSIGNED, vmin=-1 if signed else 0,
                              vmax=1, interpolation="nearest")
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    for ax in axes.flat:
        _bare(ax)
    height = fig.get_figheight()
    fig.subplots_adjust(top=1 - 0.5 / height)                      # before the colorbars take their space
    for signed in sorted(kinds):
        bar = fig.colorbar(ScalarMappable(Normalize(-1 if signed else 0, 1), _SIGNED if signed else _UNSIGNED),
                           ax=axes.ravel().tolist(), shrink=0.4, pad=0.03)
        bar.ax.set_title("signed" if signed else "unsigned", fontsize=8)
    m = manifest
    fig.suptitle(f"{m['dataset']} / {m['model']}: maps (reduce={kept['reduce']}), each scaled by its own "
                 "99th percentile of |map|", fontsize=9, y=1 - 0.1 / height)
    return fig, axes


def _grid_figure(kept: dict[str, Any], manifest: dict, grid: MprtGrid, metric: str, j: int = 0):
    """Figure of the MPRT grid for sample j of `kept`: the input, then methods x (stages + 1) map panels.

    Returns (figure, map axes of shape (methods, stages + 1)).
    """
    M, S = len(grid.maps), len(grid.labels)
    fig = figures.new_figure(figsize=(1.15 * (S + 3) + 0.6, 1.15 * M + 1.0))
    axes = fig.subplots(M, S + 3, squeeze=False, gridspec_kw={"width_ratios": [1, 1.1] + [1] * (S + 1)})
    _show_input(axes[0, 0], kept, j)                          # column 0: the input; column 1: method names
    for ax in [*axes[1:, 0], *axes[:, 1]]:
        ax.axis("off")
    for r, (name, m) in enumerate(grid.maps.items()):
        shown = display_scale(m[:, j].abs()).cpu()                                     # (S + 1, H, W)
        for s in range(S + 1):
            ax = axes[r, s + 2]
            ax.imshow(shown[s].numpy(), cmap=_UNSIGNED, vmin=0, vmax=1, interpolation="nearest")
            if s:
                ax.text(0.03, 0.04, f"ρ={float(grid.spearman[name][s - 1, j]):.2f}", transform=ax.transAxes,
                        fontsize=6, color="white", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0})
        axes[r, 1].text(0.95, 0.5, name, ha="right", va="center", fontsize=8, transform=axes[r, 1].transAxes)
    for s, label in enumerate(["original", *grid.labels]):
        axes[0, s + 2].set_title(label, fontsize=7, rotation=30, ha="left", va="bottom", rotation_mode="anchor")
    for ax in [axes[0, 0], *axes[:, 2:].flat]:
        _bare(ax)
    m = manifest
    fig.suptitle(f"{m['dataset']} / {m['model']}: {metric} ({grid.order}) stages, left to right (|map| scaled "
                 "per panel by its 99th percentile; ρ = Spearman with the original, as mprt scores it)",
                 fontsize=8, y=1.0)
    return fig, axes[:, 2:]


def draw(kept: dict[str, Any], manifest: dict, out: Path, tag: str, *, grid_samples: int = 1,
         pdf: bool = False) -> list[Path]:
    """Write the gallery of `kept` (bench.keep's maps of one run) and the MPRT grids of its first
    `grid_samples` samples into `out` (PNG; with `pdf` also PDF); returns the PNG paths."""
    paths = []
    if kept["maps"]:
        fig, _ = _gallery_figure(kept, manifest)
        paths.append(figures.save_figure(fig, out / f"gallery_{tag}", pdf=pdf))
    for metric in kept["grids"]:
        grid = grid_of(kept, metric)
        for j in range(min(grid_samples, len(kept["x"])) if grid.maps else 0):
            fig, _ = _grid_figure(kept, manifest, grid, metric, j)
            paths.append(figures.save_figure(fig, out / f"mprt_grid_{tag}_{metric}_{int(kept['sample_id'][j])}",
                                             pdf=pdf))
    return paths


def write_gallery(root: str | Path, out_dir: str | Path | None = None, *, samples: int = 4, grid_samples: int = 1,
                  cache_dir: str | Path | None = None, device: str | None = None,
                  errors: Literal["raise", "warn"] = "raise", pdf: bool = False) -> list[Path]:
    """Recompute from the cached models and write the gallery and MPRT grids of every run below `root` into
    `out_dir` (default root/report). Returns the PNG paths. `errors="warn"` logs a run that cannot be
    reloaded (e.g. its model is no longer cached) and goes on; "raise" stops with its ValueError.
    """
    if samples < 1 or grid_samples < 0:
        raise ValueError(f"need samples >= 1 and grid_samples >= 0, got {samples} and {grid_samples}")
    root = Path(root)
    manifests = find_manifests(root)
    out = root / "report" if out_dir is None else Path(out_dir)
    runs = [read_manifest(p) for p in manifests]
    pairs = Counter((m["dataset"], m["model"]) for m in runs)
    paths: list[Path] = []
    for path, manifest in zip(manifests, runs):
        tag = f"{manifest['dataset']}_{manifest['model']}"
        if pairs[manifest["dataset"], manifest["model"]] > 1:
            tag = manifest["run_id"]                           # several runs of one pair below root: keep them apart
        try:
            run = load_run(path, cache_dir=cache_dir, device=device)
            n = min(len(run.dataset), _SCAN)
            targets = torch.as_tensor([int(run.dataset[i]["target"]) for i in range(n)])
            index = pick_samples(targets, min(samples, n))
            kept = compute_report_maps(run.cfg, run.model, run.dataset, run.methods, index,
                                       mprt_configs(run.cfg) if grid_samples else {})
            paths += draw(kept, manifest, out, tag, grid_samples=grid_samples, pdf=pdf)
        except Exception as e:                                 # noqa: BLE001 - "warn": the report goes on without it
            if errors == "raise" or not isinstance(e, (ValueError, RuntimeError, OSError, KeyError)):
                raise
            log.warning("no gallery for %s: %s: %s", path.parent, type(e).__name__, e)
    return paths


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m bench.gallery RUN_DIR [--samples N] [--grid-samples G] [--out DIR] [--cache-dir DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m bench.gallery",
                                     description="Gallery of maps and MPRT grid of the runs below a folder.")
    parser.add_argument("run_dir", help="a run folder (with manifest.json) or a folder of runs")
    parser.add_argument("--samples", type=int, default=4, help="gallery columns, one sample per class in turn")
    parser.add_argument("--grid-samples", type=int, default=1, help="MPRT grids per run (first gallery samples)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    parser.add_argument("--cache-dir", default=None, help="zoo model cache (default: the run's cache_dir)")
    parser.add_argument("--device", default=None, help="cpu, cuda, auto (default: the run's device)")
    parser.add_argument("--pdf", action="store_true", help="also a PDF twin of every figure (for papers)")
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")                                   # files only, never a window
    try:
        paths = write_gallery(args.run_dir, args.out, samples=args.samples, grid_samples=args.grid_samples,
                              cache_dir=args.cache_dir, device=args.device, pdf=args.pdf)
    except (ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
