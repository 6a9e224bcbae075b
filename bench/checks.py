"""Checks a run makes before any expensive work, each refusing bad input with the key to fix.

Options, `_target_`s and names, the dataset (streamed once: shape, NaN/Inf, targets, duplicate ids,
named by sample id), the model against the data, and the space the results will take. The runner
(bench/run.py) calls them in its validation phase, on the batches of bench/data/stream.py.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from bench.data.stream import Batches
from bench.config import CONF
from metrics import REDUCTIONS

ALLOWED_TARGETS = ("methods.", "metrics.", "bench.", "torchvision.models.")
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}   # autocast dtypes


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The `precision` switch: autocast to bfloat16 / float16, or a disabled context for float32."""
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "float32")


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_NAME_MAX = 100                   # names go into longer file names ("<model>-<key>.pt"), usually limited to 255 bytes


def error_text(e: BaseException) -> str:
    """`Type: message` of an exception, as failures and refusals show it."""
    return f"{type(e).__name__}: {e}"


# ---- `_target_`s: the object they name, not the string ---------------------------------------------
_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\.?")    # mypkg. or mypkg.sub


class _Refused(Exception):
    """Why a `_target_` names code outside the allowed packages."""


def _allowed_prefixes(cfg: DictConfig) -> tuple[str, ...]:
    extra = cfg.get("allowed_targets") or []
    if not isinstance(extra, (list, tuple, ListConfig)) or not all(
            isinstance(p, str) and _PREFIX.fullmatch(p) for p in extra):
        raise ValueError(f"allowed_targets must be a list of package prefixes such as [mypkg.], got "
                         f"{OmegaConf.to_container(extra) if isinstance(extra, ListConfig) else extra!r}")
    # a prefix ends at a package boundary: "mypkg." allows mypkg.Net, never mypkg_evil.Net
    return tuple(p if p.endswith(".") else p + "." for p in (*ALLOWED_TARGETS, *extra))


def _inside(name: str, prefixes: tuple[str, ...]) -> bool:
    return (name + ".").startswith(prefixes)


def _on_the_way(name: str, prefixes: tuple[str, ...]) -> bool:
    """A package above an allowed one (torchvision for torchvision.models.): importing it is needed to get there."""
    return any(p.startswith(name + ".") for p in prefixes)


def resolve_target(target: str, prefixes: tuple[str, ...]) -> Any:
    """The object a `_target_` names, found as Hydra finds it (module by module, attribute by attribute),
    checking every step: a module must lie in (or above) the allowed packages, any other object must be
    defined in them (its `__module__`). Returns None when the target cannot be found (instantiate then
    says so); raises _Refused before importing or returning anything outside the allowed packages."""
    parts = target.split(".")
    if not all(parts):
        return None
    if not _inside(target, prefixes):
        raise _Refused("it is outside the allowed packages")
    if any(p.startswith("__") for p in parts):
        raise _Refused("it goes through a dunder attribute")
    try:
        obj: Any = importlib.import_module(parts[0])            # parts[0] is in or above an allowed package
    except Exception:                                           # noqa: BLE001 - instantiate reports it
        return None
    for i in range(1, len(parts)):
        path = ".".join(parts[:i + 1])
        try:
            obj = getattr(obj, parts[i])
        except AttributeError:
            if not inspect.ismodule(obj):
                return None
            try:                                                # a submodule not yet imported: `path` is in or
                obj = importlib.import_module(path)             # above an allowed package, as `target` is
            except Exception:                                   # noqa: BLE001 - instantiate reports it
                return None
        if inspect.ismodule(obj):
            if not (_inside(obj.__name__, prefixes) or _on_the_way(obj.__name__, prefixes)):
                raise _Refused(f"{path} is the module {obj.__name__}, which lies outside the allowed packages")
            continue
        module = getattr(obj, "__module__", None)
        if not isinstance(module, str) or not _inside(module, prefixes):
            what = getattr(obj, "__qualname__", type(obj).__qualname__)
            raise _Refused(f"{path} is {what} from {module or 'no module'!s}, imported into "
                           f"{'.'.join(parts[:i])} but defined outside the allowed packages")
    if inspect.ismodule(obj):
        raise _Refused("it is a module, not a class or function")
    return obj


def _target_nodes(cfg: Any, where: str, seen: set[int], depth: int = 0) -> Iterator[tuple[str, Any]]:
    """(config key, node) of every dict node in `cfg`, interpolations resolved as instantiate resolves them."""
    if id(cfg) in seen or depth > 64:
        return
    seen.add(id(cfg))
    if isinstance(cfg, DictConfig):
        yield where, cfg
        keys = [k for k in cfg.keys() if k != "_target_"]
        if not where and "hydra" in keys:                       # Hydra's own node (present when composed with
            keys.remove("hydra")                                # return_hydra_config): its plugins are Hydra's;
            callbacks = OmegaConf.select(cfg, "hydra.callbacks", default=None)   # callbacks are user code
            if isinstance(callbacks, DictConfig):
                yield from _target_nodes(callbacks, "hydra.callbacks", seen, depth + 1)
    elif isinstance(cfg, ListConfig):
        keys = range(len(cfg))
    else:
        return
    for k in keys:
        try:
            child = cfg[k]                                      # resolves ${...}, oc.create included
        except Exception:                                       # noqa: BLE001 - missing (???) or unresolvable:
            continue                                            # not a node instantiate could build
        yield from _target_nodes(child, f"{where}.{k}" if where else str(k), seen, depth + 1)


def check_targets(cfg: DictConfig) -> None:
    """Refuse any `_target_` (nested ones, in every group and anywhere else in the config) that names an
    object not defined in the suite's packages, torchvision.models or the user's `allowed_targets`.

    The object is resolved as Hydra resolves it, step by step, so `bench.calls.os.system` (a module
    imported into an allowed one) and `bench.checks.instantiate` (a function imported into one) are
    refused by what they are, not allowed by their prefix; nothing outside the allowed packages is
    imported or called.
    """
    prefixes = _allowed_prefixes(cfg)
    for where, node in _target_nodes(cfg, "", set()):
        if "_target_" not in node:
            continue
        key = f"{where}._target_" if where else "_target_"
        try:
            target = node["_target_"]
        except Exception as e:                                  # noqa: BLE001 - an interpolation that fails
            raise ValueError(f"{key} cannot be resolved ({type(e).__name__}: {str(e).splitlines()[0]}): give the "
                             "target as a plain "
                             "dotted path, e.g. methods.saliency") from e
        reason = None
        if not isinstance(target, str):
            reason = f"it is a {type(target).__name__}, not a dotted path"
        else:
            try:
                resolve_target(target, prefixes)
            except _Refused as e:
                reason = str(e)
        if reason:
            raise ValueError(
                f"{key}={target!r} is not an allowed target: {reason}. A `_target_` must name a class or function "
                f"defined in {sorted(prefixes)}; if it is your own code, add yours to `allowed_targets` "
                "(e.g. 'allowed_targets=[mypkg.]'), which lets its package's own objects in, never what it imports")


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
    for key in ("cache_maps", "deterministic", "channels_last", "progress"):
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


def check_name(group: str, name: Any) -> None:
    """Names become file and folder names: one path component of letters, digits and _ . + -, not
    starting with a dot, at most 100 characters; anything else (a slash, '..', a missing name) is refused."""
    if not isinstance(name, (str, int)) or isinstance(name, bool) or not _NAME.fullmatch(str(name)) or \
            len(str(name)) > _NAME_MAX:
        raise ValueError(f"{group} name {name!r} cannot be used in a file name: it becomes part of result and cache "
                         f"paths, so use one path component of letters, digits and _ . + - (not starting with a dot, "
                         f"at most {_NAME_MAX} characters)")


def check_names(cfg: DictConfig) -> None:
    """dataset.name and model.name: safe file names, and the model's name naming the network that runs."""
    for group in ("dataset", "model"):
        node = cfg.get(group)
        name = node.get("name") if isinstance(node, DictConfig) else None
        if name is None:
            raise ValueError(f"{group}.name is missing: every conf/{group}/*.yaml sets it; pass {group}.name=...")
        check_name(group, name)
    check_model_name(cfg.model)


def check_model_name(model_cfg: DictConfig) -> None:
    """model.name labels every result row, so it must name the network that runs. A name that is a zoo
    entry (conf/model/<name>.yaml) must run that entry's network: the same `_target_` and the same string
    options (arch, activation; sizes may differ), so `model=torchvision model.net.arch=vgg11` needs a name
    of its own. Any other name is a free label, except that where `net.arch` picks the network (torchvision,
    timm) it must contain the arch."""
    name, net = str(model_cfg.name), model_cfg.get("net")
    if not isinstance(net, DictConfig):
        return
    arch = net.get("arch")
    entry = CONF / "model" / f"{name}.yaml"
    if not entry.is_file():
        if isinstance(arch, str) and arch.lower() not in name.lower():
            raise ValueError(f"model.name={name!r} does not name the network that runs: model.net.arch={arch!r} "
                             f"picks it, and the name labels every result. To run another network set "
                             f"model.net.arch=<name>; to label this one use a name that contains {arch!r}")
        return
    ref = OmegaConf.load(entry).get("net")
    if not isinstance(ref, DictConfig):
        return
    differ = []
    for k in ref:
        want = ref._get_node(k)._value()                        # unresolved: a literal of the entry's YAML
        if k != "checkpoint" and isinstance(want, str) and want != "???" and "${" not in want \
                and net.get(k) != want:
            differ.append(f"model.net.{k}={net.get(k)!r} (conf/model/{name}.yaml: {want!r})")
    if differ:
        own = f"{name}_{arch}" if isinstance(arch, str) and arch != ref.get("arch") else f"my_{name}"
        raise ValueError(f"model.name={name!r} is the zoo entry conf/model/{name}.yaml, but this run's network differs "
                         f"from it: {'; '.join(differ)}. The name labels every result: give this network its own, "
                         f"e.g. model.name={own}, or run the entry as it is with model={name}")


def check_cache_dir(cache_dir: Any) -> Path:
    """Refuse, before any work, a cache_dir (where zoo models are cached) that cannot be created or written,
    so a trained model is never lost for want of a place to keep it. Returns the folder."""
    if not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir):
        raise ValueError(f"cache_dir must be a folder path, got {cache_dir!r}: pass cache_dir=PATH")
    path = Path(cache_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cache_dir {str(path)!r} is not writable ({e.strerror or e}); trained zoo models are kept "
                         "there: set cache_dir (or SALIENCY_BENCH_CACHE) to a folder you can write to") from e
    return path


def scan(batches: Batches) -> dict[str, Any]:
    """Stream every item once and refuse bad data by sample id; returns what the keys and checks need."""
    n = batches.n
    if n < 1:
        raise ValueError("the dataset has no samples: check dataset.n_samples and the split")
    seen: set[int] = set()
    ids = hashlib.sha256()
    info: dict[str, Any] = {"n": n, "max_target": (-1, None)}
    for _, batch in batches.stream(torch.device("cpu")):
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
        info.setdefault("targets", []).append(torch.stack([sid, batch["target"]], dim=1))   # (B, 2): id, class
        top = int(batch["target"].argmax())
        if batch["target"][top] > info["max_target"][0]:
            info["max_target"] = (int(batch["target"][top]), int(sid[top]))
        info.update(shape=tuple(batch["x"].shape[1:]), has_mask="mask" in batch)
    info["sample_ids"] = ids.hexdigest()[:16]
    info["targets"] = torch.cat(info["targets"])                                # (n, 2): sample_id, target
    return info


def check_model(model: nn.Module, batches: Batches, device: torch.device, info: dict, names: dict[str, str]) -> float:
    """The model takes the dataset's images and has a class for every target; returns its accuracy."""
    correct = 0
    with torch.inference_mode():
        for _, batch in batches.stream(device):
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
    """A generous estimate of what the run writes: 32 bytes per stored value, cached attributions as float32
    (raw, C x H x W: metrics take the form they consume from them), plus 16 MiB."""
    maps = n * math.prod(shape) * 4 * methods if cache_maps else 0
    return 2 * (n * per_sample_rows * 32 + maps) + (16 << 20)
