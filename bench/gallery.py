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

Each row of the gallery, and the whole map grid of an MPRT grid, is ONE montage image (`tile`: the maps
side by side, a few transparent pixels apart) in one bare Axes, names and values as text, laid out in
inches (no layout pass): a figure costs a few artists, not one Axes per map.

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

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from bench.checks import check_targets
from bench import figures
from bench.files import find_manifests, read_manifest
from bench.keep import (MprtGrid, compute_report_maps, grid_of, method_maps, mprt_configs, mprt_grid,
                        pick_samples)

__all__ = ["MprtGrid", "Run", "display_scale", "draw", "load_items", "load_run", "main", "method_maps", "mprt_configs",
           "mprt_grid", "pick_samples", "tile", "write_gallery"]
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


def tile(panels: np.ndarray, gutter: int) -> np.ndarray:
    """(R, C, H, W, ...) panels -> one (R (H + g) - g, C (W + g) - g, ...) montage, NaN in the g-pixel gutters."""
    p = np.asarray(panels, dtype=np.float64)
    R, C, H, W = p.shape[:4]
    p = np.pad(p, [(0, 0), (0, 0), (0, gutter), (0, gutter)] + [(0, 0)] * (p.ndim - 4), constant_values=np.nan)
    out = p.swapaxes(1, 2).reshape(R * (H + gutter), C * (W + gutter), *p.shape[4:])
    return out[: R * (H + gutter) - gutter, : C * (W + gutter) - gutter]


def _inputs(kept: dict[str, Any], index: list[int], gutter: int) -> np.ndarray:
    """Samples `index` of kept["x"] in one row, as an RGBA montage (H, n (W + g) - g, 4), transparent gutters."""
    x = kept["x"][index].detach().double().cpu()                                        # (n, C, H, W)
    low, high = x.flatten(1).amin(1), x.flatten(1).amax(1)
    span = torch.where(high > low, high - low, 1.0)
    x = ((x - low[:, None, None, None]) / span[:, None, None, None]).permute(0, 2, 3, 1)  # min-max per image
    x = x.expand(*x.shape[:3], 3) if x.shape[-1] == 1 else x                            # grey: one channel thrice
    rgb = tile(x.numpy()[None], gutter)
    return np.dstack([np.nan_to_num(rgb), np.isfinite(rgb[..., :1])])


def _label(kept: dict[str, Any], j: int) -> str:
    t = int(kept["target"][j])
    classes = kept.get("classes")
    return f"#{int(kept['sample_id'][j])} " + (classes[t] if classes is not None and t < len(classes) else f"class {t}")


def _outline(ax, kept: dict[str, Any], index: list[int], gutter: int, x0: float = 0.0) -> None:
    """The masks of samples `index` (where the dataset has masks) outlined on their input tiles, one contour."""
    if kept.get("mask") is None:
        return
    mask = np.nan_to_num(tile(kept["mask"][index].cpu().numpy()[None].astype(float), gutter))   # (H, n W + ...)
    ax.contour(x0 + np.arange(mask.shape[1]) + 0.5, np.arange(mask.shape[0]) + 0.5, mask, levels=[0.5],
               colors="lime", linewidths=0.8)


def _montage_axes(width: float, height: float, title: list[str], *, left: float, right: float, top: float,
                  bottom: float, scale: float):
    """A figure with one bare Axes of `width` x `height` montage pixels at `scale` inches per pixel, margins in
    inches (the right one widened until the `title` lines fit), y down as in an image: a fixed layout, no
    layout pass. Returns (figure, axes)."""
    w, h = width * scale, height * scale
    right = max(right, figures._text_width(title, 9) + 0.2 - left - w)
    fw, fh = left + w + right, top + h + bottom
    fig = figures.new_figure(figsize=(fw, fh))
    ax = fig.add_axes((left / fw, bottom / fh, w / fw, h / fh))
    ax.set_axis_off()
    ax.set_xlim(0, width), ax.set_ylim(height, 0)
    fig.text(left / fw, 1 - 0.1 / fh, "\n".join(title), fontsize=9, va="top")
    return fig, ax


def _gallery_figure(kept: dict[str, Any], manifest: dict):
    """The gallery of `kept` (bench.keep): a row of inputs, then one row per method, each row ONE montage image
    (a tile per sample, `_GUTTER` pixels apart). Returns (figure, {"input" or method: its AxesImage})."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    maps = kept["maps"]
    N, (H, W) = len(kept["x"]), kept["x"].shape[-2:]
    g, index = max(1, W // 16), list(range(len(kept["x"])))
    step_x, step_y = W + g, H + g
    names = ["input", *maps]
    title = [f"{manifest['dataset']} / {manifest['model']}: maps (reduce={kept['reduce']})",
             "each scaled by its own 99th percentile of |map|"]
    fig, ax = _montage_axes(N * step_x - g, len(names) * step_y - g, title, left=figures._text_width(names, 8) + 0.2,
                            right=1.0, top=0.8, bottom=0.1, scale=1.3 / step_x)
    images = {"input": ax.imshow(_inputs(kept, index, g), extent=(0, N * step_x - g, H, 0), interpolation="nearest")}
    _outline(ax, kept, index, g)
    for j in index:
        ax.text(j * step_x + W / 2, -g, _label(kept, j), ha="center", va="bottom", fontsize=8)
    kinds = set()
    for r, (name, m) in enumerate(maps.items(), start=1):
        signed = bool((m < 0).any())                          # one colormap per row: the method's kind
        kinds.add(signed)
        shown = tile(display_scale(m).cpu().numpy()[None], g)
        images[name] = ax.imshow(shown, cmap=_SIGNED if signed else _UNSIGNED, vmin=-1 if signed else 0, vmax=1,
                                 extent=(0, shown.shape[1], r * step_y + H, r * step_y), interpolation="nearest")
    for r, name in enumerate(names):
        ax.text(-g, r * step_y + H / 2, name, ha="right", va="center", fontsize=8)
    box = ax.get_position()
    for i, signed in enumerate(sorted(kinds)):
        cax = fig.add_axes((box.x1 + 0.25 / fig.get_figwidth(), box.y1 - (i + 1) * box.height / 2 + 0.05 * box.height,
                            0.12 / fig.get_figwidth(), 0.35 * box.height))
        bar = fig.colorbar(ScalarMappable(Normalize(-1 if signed else 0, 1), _SIGNED if signed else _UNSIGNED), cax=cax)
        bar.ax.set_title("signed" if signed else "unsigned", fontsize=8, y=1)   # fixed: bench.figures' titles
        bar.ax.tick_params(labelsize=7)
    return fig, images


def _grid_figure(kept: dict[str, Any], manifest: dict, grid: MprtGrid, metric: str, j: int = 0):
    """The MPRT grid for sample j of `kept`: the input at the top left, then methods x (original + stages) |maps|
    as ONE montage image, each tile scaled by itself. Returns (figure, the montage's AxesImage)."""
    M, S, (H, W) = len(grid.maps), len(grid.labels), kept["x"].shape[-2:]
    g = max(1, W // 16)
    step_x, step_y = W + g, H + g
    scale = 1.15 / step_x
    names = figures._text_width(grid.maps, 8) / scale                   # the method names' column, in pixels
    x0 = W + 2 * g + names                                             # the maps start here
    title = [f"{manifest['dataset']} / {manifest['model']}: {metric} ({grid.order}) stages, left to right",
             "|map| scaled per panel by its 99th percentile; ρ = Spearman with the original, as mprt scores it"]
    longest = figures._text_width(["original", *grid.labels], 7)                # stage labels at 30 degrees
    fig, ax = _montage_axes(x0 + (S + 1) * step_x - g, M * step_y - g, title, left=0.1,
                            right=max(0.1, 0.87 * longest - 1.15 + 0.1), top=0.65 + longest / 2, bottom=0.1,
                            scale=scale)
    ax.imshow(_inputs(kept, [j], g), extent=(0, W, H, 0), interpolation="nearest")
    _outline(ax, kept, [j], g)
    ax.text(W / 2, -g, _label(kept, j), ha="center", va="bottom", fontsize=8)
    maps = torch.stack([display_scale(m[:, j].abs()) for m in grid.maps.values()])       # (M, S + 1, H, W)
    shown = tile(maps.cpu().numpy(), g)
    image = ax.imshow(shown, cmap=_UNSIGNED, vmin=0, vmax=1, extent=(x0, x0 + shown.shape[1], shown.shape[0], 0),
                      interpolation="nearest")
    for r, name in enumerate(grid.maps):
        ax.text(x0 - g, r * step_y + H / 2, name, ha="right", va="center", fontsize=8)
        for s in range(1, S + 1):
            ax.text(x0 + s * step_x + 0.03 * W, r * step_y + 0.96 * H, f"ρ={float(grid.spearman[name][s - 1, j]):.2f}",
                    fontsize=6, color="white", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0})
    for s, label in enumerate(["original", *grid.labels]):
        ax.text(x0 + s * step_x, -g, label, fontsize=7, rotation=30, ha="left", va="bottom", rotation_mode="anchor")
    return fig, image


def draw(kept: dict[str, Any], manifest: dict, out: Path, tag: str, *, grid_samples: int = 1,
         pdf: bool = False) -> list[Path]:
    """Write the gallery of `kept` (bench.keep's maps of one run) and the MPRT grids of its first
    `grid_samples` samples into `out` (PNG; with `pdf` also PDF); returns the PNG paths."""
    paths = []
    if kept["maps"]:
        fig, _ = _gallery_figure(kept, manifest)
        paths.append(figures.save_figure(fig, out / f"gallery_{tag}", pdf=pdf, tight=False))
    for metric in kept["grids"]:
        grid = grid_of(kept, metric)
        for j in range(min(grid_samples, len(kept["x"])) if grid.maps else 0):
            fig, _ = _grid_figure(kept, manifest, grid, metric, j)
            paths.append(figures.save_figure(fig, out / f"mprt_grid_{tag}_{metric}_{int(kept['sample_id'][j])}",
                                             pdf=pdf, tight=False))
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
