"""The two-sample probe before a run: supported, misconfigured, or a fault of some samples.

Each method and metric with a cell to compute is called once on the first PROBE samples, so the checks
the functions themselves make (steps against the image size, baselines, layers of this very model) run
on the real model and data before any expensive work. An exception there means one of three things:

- unsupported: the method or metric cannot run on this model or data (it raised
  metrics.checks.Unsupported, e.g. through methods._common.cannot_run): the cell is recorded as
  `unsupported` with the reason (manifest, failures table, leaderboard) and every other cell runs;
- misconfigured: any other CONFIG_ERRORS exception (a misspelt parameter, a bad value, a layer name
  that does not exist) stops the run before any work, naming the config key to fix;
- anything else (RuntimeError, out of memory) is a fault of the samples it hits: the run records it per
  sample (bench.calls.isolate).

Unsupported cells are never stored, so every run probes them again (two samples: cheap) and records
them anew: a method or model that changes gets its cells computed, never a stale verdict.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import Tensor

from bench.calls import RunContext, call_metric, metric_inputs
from bench.checks import error_text
from metrics import MetricResult
from metrics.checks import Unsupported

PROBE = 2                     # samples each method and metric is tried on before the run
# Exceptions that mean "this configuration cannot work" when a probe raises them (STYLE: bad input is a
# ValueError/TypeError; an unknown layer or key a LookupError). Anything else (RuntimeError, OOM) is a
# fault of the samples it hits and is recorded per sample during the run.
CONFIG_ERRORS = (ValueError, TypeError, LookupError, AttributeError, NotImplementedError)


def unsupported_reason(e: BaseException) -> str | None:
    """Why `e` means "cannot run on this model or data" (metrics.checks.Unsupported: its message), else None.

    Only Unsupported counts: every method tried on the embedded models and on torchvision's and timm's
    resnet18 (deeplift and LRP on the ViT, LRP on SiLU, DeepLIFT on reused ReLUs, CAMs) refuses through
    its own check (methods._common.cannot_run), and no library error was seen that would need a pattern.
    """
    return str(e) if isinstance(e, Unsupported) else None


def probe(ctx: RunContext, *, methods: dict[str, Callable[..., Tensor]],
          metrics: dict[str, Callable[..., MetricResult]], todo: dict[str, list[str]]
          ) -> tuple[int, dict[tuple[str, str], str]]:
    """Call each method and metric with a cell to compute on the first PROBE samples (module docstring).

    Returns the stored values per sample (for the space check) and {(method, metric): reason} of the
    unsupported cells; a misconfiguration raises ValueError with the config key to fix. A method that
    cannot run makes all its cells unsupported; its metrics that do not call it are still probed on a
    stand-in map, so their misconfigurations stop the run as they would with any other method.
    """
    batch, model = ctx.batches.head(PROBE, ctx.device), ctx.model
    values, unsupported = 0, {}
    for method_name, todo_metrics in todo.items():
        if not todo_metrics:
            continue
        method, a, why = methods[method_name], None, None
        try:
            a = method(model, batch["x"], batch["target"])
        except Exception as e:                                     # noqa: BLE001 - sorted out below
            why = _sorted_out(e, f"method.{method_name}", f"fix it in conf/method/{method_name}.yaml or with "
                                                          f"method.{method_name}.<key>=... on the command line")
        usable = isinstance(a, Tensor) and a.shape == batch["x"].shape and bool(torch.isfinite(a).all())
        # a faulty or unsupported method leaves the metrics to be probed on a stand-in map
        raw = a if usable else batch["x"]
        for metric_name in todo_metrics:
            metric = metrics[metric_name]
            if why is not None:                                    # the cell cannot run; the metric's options
                unsupported[method_name, metric_name] = why        # are checked unless it calls the method
                if "method" in inspect.signature(metric).parameters:
                    continue
            try:
                result = call_metric(metric, metric_inputs(metric, model, batch, raw, method, ctx.reduce, ctx.extra))
            except Exception as e:                                 # noqa: BLE001 - sorted out below
                cell_why = _sorted_out(e, f"metric.{metric_name} (with method {method_name})",
                                       f"fix it in conf/metric/{metric_name}.yaml or with metric.{metric_name}.<key>=...")
                if why is None and cell_why is not None:
                    unsupported[method_name, metric_name] = cell_why
                continue
            if why is None:
                values += len(result.scores) + sum(c.y.shape[1] for c in result.curves.values())
    return values, unsupported


def _sorted_out(e: Exception, where: str, fix: str) -> str | None:
    """The reason when `e` means unsupported; raise the misconfiguration with `fix`; None for a fault."""
    why = unsupported_reason(e)
    if why is None and isinstance(e, CONFIG_ERRORS):
        raise ValueError(f"{where}: {error_text(e)}; {fix}") from e
    return why


def unsupported_entries(unsupported: dict[tuple[str, str], str]) -> list[dict[str, Any]]:
    """The manifest's `unsupported` list: one {"method", "metric", "reason"} per cell, sorted."""
    return [{"method": m, "metric": k, "reason": why} for (m, k), why in sorted(unsupported.items())]
