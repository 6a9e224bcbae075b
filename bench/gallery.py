"""Figures that need the maps themselves, which the store does not keep: a gallery and the MPRT grid.

`python -m bench.gallery RUN_DIR [--samples N] [--grid-samples G] [--out DIR]` reads each run's
manifest.json below RUN_DIR (its resolved `config`), reloads the dataset and the zoo model from
the cache, re-instantiates the run's methods and writes, per run (PNG and PDF):

- ``gallery_<dataset>_<model>``: rows = methods, columns = N samples picked one per class in
  turn (the input with its mask outline on top);
- ``mprt_grid_<dataset>_<model>_<metric>_<sample_id>``: Adebayo et al. 2018's signature figure,
  rows = methods, columns = the map of the original model and after each MPRT stage, from
  `metrics.mprt_stages` with the run's mprt config (same layer order, seeds and reduction as
  the stored scores), each panel annotated with the Spearman similarity mprt reports for it.

Display scale, per map and sample: m / q99(|m|), clipped to [-1, 1] (q99 = 99th percentile of
|m| over the pixels; the maximum where that is 0; a zero map stays 0), so one hot pixel does
not blank the rest. Signed maps (a method with any negative value) use a diverging colormap
centred on 0, unsigned ones a sequential one; the MPRT grid shows |map|, which mprt ranks.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from bench.run import check_targets
from bench.zoo import cache_key, load_model
from metrics import mprt_stages, similarities, to_map

log = logging.getLogger(__name__)

_STAGE_KEYS = set(inspect.signature(mprt_stages).parameters) - {"model"}
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


@dataclass(frozen=True)
class MprtGrid:
    """Maps of each method on the original model and after every MPRT stage."""

    order: str                                # mprt's order: cascading_top_down, cascading_bottom_up, independent
    labels: list[str]                         # S layer names, in the stages' order
    maps: dict[str, Tensor]                   # method -> (S + 1, G, H, W), stage 0 = original model
    spearman: dict[str, Tensor]               # method -> (S, G), as mprt's "spearman@<layer>" scores


def load_run(manifest_path: str | Path, *, cache_dir: str | Path | None = None,
             device: str | None = None) -> Run:
    """Reload one run from its manifest: the dataset, the zoo model (a trained one only from the cache,
    never retrained) and its methods.

    `cache_dir` overrides the run's cache_dir (e.g. results copied from another machine);
    `device` its device ("auto" = cuda if available).
    """
    path = Path(manifest_path)
    manifest = json.loads(path.read_text(encoding="utf-8"))
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


def method_maps(run: Run, data: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each method's map (B, H, W) of the batch `data`, with the run's reduction; a method that raises is
    logged and left out (as the run records it and goes on)."""
    out = {}
    for name, method in run.methods.items():
        try:
            out[name] = to_map(method(run.model, data["x"], data["target"]), run.cfg.reduce).detach()
        except Exception as e:                                         # noqa: BLE001 - one row missing, not the figure
            log.warning("gallery: %s failed: %s: %s", name, type(e).__name__, e)
    return out


def mprt_grid(model: nn.Module, x: Tensor, target: Tensor, methods: dict[str, Callable[..., Tensor]], *,
              reduce: str, constant: Literal["zero", "nan"] = "zero", **stages: Any) -> MprtGrid:
    """Maps of every method at every stage of `metrics.mprt_stages(model, **stages)`, and their Spearman
    similarity to the original map by `metrics.similarities` (absolute maps, `constant` rule), i.e. what
    `mprt` with the same arguments scores. One pass over the stages serves every method.
    """
    maps: dict[str, list[Tensor]] = {}                                  # raw attributions (G, C, H, W), as mprt
    for name, method in methods.items():
        try:
            maps[name] = [method(model, x, target).detach()]
        except Exception as e:                                         # noqa: BLE001
            log.warning("mprt grid: %s failed: %s: %s", name, type(e).__name__, e)
    labels = []
    for layer, randomized in mprt_stages(model, **stages):
        labels.append(layer)
        for name in list(maps):
            try:
                maps[name].append(methods[name](randomized, x, target).detach())
            except Exception as e:                                     # noqa: BLE001
                log.warning("mprt grid: %s failed at %s: %s: %s", name, layer, type(e).__name__, e)
                del maps[name]
    rho = {name: torch.stack([similarities(m[0], s, measures=["spearman"], constant=constant)["spearman"]
                              for s in m[1:]]) for name, m in maps.items()}            # (S, G), of sum_c |E_c|
    stacked = {name: torch.stack([to_map(a, reduce) for a in m]) for name, m in maps.items()}   # (S + 1, G, H, W)
    return MprtGrid(stages.get("order", "cascading_top_down"), labels, stacked, rho)


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


def _show_input(ax, run: Run, data: dict[str, Tensor], j: int) -> None:
    """Sample j of `data`: the image, its mask outline (where the dataset has masks), id and class as title."""
    gray = data["x"].shape[1] == 1
    ax.imshow(_image(data["x"][j]).numpy(), cmap="gray" if gray else None, interpolation="nearest")
    if "mask" in data:
        ax.contour(data["mask"][j].cpu().numpy().astype(float), levels=[0.5], colors="lime", linewidths=0.8)
    t = int(data["target"][j])
    classes = getattr(run.dataset, "classes", None)
    name = classes[t] if classes is not None and t < len(classes) else f"class {t}"
    ax.set_title(f"#{int(data['sample_id'][j])} {name}", fontsize=8)


def _bare(ax) -> None:
    ax.set_xticks([]), ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _gallery_figure(run: Run, data: dict[str, Tensor], maps: dict[str, Tensor]):
    """Figure of the gallery: (1 + methods) x samples panels; returns (figure, axes)."""
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    M, N = len(maps), len(data["x"])
    fig, axes = plt.subplots(1 + M, N, figsize=(1.4 * N + 1.8, 1.4 * (1 + M) + 0.6), squeeze=False)
    for j in range(N):
        _show_input(axes[0, j], run, data, j)
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
    m = run.manifest
    fig.suptitle(f"{m['dataset']} / {m['model']}: maps (reduce={run.cfg.reduce}), each scaled by its own "
                 "99th percentile of |map|", fontsize=9, y=1 - 0.1 / height)
    return fig, axes


def _grid_figure(run: Run, data: dict[str, Tensor], grid: MprtGrid, metric: str, j: int = 0):
    """Figure of the MPRT grid for sample j of `data`: the input, then methods x (stages + 1) map panels.

    Returns (figure, map axes of shape (methods, stages + 1)).
    """
    import matplotlib.pyplot as plt

    M, S = len(grid.maps), len(grid.labels)
    fig, axes = plt.subplots(M, S + 3, figsize=(1.15 * (S + 3) + 0.6, 1.15 * M + 1.0), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.1] + [1] * (S + 1)})
    _show_input(axes[0, 0], run, data, j)                          # column 0: the input; column 1: method names
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
    m = run.manifest
    fig.suptitle(f"{m['dataset']} / {m['model']}: {metric} ({grid.order}) stages, left to right (|map| scaled "
                 "per panel by its 99th percentile; ρ = Spearman with the original, as mprt scores it)",
                 fontsize=8, y=1.0)
    return fig, axes[:, 2:]


def mprt_configs(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The run's mprt metric configs by name (`_target_: metrics.mprt`); {"mprt": {}} (defaults) if none."""
    out = {}
    for name, node in cfg.metric.items():
        node = OmegaConf.to_container(node, resolve=True)
        if isinstance(node, dict) and node.get("_target_") == "metrics.mprt":
            out[name] = {k: v for k, v in node.items() if k in _STAGE_KEYS | {"constant"}}
    return out or {"mprt": {}}


def write_gallery(root: str | Path, out_dir: str | Path | None = None, *, samples: int = 4, grid_samples: int = 1,
                  cache_dir: str | Path | None = None, device: str | None = None,
                  errors: Literal["raise", "warn"] = "raise") -> list[Path]:
    """Write the gallery and MPRT grids of every run below `root` into `out_dir` (default root/report).

    Returns the PNG paths. `errors="warn"` logs a run that cannot be reloaded (e.g. its model is no
    longer cached) and goes on, as the report does; "raise" stops with its ValueError.
    """
    if samples < 1 or grid_samples < 0:
        raise ValueError(f"need samples >= 1 and grid_samples >= 0, got {samples} and {grid_samples}")
    root = Path(root)
    manifests = [root / "manifest.json"] if (root / "manifest.json").is_file() else sorted(root.rglob("manifest.json"))
    if not manifests:
        raise ValueError(f"no manifest.json found below {str(root)!r}; run `python -m bench` first, "
                         "or pass the folder it wrote its results to")
    out = root / "report" if out_dir is None else Path(out_dir)
    runs = [json.loads(p.read_text(encoding="utf-8")) for p in manifests]
    pairs = Counter((m.get("dataset"), m.get("model")) for m in runs)
    paths: list[Path] = []
    for path, manifest in zip(manifests, runs):
        tag = f"{manifest.get('dataset')}_{manifest.get('model')}"
        if pairs[manifest.get("dataset"), manifest.get("model")] > 1:
            tag = str(manifest.get("run_id"))                 # several runs of one pair below root: keep them apart
        try:
            run = load_run(path, cache_dir=cache_dir, device=device)
            with torch.random.fork_rng(devices=[]):           # as the run: global seed set, global RNG left alone
                torch.manual_seed(run.cfg.seed)
                paths += _write_run(run, out, tag, samples=samples, grid_samples=grid_samples)
        except Exception as e:                                 # noqa: BLE001 - "warn": the report goes on without it
            if errors == "raise" or not isinstance(e, (ValueError, RuntimeError, OSError, KeyError)):
                raise
            log.warning("no gallery for %s: %s: %s", path.parent, type(e).__name__, e)
    return paths


def _write_run(run: Run, out: Path, tag: str, *, samples: int, grid_samples: int) -> list[Path]:
    """The gallery and the MPRT grids of one reloaded run."""
    import matplotlib.pyplot as plt

    from bench.figures import _save_figure

    n = min(len(run.dataset), _SCAN)
    targets = torch.as_tensor([int(run.dataset[i]["target"]) for i in range(n)])
    data = load_items(run, pick_samples(targets, min(samples, n)))
    paths = []
    maps = method_maps(run, data)
    if maps:
        fig, _ = _gallery_figure(run, data, maps)
        try:
            paths.append(_save_figure(fig, out / f"gallery_{tag}"))
        finally:
            plt.close(fig)
    if grid_samples == 0:
        return paths
    few = {k: v[:grid_samples] for k, v in data.items()}
    for metric, kwargs in mprt_configs(run.cfg).items():
        grid = mprt_grid(run.model, few["x"], few["target"], run.methods, reduce=run.cfg.reduce, **kwargs)
        for j in range(len(few["x"]) if grid.maps else 0):
            fig, _ = _grid_figure(run, few, grid, metric, j)
            try:
                paths.append(_save_figure(fig, out / f"mprt_grid_{tag}_{metric}_{int(few['sample_id'][j])}"))
            finally:
                plt.close(fig)
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
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")                                   # files only, never a window
    try:
        paths = write_gallery(args.run_dir, args.out, samples=args.samples, grid_samples=args.grid_samples,
                              cache_dir=args.cache_dir, device=args.device)
    except (ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
