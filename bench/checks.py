"""Checks a run makes before any expensive work, each refusing bad input with the key to fix.

Options, `_target_`s and names, the dataset (streamed once: shape, NaN/Inf, targets, duplicate ids,
named by sample id), the model against the data, and the space the results will take. The runner
(bench/run.py) calls them in its validation phase; `stream` also feeds its batches.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import operator
import re
from typing import Any, Iterator

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from metrics import REDUCTIONS

ALLOWED_TARGETS = ("methods.", "metrics.", "bench.", "torchvision.models.")
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}   # autocast dtypes


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The `precision` switch: autocast to bfloat16 / float16, or a disabled context for float32."""
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "float32")


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def error_text(e: BaseException) -> str:
    """`Type: message` of an exception, as failures and refusals show it."""
    return f"{type(e).__name__}: {e}"


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


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_options(cfg: DictConfig) -> torch.device:
    """The run's own options; returns the device."""
    if cfg.reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {list(REDUCTIONS)}, got {cfg.reduce!r}")
    if not is_int(cfg.batch_size) or cfg.batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (samples per batch), got {cfg.batch_size!r}: "
                         "pass e.g. batch_size=64")
    if not is_int(cfg.seed) or cfg.seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {cfg.seed!r}")
    if cfg.get("precision", "float32") not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {cfg.get('precision')!r}: float32 is "
                         "exact; bfloat16 and float16 autocast the model's passes (faster on GPUs, approximate)")
    for key in ("cache_maps", "deterministic", "channels_last"):
        if not isinstance(cfg.get(key, False), bool):
            raise ValueError(f"{key} must be true or false, got {cfg.get(key)!r}")
    if cfg.get("unavailable_metrics", "error") not in ("error", "skip"):
        raise ValueError(f"unavailable_metrics must be 'error' or 'skip', got {cfg.get('unavailable_metrics')!r}")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but CUDA is not available here: use device=auto or device=cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    return device


def instantiate_checked(where: str, node: DictConfig) -> Any:
    """instantiate() with the config key in the message, then unknown keywords of a partial refused."""
    try:
        obj = instantiate(node)
    except Exception as e:                                          # noqa: BLE001 - re-raised with the key
        cause = e.__cause__ or e
        raise ValueError(f"{where} (target {node.get('_target_')!r}) cannot be created: {error_text(cause)}; "
                         f"fix its YAML or the {where}.* overrides") from e
    if isinstance(obj, functools.partial):
        try:
            params = inspect.signature(obj.func).parameters
        except (TypeError, ValueError):                              # builtins without a signature
            return obj
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(obj.keywords) - set(params))
            if unknown:
                known = [k for k, p in params.items() if p.kind == p.KEYWORD_ONLY]
                raise ValueError(f"{where}: unknown parameter(s) {unknown} for {obj.func.__name__}; "
                                 f"it takes {known}")
    return obj


def check_name(group: str, name: str) -> None:
    """Names become file names: no path separators, no leading dot."""
    if not _NAME.fullmatch(str(name)):
        raise ValueError(f"{group} name {name!r} cannot be used in a file name: use letters, digits and _ . + -")


def collate(items: list[Any], ids_hint: range, expect: dict[str, tuple] | None) -> dict[str, Tensor]:
    """Stack dataset items into a batch, refusing, by sample id, items of the wrong kind or shape."""
    out: dict[str, list[Tensor]] = {}
    for i, item in zip(ids_hint, items):
        if not isinstance(item, dict) or not {"x", "target", "sample_id"} <= set(item):
            raise ValueError(f"dataset item {i} must be a dict with x, target, sample_id (and mask), got "
                             f"{sorted(item) if isinstance(item, dict) else type(item).__name__}")
        try:
            sid = operator.index(item["sample_id"])                 # int, or a numpy / torch integer scalar
        except TypeError:
            raise ValueError(f"dataset item {i}: sample_id must be an integer, got {item['sample_id']!r}") from None
        x = item["x"]
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 3:
            raise ValueError(f"sample_id {sid}: image x must be a float tensor (C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
                             f"{' ' + str(x.dtype) if isinstance(x, Tensor) else ''}")
        first = expect or {"x": tuple(x.shape), "mask": "mask" in item}
        if tuple(x.shape) != first["x"]:
            raise ValueError(f"sample_id {sid}: image has shape {tuple(x.shape)}, expected {first['x']} like the "
                             "dataset's other images; resize or drop it")
        if ("mask" in item) != first["mask"]:
            raise ValueError(f"sample_id {sid}: {'has' if 'mask' in item else 'lacks'} a mask, unlike the dataset's "
                             "other items")
        if first["mask"] and (not isinstance(item["mask"], Tensor) or tuple(item["mask"].shape) != first["x"][1:]):
            raise ValueError(f"sample_id {sid}: mask must have shape {first['x'][1:]}, got "
                             f"{tuple(getattr(item['mask'], 'shape', ()))}")
        target = torch.as_tensor(item["target"])
        if target.numel() != 1 or target.is_floating_point() or target.dtype == torch.bool:
            raise ValueError(f"sample_id {sid}: target must be one integer class index, got {item['target']!r}")
        expect = first
        for k, v in (("x", x), ("target", target.reshape(())), ("sample_id", torch.tensor(sid)),
                     *((("mask", item["mask"].bool()),) if first["mask"] else ())):
            out.setdefault(k, []).append(v)
    return {k: torch.stack(v) for k, v in out.items()}


def stream(dataset: Any, batch_size: int, device: torch.device, *, stop: int | None = None) -> Iterator[tuple[int, dict]]:
    """(start, batch) for consecutive batches; items are fetched on demand, one batch held at a time."""
    n = len(dataset) if stop is None else min(stop, len(dataset))
    expect = None
    for start in range(0, n, batch_size):
        span = range(start, min(n, start + batch_size))
        batch = collate([dataset[i] for i in span], span, expect)
        expect = expect or {"x": tuple(batch["x"].shape[1:]), "mask": "mask" in batch}
        yield start, {k: v.to(device) for k, v in batch.items()}


def scan(dataset: Any, batch_size: int) -> dict[str, Any]:
    """Stream every item once and refuse bad data by sample id; returns what the keys and checks need."""
    n = len(dataset)
    if n < 1:
        raise ValueError("the dataset has no samples: check dataset.n_samples and the split")
    seen: set[int] = set()
    ids = hashlib.sha256()
    info: dict[str, Any] = {"n": n, "max_target": (-1, None)}
    for _, batch in stream(dataset, batch_size, torch.device("cpu")):
        sid = batch["sample_id"]                                               # (B,)
        bad = ~torch.isfinite(batch["x"]).flatten(1).all(dim=1)                # (B,)
        if bad.any():
            raise ValueError(f"sample_id(s) {sid[bad].tolist()}: image contains NaN or Inf; fix or drop "
                             "these samples")
        if (batch["target"] < 0).any():
            raise ValueError(f"sample_id(s) {sid[batch['target'] < 0].tolist()}: negative target class")
        dup = [s for s in sid.tolist() if s in seen] or [s for s, c in zip(*sid.unique(return_counts=True)) if c > 1]
        if dup:
            raise ValueError(f"sample_id {int(dup[0])} occurs more than once; sample ids must be unique")
        seen.update(sid.tolist())
        ids.update(sid.numpy().tobytes())
        top = int(batch["target"].argmax())
        if batch["target"][top] > info["max_target"][0]:
            info["max_target"] = (int(batch["target"][top]), int(sid[top]))
        info.update(shape=tuple(batch["x"].shape[1:]), has_mask="mask" in batch)
    info["sample_ids"] = ids.hexdigest()[:16]
    return info


def check_model(model: nn.Module, dataset: Any, batch_size: int, device: torch.device, info: dict,
                 names: dict[str, str]) -> float:
    """The model takes the dataset's images and has a class for every target; returns its accuracy."""
    correct = 0
    with torch.inference_mode():
        for _, batch in stream(dataset, batch_size, device):
            try:
                out = model(batch["x"])
            except Exception as e:                                  # noqa: BLE001 - re-raised with names
                raise ValueError(f"model {names['model']} cannot take the images of dataset {names['dataset']} "
                                 f"(shape {info['shape']}): {error_text(e)}") from e
            if out.ndim != 2 or out.shape[0] != len(batch["x"]):
                raise ValueError(f"model {names['model']} returned shape {tuple(out.shape)} for a batch of "
                                 f"{len(batch['x'])}; it must return (B, classes)")
            target, classes = info["max_target"]
            if target >= out.shape[1]:
                raise ValueError(f"sample_id {classes}: target {target} is not a class of model {names['model']} "
                                 f"({out.shape[1]} outputs); the dataset and model disagree on the classes")
            correct += int((out.argmax(dim=1) == batch["target"]).sum())
    return correct / info["n"]


def need_bytes(n: int, shape: tuple, per_sample_rows: int, methods: int, cache_maps: bool) -> int:
    """A generous estimate of what the run writes: 32 bytes per stored value, maps as float32, plus 16 MiB."""
    maps = n * shape[1] * shape[2] * 4 * methods if cache_maps else 0
    return 2 * (n * per_sample_rows * 32 + maps) + (16 << 20)
