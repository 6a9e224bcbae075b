"""The suite from Python, as in a notebook: zoo models, datasets, methods and metrics by name.

Each is built from its YAML (the suite's conf/ or a folder of your own on `search_path`) through the
runner's own path: the config is composed as `python -m bench` composes it, names and every
`_target_` are checked (bench.checks, with `allowed_targets`), objects come from instantiate_checked
and the zoo's load_model, and a metric is called with the inputs its signature names, the attribution
in the form it consumes under the run's `reduce` (bench.calls). Defaults are the YAML's, not the
function's. Keyword options set keys of the entry's YAML node; a key the target does not take is
refused, never dropped. Methods and metrics run with pass sizes tuned to the model on first use, as
in a run (bench.tuning: probed once per architecture, input shape and device, cached in cache_dir).

>>> from bench import api
>>> data = api.batch(api.dataset("shapes", n_samples=8))
>>> model = api.model("small_cnn")                     # trained on shapes and cached on first use
>>> ig = api.method("integrated_gradients")             # 16 steps, as its YAML says
>>> result = api.metric("pixel_flipping")(model, data["x"], data["target"], ig(model, data["x"], data["target"]))
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from hydra import compose as _hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from bench.calls import call_metric, metric_inputs, missing_inputs
from bench.checks import (check_cache_dir, check_name, check_names, check_options, check_targets,
                          instantiate_checked)
from bench.config import CONF, derive_seeds, unknown_choice
from bench.data.stream import stream
from bench.provenance import without_meta
from bench.tuning import tuned
from bench.zoo import load_model
from metrics import MetricResult

Folders = Sequence["str | Path"]


def _quoted(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose(*overrides: str, search_path: Folders = (), allowed_targets: Sequence[str] = ()) -> DictConfig:
    """The experiment config (conf/config.yaml and Hydra overrides, e.g. "model=resnet"), composed as the CLI
    composes it, with your YAML folders on Hydra's search path and your packages in `allowed_targets`."""
    folders = [Path(f).expanduser().resolve() for f in search_path]
    if missing := [str(f) for f in folders if not f.is_dir()]:
        raise ValueError(f"search_path: {missing} is not a folder; pass folders that hold method/, metric/, ... YAMLs")
    extra = [f"hydra.searchpath=[{','.join(_quoted(f'file://{f}') for f in folders)}]"] if folders else []
    if allowed_targets:
        extra.append(f"allowed_targets=[{','.join(_quoted(p) for p in allowed_targets)}]")
    if message := unknown_choice([*extra, *overrides]):
        raise ValueError(message)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return _hydra_compose("config", overrides=[*extra, *overrides])


def _built(group: str, name: str, options: Mapping[str, Any], overrides: Sequence[str], search_path: Folders,
           allowed_targets: Sequence[str], choice: str) -> DictConfig:
    """The composed config with entry `name` of `group` chosen and `options` set on its node, checked."""
    check_name(group, name)
    cfg = compose(choice, *overrides, search_path=search_path, allowed_targets=allowed_targets)
    node = cfg[group][name] if group in ("method", "metric") else cfg[group]
    with open_dict(node):
        for key, value in options.items():
            OmegaConf.update(node, key, value, merge=False)
    check_targets(cfg)
    return derive_seeds(cfg)                                   # seed: null -> from the run seed, as a run does


def dataset(name: str = "shapes", *, overrides: Sequence[str] = (), search_path: Folders = (),
            allowed_targets: Sequence[str] = (), **options: Any) -> Any:
    """Dataset `name` (conf/dataset/<name>.yaml) with `options` set, e.g. dataset("shapes", n_samples=8)."""
    cfg = _built("dataset", name, options, overrides, search_path, allowed_targets, f"dataset={name}")
    check_names(cfg)
    return instantiate_checked("dataset", cfg.dataset)


def model(name: str = "small_cnn", *, dataset: str = "shapes", device: str | torch.device = "cpu",
          cache_dir: str | Path | None = None, info: bool = False, overrides: Sequence[str] = (),
          search_path: Folders = (), allowed_targets: Sequence[str] = (),
          **options: Any) -> nn.Module | tuple[nn.Module, dict[str, Any]]:
    """Zoo model `name` for dataset `dataset` in eval mode on `device`: trained on it and cached on first use
    (in `cache_dir`, default the run's), as a run loads it. Options are keys of its YAML (dotted for nested
    ones: **{"net.width": 8}); dataset options go in `overrides` ("dataset.size=32"). With info=True,
    also the zoo's record (source, checkpoint, accuracy)."""
    cfg = _built("model", name, options, [f"dataset={dataset}", *overrides], search_path, allowed_targets,
                 f"model={name}")
    check_names(cfg)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else Path(cfg.cache_dir).expanduser()
    if "train" in cfg.model:
        check_cache_dir(cache)
    net, record = load_model(cfg.model, cfg.dataset, cache_dir=cache, device=device)
    return (net, record) if info else net


def method(name: str, *, search_path: Folders = (), allowed_targets: Sequence[str] = (),
           **options: Any) -> Callable[..., Tensor]:
    """Attribution method `name` with its YAML's hyperparameters and `options` over them: a callable
    (model, x, target) -> attribution (B, C, H, W), e.g. method("integrated_gradients", steps=32)."""
    cfg = _built("method", name, options, (), search_path, allowed_targets, f"method=[{name}]")
    return TunedMethod(instantiate_checked(f"method.{name}", cfg.method[name]), str(cfg.cache_dir))


@dataclass(frozen=True)
class TunedMethod:
    """A method as its YAML configures it (`partial`; its func and keywords shown as this object's), called
    with the pass sizes tuned to the model it is given (bench.tuning: probed on first use, as in a run)."""

    partial: Callable[..., Tensor]
    cache_dir: str | None = None
    func = property(lambda self: self.partial.func)
    keywords = property(lambda self: self.partial.keywords)

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor, /, **options: Any) -> Tensor:
        with tuned(model, x, cache_dir=self.cache_dir):
            return self.partial(model, x, target, **options)


@dataclass(frozen=True)
class Metric:
    """A metric as the runner calls it: `fn` with its YAML's options, handed the attribution in the form it
    consumes under `reduce` (the run's channel reduction, config.yaml's unless given)."""

    name: str
    fn: Callable[..., MetricResult]
    reduce: str
    cache_dir: str | None = None              # where the tuned pass sizes are kept (bench.tuning)

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor, attribution: Tensor, *,
                 mask: Tensor | None = None, method: Callable[..., Tensor] | None = None,
                 extra: Mapping[str, Any] | None = None) -> MetricResult:
        """Scores of one batch: `attribution` is the method's raw output (B, C, H, W); `mask` (B, H, W) for
        localization metrics, `method` for those that explain again (randomization), `extra` for run-wide
        inputs (bench.calls.RUN_INPUTS, e.g. label_randomized_model)."""
        if attribution.ndim != 4 or attribution.shape != x.shape:
            raise ValueError(f"attribution must be the method's raw output, shaped like x {tuple(x.shape)}; got "
                             f"{tuple(attribution.shape)} (the metric reduces it as it consumes it)")
        batch = {"x": x, "target": target, **({"mask": mask} if mask is not None else {})}
        available = metric_inputs(self.fn, model, batch, attribution, method, self.reduce, dict(extra or {}))
        if method is None:
            del available["method"]
        if missing := missing_inputs(self.fn, available):
            raise ValueError(f"metric {self.name} needs {missing}: pass " + ", ".join(f"{k}=..." for k in missing))
        with tuned(model, x, cache_dir=self.cache_dir):             # the model's pass sizes, as in a run
            return call_metric(self.fn, available)


def metric(name: str, *, reduce: str | None = None, search_path: Folders = (), allowed_targets: Sequence[str] = (),
           **options: Any) -> Metric:
    """Metric `name` with its YAML's options and `options` over them, called as the runner calls it:
    metric("pixel_flipping", steps=8)(model, x, target, attribution) -> MetricResult."""
    cfg = _built("metric", name, options, [f"reduce={reduce}"] if reduce else [], search_path, allowed_targets,
                 f"metric=[{name}]")
    check_options(cfg)
    return Metric(name, instantiate_checked(f"metric.{name}", without_meta(cfg.metric[name])), str(cfg.reduce),
                  str(cfg.cache_dir))


def batch(data: Any, n: int | None = None, *, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The first `n` items of a dataset (all when None), collated as the runner collates them: x (n, C, H, W),
    target (n,), sample_id (n,) and mask (n, H, W) where the dataset has masks."""
    count = len(data) if n is None else n
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(data):
        raise ValueError(f"n must be an integer in 1..{len(data)} (the dataset's size) or None, got {n!r}")
    return next(stream(data, count, torch.device(device), stop=count))[1]
